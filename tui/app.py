"""dair-tui: the live cluster dashboard and the interactive prompt.

Data comes only from `BusLink` (tui/link.py) as messages; handlers here fold it into
`ClusterModel` and hand each widget what it shows. Nothing in this file touches a socket.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.reactive import reactive
from textual.widgets import Footer, Header, Input

from dair.tui.cluster import ClusterModel
from dair.tui.link import BusLink
from dair.tui.messages import (
    GenerationDone,
    GenerationError,
    LinkState,
    PrefillProgress,
    Stats,
    TokenPiece,
    Welcome,
)
from dair.tui.widgets import (
    ChatPanel,
    LayerMap,
    NodesTable,
    Settings,
    SettingsScreen,
    StatusLine,
    Throughput,
    Transcript,
)
from dair.tui.widgets.chat import ChatMessage


class DairApp(App[int]):
    CSS_PATH = Path(__file__).with_name("dair.tcss")
    TITLE = "dair"
    SUB_TITLE = "distributed AirLLM"
    BINDINGS = [
        Binding("escape", "stop", "Stop generation"),
        Binding("ctrl+n", "new_chat", "New chat", priority=True),
        Binding("f2", "settings", "Settings"),
        Binding("f3", "toggle_dashboard", "Dashboard"),
        Binding("ctrl+t", "focus_table", "Nodes", show=False),
        Binding("ctrl+l", "focus_prompt", "Prompt", show=False),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    link_state: reactive[str] = reactive("connecting")
    generating: reactive[bool] = reactive(False)

    def __init__(self, bus_addr: str, system: str | None = None, settings: Settings | None = None,
                 keys: Any = None) -> None:
        super().__init__()
        from dair.config import BusConfig, section

        self.bus_addr = bus_addr
        # Until the bus's welcome states its own heartbeat settings, config.toml's.
        self.cluster = ClusterModel(dead_after_s=section(BusConfig).dead_after_s)
        self.link = BusLink(self, bus_addr, keys=keys)
        self.settings = settings or Settings.from_config()
        self.system = system
        self.messages: list[dict[str, str]] = self._fresh_messages()
        self.req: int | None = None
        self.reply: ChatMessage | None = None
        self._reply_tokens = 0
        self._reply_started = 0.0
        self.model_name = ""

    def _fresh_messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def compose(self) -> ComposeResult:
        yield Header()
        yield StatusLine(id="status")
        with Vertical(id="dashboard"):
            yield NodesTable(id="nodes")
            with Horizontal(id="strip"):
                yield LayerMap(id="layermap")
                yield Throughput(id="throughput")
        yield ChatPanel(id="chat")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.bus_addr
        status = self.query_one(StatusLine)
        status.addr = self.bus_addr
        self._describe_settings()
        self.query_one(NodesTable).border_title = "nodes"
        self.query_one(LayerMap).border_title = "layers"
        self.query_one(Throughput).border_title = "throughput"
        self.query_one("#prompt", Input).focus()
        self.run_worker(self.link.run(), name="bus-link", group="bus", exclusive=True, exit_on_error=False)
        # `kill` (SIGTERM) quits as Ctrl+Q does, closing the session. A closed terminal (SIGHUP)
        # cannot be restored (Textual's shutdown would wait on it forever): close the session,
        # then die of the SIGHUP as a process without a handler would.
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(self.action_quit()))
            loop.add_signal_handler(signal.SIGHUP, self._hangup)

    def _hangup(self) -> None:
        self.link.new_conversation()

        def die() -> None:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGHUP)

        asyncio.get_running_loop().call_later(0.2, die)

    def on_unmount(self) -> None:
        # Free this conversation's KV caches on the stages rather than leave them to time out.
        self.link.new_conversation()
        self.link.stop()

    # --- data from the link --------------------------------------------------------------------
    def _torn_down(self) -> bool:
        """Whether the widgets are gone: the link's last messages can arrive while the app quits."""
        try:
            self.query_one(StatusLine)
            return False
        except NoMatches:
            return True

    def on_link_state(self, msg: LinkState) -> None:
        self.link_state = msg.state
        if self._torn_down():
            return
        status = self.query_one(StatusLine)
        status.link, status.attempt = msg.state, msg.attempt
        if msg.state != "connected":
            self._show_cluster(stale=True)

    def on_welcome(self, msg: Welcome) -> None:
        m = msg.model
        name = str(m.get("name") or Path(str(m.get("path", "model"))).name)
        self.model_name = name
        if self._torn_down():
            return
        self.query_one(StatusLine).model = f"{name} · {m.get('n_layers', '?')} layers"
        hb, live = msg.extra.get("heartbeat_ms"), msg.extra.get("liveness")
        if isinstance(hb, int) and isinstance(live, int):
            self.cluster.dead_after_s = hb * live / 1000.0
        if isinstance(m.get("n_layers"), int) and not self.cluster.n_layers:
            self.cluster.n_layers = m["n_layers"]
            self._show_cluster()

    def on_stats(self, msg: Stats) -> None:
        self.cluster.ingest(msg.data, time.monotonic())
        self._show_cluster()

    def _show_cluster(self, stale: bool = False) -> None:
        c = self.cluster
        if self._torn_down():
            return
        self.query_one(NodesTable).show(c.nodes, stale=stale)
        self.query_one(LayerMap).show(c.layer_cells())
        self.query_one(Throughput).show(list(c.tok_s), c.current_tok_s, c.tokens_total, c.bytes_per_token,
                                        c.sessions, c.hops)
        status = self.query_one(StatusLine)
        status.ready = c.ready
        status.problems = tuple(c.problems)

    # --- the conversation ------------------------------------------------------------------------
    @on(Input.Submitted, "#prompt")
    def send_prompt(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.generating:
            self.notify("Still answering: Esc stops the generation.", severity="warning")
            return
        event.input.value = ""
        transcript = self.query_one(Transcript)
        transcript.add("user", text)
        self.messages.append({"role": "user", "content": text})
        self.reply = transcript.add("assistant")
        self.reply.streaming = True
        self._reply_tokens = 0
        self._reply_started = time.monotonic()
        self.generating = True
        self.req = self.link.generate(self.messages, self.settings.params(), self.settings.max_tokens)

    def on_prefill_progress(self, msg: PrefillProgress) -> None:
        if msg.req != self.req or self.reply is None:
            return
        # a long prompt (a pasted document, a long chat) takes a while before its first token
        self.reply.note = "" if msg.done >= msg.total else f"prefill {msg.done:,}/{msg.total:,} prompt tokens…"

    def on_token_piece(self, msg: TokenPiece) -> None:
        if msg.req != self.req or self.reply is None:
            return
        if self.reply.note.startswith("prefill "):
            self.reply.note = ""
        self._reply_tokens += 1
        self.reply.text += msg.text
        self.query_one(Transcript).follow()

    def on_generation_done(self, msg: GenerationDone) -> None:
        if msg.req != self.req or self.reply is None:
            return
        reply = self.reply
        # The bus's whole answer: the pieces streamed, joined (and a character still incomplete
        # at the end); never the end-of-turn token's text.
        reply.text = msg.text
        self.messages.append({"role": "assistant", "content": reply.text.strip()})
        secs = max(1e-9, time.monotonic() - self._reply_started)
        n = msg.n_tokens or self._reply_tokens
        stop = {"eos": "end of answer", "length": "max tokens reached", "cancel": "stopped"}.get(msg.stop, msg.stop)
        # The bus's decode rate leaves out the prefill; the wall-clock rate is the fallback.
        rate = msg.timings.get("decode_tok_s")
        rate = rate if isinstance(rate, (int, float)) and rate > 0 else n / secs
        reply.note = f"{n} tokens · {rate:.1f} tok/s · {msg.n_prompt} prompt tokens · {stop}"
        self._end_reply()

    def on_generation_error(self, msg: GenerationError) -> None:
        if msg.req is not None and msg.req == self.req and self.reply is not None:
            reply = self.reply
            reply.note = f"error ({msg.code}): {msg.msg}"
            reply.add_class("error")
            if reply.text.strip():
                # Keep what did arrive as the assistant's turn, so the history stays alternating.
                self.messages.append({"role": "assistant", "content": reply.text.strip()})
            elif self.messages and self.messages[-1]["role"] == "user":
                self.messages.pop()
            self._end_reply()
        else:
            self.notify(f"{msg.code}: {msg.msg}", title="bus", severity="error", timeout=6)

    def _end_reply(self) -> None:
        if self.reply is not None:
            self.reply.streaming = False
        self.reply = None
        self.req = None
        self.generating = False
        self.query_one(Transcript).follow()

    # --- actions ---------------------------------------------------------------------------------
    async def action_quit(self) -> None:
        # Close the session while the link is still up, so the stages free its KV caches now.
        self.link.new_conversation()
        await asyncio.sleep(0.05)
        self.exit()

    def action_stop(self) -> None:
        if self.generating:
            self.link.cancel()
            if self.reply is not None:
                self.reply.note = "stopping…"

    def action_new_chat(self) -> None:
        if self.reply is not None:
            self.reply.streaming = False
        self.link.new_conversation()
        self.reply, self.req, self.generating = None, None, False
        self.messages = self._fresh_messages()
        self.query_one(Transcript).reset()
        self.notify("New conversation", timeout=2)
        self.query_one("#prompt", Input).focus()

    def action_settings(self) -> None:
        def done(new: Settings | None) -> None:
            if new is not None:
                self.settings = new
                self._describe_settings()
            self.query_one("#prompt", Input).focus()

        self.push_screen(SettingsScreen(self.settings), done)

    def on_resize(self) -> None:
        self.set_class(self.size.height < 32, "-short")

    def action_toggle_dashboard(self) -> None:
        self.toggle_class("-no-dashboard")

    def _describe_settings(self) -> None:
        self.query_one(Transcript).border_title = f"conversation · {self.settings.describe()}"

    def action_focus_table(self) -> None:
        self.query_one(NodesTable).focus()

    def action_focus_prompt(self) -> None:
        self.query_one("#prompt", Input).focus()

    def watch_generating(self, generating: bool) -> None:
        if self.is_mounted:
            self.query_one("#prompt", Input).placeholder = (
                "answering… (Esc stops)" if generating else
                "Ask the model…  (Enter sends · Esc stops · Ctrl+N new chat · F2 settings)")


def run_tui(bus_addr: str, system: str | None = None, keys: Any = None) -> int:
    """Run the dashboard against the bus at `bus_addr` until the user quits; the exit code.

    $DAIR_TUI_LOG names a file for the link's log (the screen belongs to the dashboard)."""
    import logging
    import os

    if os.environ.get("DAIR_TUI_LOG"):
        logging.basicConfig(filename=os.environ["DAIR_TUI_LOG"], level=logging.INFO,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = DairApp(bus_addr, system=system, keys=keys)
    result = app.run()
    return int(result or app.return_code or 0)
