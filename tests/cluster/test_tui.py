"""dair-tui against a live local cluster: real dair-bus and dair-stage processes on 127.0.0.1,
driven with Textual's pilot (asyncio.run inside sync tests: no pytest-asyncio needed)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("textual")

from dair.tui.app import DairApp  # noqa: E402
from dair.tui.widgets import LayerMap, NodesTable, Transcript  # noqa: E402
from dair.tui.widgets.settings import Settings  # noqa: E402
from dair.tui.widgets.status import StatusLine  # noqa: E402

BIN = Path(sys.executable).parent
SPLIT = ["0-3", "4-19", "20-29"]  # uneven on purpose: the table must show each range as given
SIZE = (130, 40)


def free_port_pair() -> int:
    """A port P with P and P+1 both free (the bus binds P, its stats PUB P+1)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of ports")


def _exe(name: str) -> list[str]:
    path = BIN / name
    return [str(path)] if path.exists() else [sys.executable, "-m", f"dair.{name.split('-')[1]}s.main"]


class Cluster:
    """A bus and its stages as child processes; `kill_stage` and `kill_bus` for failure tests."""

    def __init__(self, model: Path, split: list[str], tmp: Path) -> None:
        self.model, self.split, self.tmp = model, split, tmp
        self.port = free_port_pair()
        self.addr = f"tcp://127.0.0.1:{self.port}"
        self.bus: subprocess.Popen[bytes] | None = None
        self.stages: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        out = open(self.tmp / log, "ab")  # noqa: SIM115 - the child keeps it
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def start_bus(self) -> None:
        self.bus = self._spawn([*_exe("dair-bus"), "--bind", self.addr, "--model", str(self.model)], "bus.log")

    def start(self, wait: bool = True) -> Cluster:
        self.start_bus()
        for r in self.split:
            self.stages[r] = self._spawn([*_exe("dair-stage"), "--layers", r, "--bus", self.addr, "--model",
                                          str(self.model), "--threads", "1"], f"stage-{r}.log")
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        from dair.bus.client import BusClient

        deadline = time.monotonic() + timeout
        with BusClient(self.addr, timeout=5, name="test") as c:
            while time.monotonic() < deadline:
                try:
                    if c.status(timeout=2)["ready"]:
                        return
                except Exception:
                    pass
                time.sleep(0.3)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in self.tmp.glob("*.log"))
        raise AssertionError(f"cluster at {self.addr} not ready after {timeout}s\n{logs}")

    def kill_stage(self, layers: str) -> int:
        p = self.stages[layers]
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        return p.pid

    def kill_bus(self) -> None:
        assert self.bus is not None
        os.kill(self.bus.pid, signal.SIGKILL)
        self.bus.wait(10)

    def stop(self) -> None:
        for p in [*self.stages.values(), self.bus]:
            if p is not None and p.poll() is None:
                p.terminate()
        for p in [*self.stages.values(), self.bus]:
            if p is None:
                continue
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@pytest.fixture(scope="module")
def cluster(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(default_model, SPLIT, tmp_path_factory.mktemp("tui-cluster"))
    try:
        yield c.start()
    finally:
        c.stop()


def drive(app: DairApp, body: Callable[[DairApp, object], Awaitable[None]]) -> None:
    """Run `body(app, pilot)` inside Textual's headless test harness."""

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await body(app, pilot)

    asyncio.run(main())


async def until(pilot: object, cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await pilot.pause(step)  # type: ignore[attr-defined]
    return cond()


def _cell(table: NodesTable, row_key: str, col: str) -> str:
    return str(table.get_cell(row_key, col))


def test_table_shows_each_stage_with_its_range(cluster: Cluster) -> None:
    async def body(app: DairApp, pilot: object) -> None:
        assert await until(pilot, lambda: len(app.cluster.nodes) == len(SPLIT) and app.cluster.ready, 15)
        table = app.query_one(NodesTable)
        assert table.row_count == len(SPLIT)
        ranges = []
        for n in app.cluster.nodes:
            ranges.append(_cell(table, n.node, "layers"))
            assert _cell(table, n.node, "state") == "ready"
            assert _cell(table, n.node, "host") == f"{n.host}:{cluster.stages[f'{n.first}-{n.last}'].pid}"
        assert ranges == SPLIT
        # Every layer of the map has a live owner, and owners follow the split.
        cells = app.query_one(LayerMap).cells
        assert len(cells) == 30 and all(c.kind == "live" for c in cells)
        assert [cells[i].node.first for i in (0, 3, 4, 19, 20, 29)] == [0, 0, 4, 4, 20, 20]
        status = app.query_one(StatusLine)
        assert status.link == "connected" and status.ready
        assert "30 layers" in status.model

    drive(DairApp(cluster.addr), body)


class PieceCountingApp(DairApp):
    """DairApp that keeps the reply's text as each streamed piece arrives. Textual calls this
    handler before DairApp's own (it dispatches to every class in the MRO), so each entry is the
    text shown before that piece."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.shown_before_piece: list[str] = []

    def on_token_piece(self, msg: object) -> None:
        self.shown_before_piece.append(self.reply.text if self.reply is not None else "")


def test_prompt_streams_into_transcript(cluster: Cluster) -> None:
    settings = Settings(temperature=0.0, top_p=1.0, max_tokens=40)

    async def body(app: PieceCountingApp, pilot: object) -> None:
        assert await until(pilot, lambda: app.link.connected and app.cluster.ready, 15)
        assert app.focused is not None and app.focused.id == "prompt"  # focused at start
        question = "What is the capital of France?"
        await pilot.press(*question)  # type: ignore[attr-defined]
        prompt = app.query_one("#prompt")
        assert await until(pilot, lambda: prompt.value == question, 10), prompt.value  # every key arrived
        await pilot.press("enter")  # type: ignore[attr-defined]
        # The answer may be complete before press() returns (it waits for the app to be idle).
        assert await until(pilot, lambda: len(app.messages) == 2 and not app.generating, 60), \
            app.query_one(Transcript).plain
        # Streamed: many pieces, and the text on screen grew with them.
        seen_partial = app.shown_before_piece
        transcript = app.query_one(Transcript).plain
        answer = app.messages[-1]
        assert answer["role"] == "assistant" and answer["content"]
        # llama.cpp's greedy answer opens at a near-tie ("L" 24.74 vs "The" 24.65, tests/data/chat.ref.json):
        # the answer must open with one of the tokens within 0.75 of its top-1.
        ref = json.loads((Path(__file__).parent.parent / "data" / "chat.ref.json").read_text())
        first = ref["top5"][0]
        from dair.tokenizer import load_tokenizer

        tok = load_tokenizer(cluster.model)
        opens = [tok.decode([t]) for t, v in first if first[0][1] - v < 0.75]
        assert any(answer["content"].startswith(o) for o in opens), (answer["content"], opens)
        assert "user: What is the capital of France?" in transcript
        assert answer["content"] in transcript
        # Streamed: text was on screen before the generation ended, and it grew piece by piece.
        assert len(seen_partial) >= 2 and len(set(seen_partial)) >= 2
        assert seen_partial == sorted(seen_partial, key=len) and len(seen_partial[-1]) < len(answer["content"])
        # A second turn keeps the conversation's history.
        await pilot.press(*"And of Italy?")  # type: ignore[attr-defined]
        await pilot.press("enter")  # type: ignore[attr-defined]
        assert await until(pilot, lambda: not app.generating, 60)
        assert [m["role"] for m in app.messages] == ["user", "assistant", "user", "assistant"], \
            [(m.role, m.text, m.note) for m in app.query_one(Transcript).query("ChatMessage")]
        # (what the 135M model answers second is its own business: near-ties decide it)
        assert app.messages[-1]["content"] and app.messages[-1]["content"] in app.query_one(Transcript).plain
        # Ctrl+N starts a new conversation: history and transcript are empty again.
        await pilot.press("ctrl+n")  # type: ignore[attr-defined]
        await pilot.pause()  # type: ignore[attr-defined]
        assert app.messages == [] and app.query_one(Transcript).plain == ""

    drive(PieceCountingApp(cluster.addr, settings=settings), body)


class ProgressApp(DairApp):
    """DairApp that keeps each prefill progress message and the note shown when it arrived (this
    handler runs before DairApp's, so that is the note the previous message left)."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.progress: list[tuple[int, int, str]] = []

    def on_prefill_progress(self, msg: object) -> None:
        note = self.reply.note if self.reply is not None else ""
        self.progress.append((msg.done, msg.total, note))  # type: ignore[attr-defined]


def test_long_prompt_shows_prefill_progress(cluster: Cluster) -> None:
    """A pasted document: the reply shows "prefill done/total" as the bus reports each 256-token
    prefill step leaving the last stage, and the note goes once the answer starts."""
    settings = Settings(temperature=0.0, top_p=1.0, max_tokens=4)
    text = " ".join(f"Line {i} of a long log file: the service restarted and came back up." for i in range(60))

    async def body(app: ProgressApp, pilot: object) -> None:
        assert await until(pilot, lambda: app.link.connected and app.cluster.ready, 15)
        app.query_one("#prompt").value = text  # type: ignore[attr-defined]
        await pilot.press("enter")  # type: ignore[attr-defined]
        assert await until(pilot, lambda: len(app.messages) == 2 and not app.generating, 120)
        steps = [(d, t) for d, t, _ in app.progress]
        total = steps[-1][1]
        assert total > 512 and steps == [*((d, total) for d in range(256, total, 256)), (total, total)], steps
        assert app.progress[1][2] == f"prefill 256/{total:,} prompt tokens…"
        reply = app.query_one(Transcript).query("ChatMessage").last()
        assert not reply.note.startswith("prefill")  # type: ignore[attr-defined]

    drive(ProgressApp(cluster.addr, settings=settings), body)


def test_stop_key_cancels_generation(cluster: Cluster) -> None:
    settings = Settings(temperature=0.7, top_p=0.9, max_tokens=400)

    async def body(app: DairApp, pilot: object) -> None:
        assert await until(pilot, lambda: app.link.connected and app.cluster.ready, 15)
        await pilot.press(*"Write a long story about a lighthouse keeper.")  # type: ignore[attr-defined]
        await pilot.press("enter")  # type: ignore[attr-defined]
        assert await until(pilot, lambda: app.reply is not None and len(app.reply.text) > 20, 30)
        reply = app.reply
        await pilot.press("escape")  # type: ignore[attr-defined]
        assert await until(pilot, lambda: not app.generating, 10)
        assert reply is not None and "stopped" in reply.note
        assert app.messages[-1]["role"] == "assistant"

    drive(DairApp(cluster.addr, settings=settings), body)


def test_settings_modal_edits_sampling(cluster: Cluster) -> None:
    async def body(app: DairApp, pilot: object) -> None:
        await pilot.press("f2")  # type: ignore[attr-defined]
        await pilot.pause()  # type: ignore[attr-defined]
        screen = app.screen
        assert type(screen).__name__ == "SettingsScreen"
        for field, value in (("#temperature", "0.2"), ("#top_p", "0.5"), ("#max_tokens", "7")):
            inp = screen.query_one(field)
            inp.value = value
        await pilot.press("ctrl+s")  # type: ignore[attr-defined]
        await pilot.pause()  # type: ignore[attr-defined]
        assert app.settings.temperature == 0.2 and app.settings.top_p == 0.5 and app.settings.max_tokens == 7
        assert "max 7 tokens" in str(app.query_one(Transcript).border_title)
        # A bad value keeps the modal open with a message; Esc leaves the settings as they were.
        await pilot.press("f2")  # type: ignore[attr-defined]
        await pilot.pause()  # type: ignore[attr-defined]
        app.screen.query_one("#top_p").value = "2"
        await pilot.press("ctrl+s")  # type: ignore[attr-defined]
        await pilot.pause()  # type: ignore[attr-defined]
        assert type(app.screen).__name__ == "SettingsScreen"
        await pilot.press("escape")  # type: ignore[attr-defined]
        await pilot.pause()  # type: ignore[attr-defined]
        assert app.settings.top_p == 0.5
        # The new max_tokens is what the bus is asked for: the answer stops at 7 tokens.
        assert await until(pilot, lambda: app.link.connected and app.cluster.ready, 15)
        await pilot.press(*"Count to twenty.", "enter")  # type: ignore[attr-defined]
        assert await until(pilot, lambda: not app.generating, 30)
        assert "7 tokens" in app.query_one(Transcript).query("ChatMessage").last().note

    drive(DairApp(cluster.addr), body)


def test_lost_session_is_reopened_transparently(cluster: Cluster) -> None:
    """A session the bus no longer knows (evicted) is reopened once and the turn still answers."""
    settings = Settings(temperature=0.0, top_p=1.0, max_tokens=8)

    async def body(app: DairApp, pilot: object) -> None:
        assert await until(pilot, lambda: app.link.connected and app.cluster.ready, 15)
        app.link.sid = "no-such-session"
        await pilot.press(*"Say hi.", "enter")  # type: ignore[attr-defined]
        assert await until(pilot, lambda: not app.generating, 60)
        assert app.messages[-1]["role"] == "assistant" and app.messages[-1]["content"]
        assert app.link.sid not in (None, "no-such-session")

    drive(DairApp(cluster.addr, settings=settings), body)


def test_killed_stage_shows_dead_within_heartbeat_timeout(cluster: Cluster) -> None:
    """Runs last in this module: it kills the middle stage of the shared cluster."""

    async def body(app: DairApp, pilot: object) -> None:
        assert await until(pilot, lambda: app.cluster.ready and len(app.cluster.nodes) == 3, 15)
        timeout = app.cluster.dead_after_s  # heartbeat_interval_ms * heartbeat_liveness
        cluster.kill_stage("4-19")
        t0 = time.monotonic()

        def dead() -> bool:
            return any(n.first == 4 and n.dead for n in app.cluster.nodes)

        # The bus declares it after `timeout` of silence and publishes within one stats interval.
        assert await until(pilot, dead, timeout + 2.0)
        took = time.monotonic() - t0
        node = next(n for n in app.cluster.nodes if n.first == 4)
        table = app.query_one(NodesTable)
        row = table.get_row(node.node)
        assert str(row[3]) == "dead"
        assert all("red" in str(cell.style) for cell in row)  # the whole row is red
        cells = app.query_one(LayerMap).cells
        assert [c.kind for c in cells[4:20]] == ["dead"] * 16
        assert all(c.kind == "live" for c in cells[:4] + cells[20:])
        rendered = app.query_one(LayerMap).render()
        assert "dead" in rendered.plain and "4-19" in rendered.plain
        assert not app.query_one(StatusLine).ready
        print(f"stage shown dead {took:.1f}s after SIGKILL (heartbeat timeout {timeout:.1f}s)")

    drive(DairApp(cluster.addr), body)


def test_bus_restart_shows_reconnecting_and_recovers(default_model: Path, tmp_path: Path) -> None:
    c = Cluster(default_model, [], tmp_path)
    c.start_bus()

    async def body(app: DairApp, pilot: object) -> None:
        assert await until(pilot, lambda: app.link.connected and app.link.received_stats > 0, 60)
        c.kill_bus()
        assert await until(pilot, lambda: app.query_one(StatusLine).link == "reconnecting",
                           app.link.stale_after_s + 3)
        assert "reconnecting" in app.query_one(StatusLine).render().plain
        # A prompt while the bus is away fails politely; the UI keeps going.
        await pilot.press(*"hello?", "enter")  # type: ignore[attr-defined]
        assert await until(pilot, lambda: not app.generating, 5)
        assert "error" in app.query_one(Transcript).query("ChatMessage").last().note
        seen = app.link.received_stats
        c.start_bus()
        assert await until(pilot, lambda: app.link.connected and app.link.received_stats > seen, 60)
        assert app.query_one(StatusLine).link == "connected"

    try:
        drive(DairApp(c.addr), body)
    finally:
        c.stop()
