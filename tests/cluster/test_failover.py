"""Failover: a stage killed in the middle of a generation is replaced by a standby,
which loads the range from its own disk; the bus replays the session's history and the
generation goes on with the very tokens of a run without the failure. Without a standby the
client gets a clear error, and the session continues once a stage covers the range again.
A restarted bus loses its sessions: a waiting client is told so and a retry succeeds."""
from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dair.bus.client import BusClient, BusError, BusTimeout
from dair.bus.local import LocalCluster

PROMPT = [504, 3575, 282, 4649, 314]  # "The capital of France is"
N = 64
KILL_AFTER = 20
HB_MS, LIVENESS = 250, 8  # a stage is declared dead 2 s after its last word
CONFIG = f"""
[bus]
heartbeat_interval_ms = {HB_MS}
heartbeat_liveness = {LIVENESS}
"""


def _status(addr: str) -> dict:
    with BusClient(addr, timeout=3) as c:
        return c.status()


def _wait(addr: str, cond, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    st: dict = {}
    while time.monotonic() < deadline:
        try:
            st = _status(addr)
        except BusTimeout:  # the bus is (re)starting
            continue
        if cond(st):
            return st
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout:.0f}s: {st.get('problems')} {st.get('nodes')}")


def _standbys(st: dict) -> int:
    return sum(1 for n in st["nodes"] if n["state"] == "standby")


def _owner_pid(st: dict, layer: int) -> int:
    return next(n["pid"] for n in st["nodes"] if n["first"] <= layer <= n["last"] and n["state"] != "dead")


@pytest.fixture(scope="module")
def cluster(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tmp = tmp_path_factory.mktemp("failover")
    (tmp / "config.toml").write_text(CONFIG)
    log_path = tmp / "cluster.log"
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed with the cluster
    c = LocalCluster(str(default_model), [(0, 9), (10, 19), (20, 29)], threads=1, wire="f32",
                     config=str(tmp / "config.toml"), log=log, standby=1)
    c.log_path = log_path  # type: ignore[attr-defined]
    c.start()
    try:
        c.wait_ready(120)
        _wait(c.addr, lambda s: _standbys(s) == 1, 120)
        yield c
    except BaseException:
        print(log_path.read_text()[-4000:])
        raise
    finally:
        c.stop()
        log.close()


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    import os

    os.kill(pid, sig)


def _run(addr: str, params: dict, kill_pid: int | None = None, sig: int = signal.SIGKILL) -> tuple[list[int], float]:
    """A 64-token generation; kills `kill_pid` once KILL_AFTER tokens are streamed. Returns the
    ids and the longest gap between two streamed tokens."""
    with BusClient(addr, timeout=120) as c:
        ids, gap, last = [], 0.0, None
        for ev in c.generate(ids=PROMPT, params=params, max_tokens=N, stop_ids=[]):
            now = time.monotonic()
            if ev["type"] == "token":
                if last is not None:
                    gap = max(gap, now - last)
                last = now
                if kill_pid is not None and len(ids) == KILL_AFTER - 1:
                    _kill(kill_pid, sig)
                ids.append(ev["id"])
            else:
                assert ev["stop"] == "length" and ev["ids"] == ids
    return ids, gap


@pytest.mark.parametrize("params, layer, sig", [
    ({"temperature": 0}, 15, signal.SIGKILL), ({"temperature": 0.9, "seed": 1234}, 25, signal.SIGKILL),
    ({"temperature": 0}, 5, signal.SIGSTOP)], ids=["greedy-middle", "seeded-last", "stalled-first"])
def test_stage_lost_mid_generation_resumes_with_same_tokens(cluster, params, layer, sig):
    """SIGKILL closes the stage's connection (the bus acts on that within a heartbeat interval);
    SIGSTOP leaves it open, so only the heartbeat timeout finds the stage dead."""
    want, _ = _run(cluster.addr, params)
    assert len(want) == N
    st = _wait(cluster.addr, lambda s: s["ready"] and _standbys(s) >= 1)
    victim = _owner_pid(st, layer)
    try:
        got, pause = _run(cluster.addr, params, kill_pid=victim, sig=sig)
    finally:
        _kill(victim)
    print(f"{params} {signal.Signals(sig).name}: failover pause {pause:.2f}s (heartbeat timeout "
          f"{HB_MS * LIVENESS / 1000:.1f}s)")
    assert got == want
    st = _status(cluster.addr)
    assert st["ready"] and _owner_pid(st, layer) != victim
    assert all(n["state"] != "dead" for n in st["nodes"])
    cluster.add_standby()  # for the next test
    _wait(cluster.addr, lambda s: _standbys(s) >= 1)


def _drop_connection(bus_port: int, stage_pid: int) -> bool:
    """Kill the bus's side of a stage's TCP connection (ss -K: root and INET_DIAG_DESTROY)."""
    import psutil

    if shutil.which("ss") is None:
        return False
    conns = [x for x in psutil.Process(stage_pid).net_connections("tcp") if x.raddr and x.raddr.port == bus_port]
    if not conns:
        return False
    r = subprocess.run(["ss", "-K", "src", "127.0.0.1", "sport", "=", str(bus_port), "dst", "127.0.0.1",
                        "dport", "=", str(conns[0].laddr.port)], capture_output=True, text=True)
    return r.returncode == 0 and "ESTAB" in r.stdout


def test_dropped_connection_mid_generation_resumes_with_same_tokens(cluster):
    want, _ = _run(cluster.addr, {"temperature": 0})
    st = _wait(cluster.addr, lambda s: s["ready"])
    victim = _owner_pid(st, 15)
    if not _drop_connection(cluster.port, victim):
        pytest.skip("cannot kill a TCP connection here (ss -K needs root and CONFIG_INET_DIAG_DESTROY)")
    with BusClient(cluster.addr, timeout=120) as c:
        got, gap, last, dropped = [], 0.0, None, False
        for ev in c.generate(ids=PROMPT, params={"temperature": 0}, max_tokens=N, stop_ids=[]):
            if ev["type"] != "token":
                break
            now = time.monotonic()
            gap = max(gap, now - last) if last is not None else 0.0
            last = now
            got.append(ev["id"])
            if len(got) == KILL_AFTER:
                dropped = _drop_connection(cluster.port, victim)
    print(f"dropped connection: pause {gap:.2f}s")
    assert dropped and got == want
    assert _owner_pid(_status(cluster.addr), 15) == victim  # the same stage, registered again


def test_no_standby_clear_error_then_session_continues(cluster):
    greedy, _ = _run(cluster.addr, {"temperature": 0})
    st = _wait(cluster.addr, lambda s: s["ready"] and _standbys(s) >= 1)
    # Use up the standby: stop it so that no spare capacity is left.
    spare = next(n["pid"] for n in st["nodes"] if n["state"] == "standby")
    _kill(spare)
    st = _wait(cluster.addr, lambda s: _standbys(s) == 0)
    victim = _owner_pid(st, 5)
    with BusClient(cluster.addr, timeout=60) as c:
        sid = c.open_session({"temperature": 0})
        got: list[int] = []
        with pytest.raises(BusError) as e:
            for ev in c.generate(sid=sid, ids=PROMPT, max_tokens=N, stop_ids=[]):
                if ev["type"] == "token":
                    got.append(ev["id"])
                    if len(got) == KILL_AFTER:
                        killed = time.monotonic()
                        _kill(victim)
        waited = time.monotonic() - killed
        assert e.value.code == "not_ready" and "no standby" in str(e.value), e.value
        assert waited < HB_MS * LIVENESS / 1000 + 5.0, waited
        assert got == greedy[:len(got)]
        # A new stage for the range: the session continues where it stopped (history replayed).
        cluster.add_stage(0, 9)
        _wait(cluster.addr, lambda s: s["ready"], 120)
        rest = list(c.generate(sid=sid, ids=PROMPT + got, max_tokens=N - len(got), stop_ids=[]))[-1]["ids"]
        assert got + rest == greedy


def test_bus_restart_mid_generation_clear_error_then_retry(cluster):
    greedy, _ = _run(cluster.addr, {"temperature": 0})
    with BusClient(cluster.addr, timeout=60) as c:
        got: list[int] = []
        with pytest.raises(BusError) as e:
            for ev in c.generate(ids=PROMPT, params={"temperature": 0}, max_tokens=N, stop_ids=[]):
                if ev["type"] == "token":
                    got.append(ev["id"])
                    if len(got) == KILL_AFTER:
                        cluster.bus.kill()
                        cluster.bus.wait(10)
                        cluster.bus = cluster._spawn(cluster.bus_command())
        assert e.value.code == "bus_restarted", e.value
        # The stages re-register by themselves; the retry (a new request) gives the same tokens.
        _wait(cluster.addr, lambda s: s["ready"], 120)
        assert list(c.generate(ids=PROMPT, params={"temperature": 0}, max_tokens=N,
                               stop_ids=[]))[-1]["ids"] == greedy


def test_dair_up_starts_standbys_and_passes_max_ram(default_model, tmp_path):
    import psutil

    from dair.bus.local import _command, free_port_pair

    port = free_port_pair()
    addr = f"tcp://127.0.0.1:{port}"
    with open(tmp_path / "up.out", "w+") as out:
        up = subprocess.Popen(_command("dair", "dair.cli") + [
            "up", "--split", "0-14,15-29", "--standby", "1", "--max-ram", "1G", "--port", str(port),
            "--threads", "1", "--model", str(default_model)], stdout=out, stderr=subprocess.STDOUT)
        try:
            with BusClient(addr, timeout=5) as c:
                c.wait_ready(120, alive=lambda: up.poll() is None)
            st = _wait(addr, lambda s: _standbys(s) == 1)
            for n in st["nodes"]:
                cmdline = psutil.Process(n["pid"]).cmdline()
                assert cmdline[cmdline.index("--max-ram") + 1] == "1G"
                assert ("--standby" in cmdline) == (n["state"] == "standby")
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(30)


def test_silent_client_and_idle_sessions_are_closed(default_model, tmp_path):
    import zmq

    from dair.bus import protocol as P

    (tmp_path / "config.toml").write_text(CONFIG + "session_idle_timeout_s = 4\n")
    c = LocalCluster(str(default_model), [], config=str(tmp_path / "config.toml"))  # a bus alone
    c.start()
    try:
        _wait(c.addr, lambda s: True)
        raw = zmq.Context.instance().socket(zmq.DEALER)  # a client that never heartbeats
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(c.addr)
        raw.send_multipart(P.encode({"type": P.SESSION_OPEN, "req": 1}))
        assert raw.poll(10_000)
        silent = P.decode(raw.recv_multipart())[0]["sid"]
        with BusClient(c.addr, timeout=10) as live:  # heartbeats from its own thread
            kept = live.open_session()
            sids = lambda s: {x["sid"] for x in s["sessions"]}  # noqa: E731
            st = _wait(c.addr, lambda s: silent not in sids(s), 10)
            assert kept in sids(st)  # silent for 2 s: only the quiet client's session went
            _wait(c.addr, lambda s: kept not in sids(s), 15)  # unused for session_idle_timeout_s
        raw.close()
    finally:
        c.stop()


def test_bus_restart_mid_generation_backend_resumes_with_same_tokens(cluster):
    """BusBackend (what `dair generate/chat --bus` use) resubmits the history it received once
    the restarted bus is ready: the caller sees a pause and the tokens of an uninterrupted run."""
    from dair.bus.client import BusBackend
    from dair.engine.sampling import SamplingParams

    greedy, _ = _run(cluster.addr, {"temperature": 0})
    backend = BusBackend(cluster.addr, timeout=60)
    seen: list[int] = []
    pieces: list[str] = []

    def on_token(tok: int, piece: str) -> None:
        seen.append(tok)
        pieces.append(piece)
        if len(seen) == KILL_AFTER:
            cluster.bus.kill()
            cluster.bus.wait(10)
            cluster.bus = cluster._spawn(cluster.bus_command())

    try:
        r = backend.generate(PROMPT, SamplingParams(temperature=0), N, set(), on_token)
    finally:
        backend.close()
    assert r["ids"] == greedy and seen == greedy  # nothing lost, nothing delivered twice
    assert r["resumed_at"] >= KILL_AFTER
    # The text too: what streamed before the restart and after it, joined, is the result's.
    assert "".join(pieces) == r["text"] and r["text"].strip()
