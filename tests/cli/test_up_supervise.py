"""`dair up` supervises its children (restarts, give-ups, and `--keys` with a key pair per stage).

The README's own commands, as a user runs them: `dair up --stages 3 --standby 1 --keys DIR` as a
subprocess, `dair generate --bus` greedy, SIGKILL of the 10-19 stage in the middle of the
answer. The answer must be the undisturbed run's, token for token; dair up must still run, say
which child died and how, and bring a standby back (seen by `dair status`); Ctrl-C must still
stop every process and free both ports. A second cluster shows the bus restarted on its port and
the give-up after repeated deaths.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from dair.bus.local import _command, free_port_pair
from dair.security import generate_keys

DAIR = _command("dair", "dair.cli")
STAGE = _command("dair-stage", "dair.stages.main")
PROMPT = "The capital of France is"
N = 64
CONFIG = """
[bus]
heartbeat_interval_ms = 250
heartbeat_liveness = 12
[up]
restart_delay_s = 0.5
restart_delay_max_s = 2.0
give_up_deaths = 2
give_up_window_s = 120
"""


class Up:
    """A `dair up` subprocess and its output (stdout and stderr together, in a file)."""

    def __init__(self, tmp: Path, args: list[str]) -> None:
        (tmp / "config.toml").write_text(CONFIG)
        self.port = free_port_pair()
        self.addr = f"tcp://127.0.0.1:{self.port}"
        self.out_path = tmp / "up.out"
        self.out = open(self.out_path, "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(DAIR + ["up", "--port", str(self.port), "--threads", "1",
                                             "--config", str(tmp / "config.toml"), *args],
                                     stdout=self.out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        self.out.flush()
        return self.out_path.read_text()

    def wait_for(self, pattern: str, timeout: float = 90.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text(), re.M)
            if m:
                return m
            assert self.proc.poll() is None, f"dair up exited ({self.proc.returncode}):\n{self.text()[-3000:]}"
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout:.0f}s:\n{self.text()[-3000:]}")

    def pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"\bpid (\d+)\)", self.text())]

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(60)
        finally:
            self.out.close()


def _status(addr: str, keys: list[str]) -> dict | None:
    r = subprocess.run(DAIR + ["status", "--bus", addr, "--json", "--timeout", "3", *keys],
                       capture_output=True, text=True, timeout=60)
    return json.loads(r.stdout) if r.stdout.strip().startswith("{") else None


def _wait_status(addr: str, keys: list[str], cond, timeout: float = 90.0) -> dict:
    deadline, st = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        st = _status(addr, keys)
        if st is not None and cond(st):
            return st
        time.sleep(0.3)
    raise AssertionError(f"status condition not met within {timeout:.0f}s: {st}")


def _standbys(st: dict) -> list[dict]:
    return [n for n in st["nodes"] if n["state"] == "standby"]


def _owner(st: dict, layer: int) -> dict:
    return next(n for n in st["nodes"] if n["first"] <= layer <= n["last"] and n["state"] != "dead")


def _gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def _ports_free(port: int) -> bool:
    for p in (port, port + 1):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


def _generate(addr: str, keys: list[str], kill: int | None = None) -> tuple[list[int], bool]:
    """`dair generate --bus` greedy; with `kill`, SIGKILLs that pid once the first text has
    streamed. Returns the ids and whether the generation was still running at the kill."""
    p = subprocess.Popen(DAIR + ["generate", "--bus", addr, *keys, "--temperature", "0", "-n", str(N), "--json",
                                 PROMPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    mid = False
    if kill is not None:
        p.stdout.read1(64)  # the first streamed piece of the answer
        mid = p.poll() is None
        os.kill(kill, signal.SIGKILL)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()
    result = json.loads(out.decode().splitlines()[-1])
    assert result["stop"] == "length"
    return result["ids"], mid


@pytest.mark.slow
def test_up_survives_a_stage_killed_mid_generation(default_model, tmp_path):
    keys_dir = tmp_path / "keys"
    # A keys directory of an older dair up (one stage key for all, and more stages than now).
    generate_keys(keys_dir / "stages", "stage")
    generate_keys(keys_dir / "stages", "stage7")
    old_shared = keys_dir / "stages" / "stage.key_secret"
    kept_secret = tmp_path / "old-stage.key_secret"
    kept_secret.write_bytes(old_shared.read_bytes())
    kept_secret.chmod(0o600)
    up = Up(tmp_path, ["--stages", "3", "--standby", "1", "--model", str(default_model), "--keys", str(keys_dir)])
    keys = ["--keys", str(keys_dir)]
    try:
        up.wait_for(r"^dair up: ready in", 180)
        # One key pair per stage and standby, and stages/ holds exactly those.
        assert sorted(p.name for p in (keys_dir / "stages").iterdir()) == \
            sorted(f"stage{i}.key{s}" for i in range(4) for s in ("", "_secret"))
        st = _wait_status(up.addr, keys, lambda s: s["ready"] and len(_standbys(s)) == 1)
        assert sorted(n["key"] for n in st["nodes"]) == [f"stage:stage{i}" for i in range(4)]

        # The old shared stage key is refused by the bus now.
        before = st["counters"]["refused_keys"]
        intruder = subprocess.Popen(STAGE + ["--standby", "--model", str(default_model), "--bus", up.addr,
                                             "--keys", str(keys_dir), "--secret-key", str(kept_secret)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_status(up.addr, keys, lambda s: s["counters"]["refused_keys"] > before, 60)
        finally:
            intruder.kill()
            intruder.wait()

        want, _ = _generate(up.addr, keys)
        assert len(want) == N
        victim = _owner(st, 15)
        assert (victim["first"], victim["last"]) == (10, 19)
        got, mid = _generate(up.addr, keys, kill=victim["pid"])
        assert mid, "the generation ended before the stage was killed: nothing was tested"
        assert got == want

        # One line for the death; the slot is back as a standby; dair up never stopped.
        up.wait_for(rf"^dair up: stage1 \(layers 10-19, pid {victim['pid']}\) killed by SIGKILL; "
                    r"restarting it as a standby in 0\.5s$")
        up.wait_for(r"^dair up: restarted stage1 \(standby, pid \d+\)$")
        st = _wait_status(up.addr, keys, lambda s: s["ready"] and len(_standbys(s)) == 1
                          and all(n["state"] != "dead" for n in s["nodes"]))
        assert _standbys(st)[0]["name"] == "stage1" and _standbys(st)[0]["key"] == "stage:stage1"
        assert _owner(st, 15)["pid"] != victim["pid"]
        assert up.proc.poll() is None
        assert "Traceback" not in up.text()
    finally:
        pids = up.pids()
        code = up.stop(signal.SIGINT)
    assert code == 0, up.text()[-3000:]
    assert _gone(pids) == []
    assert _ports_free(up.port)


@pytest.mark.slow
def test_up_restarts_the_bus_and_gives_up_on_a_stage_that_keeps_dying(default_model, tmp_path):
    up = Up(tmp_path, ["--stages", "1", "--model", str(default_model)])
    try:
        up.wait_for(r"^dair up: ready in", 180)
        bus_pid = int(up.wait_for(r"^dair up: bus \S+ \(pid (\d+)\)").group(1))
        os.kill(bus_pid, signal.SIGKILL)
        up.wait_for(rf"^dair up: bus \(pid {bus_pid}\) killed by SIGKILL; restarting it as the bus on the same port")
        up.wait_for(r"^dair up: restarted bus \(pid \d+\)$")
        st = _wait_status(up.addr, [], lambda s: s["ready"])  # the stage found the new bus by itself
        first = st["nodes"][0]["pid"]

        os.kill(first, signal.SIGKILL)
        up.wait_for(rf"^dair up: stage0 \(layers 0-29, pid {first}\) killed by SIGKILL; restarting it as a standby")
        second = int(up.wait_for(r"^dair up: restarted stage0 \(standby, pid (\d+)\)$").group(1))
        # The only stage is gone, so the bus gives its range to the restarted one.
        _wait_status(up.addr, [], lambda s: s["ready"] and s["nodes"][0]["pid"] == second)
        time.sleep(2.5)  # dair up asks the bus every second who serves which layers
        os.kill(second, signal.SIGKILL)
        # Its exit line names the range the bus gave it, and the give-up.
        up.wait_for(rf"^dair up: stage0 \(layers 0-29, pid {second}\) killed by SIGKILL; it died 2 times within "
                    r"120s: giving up on stage0, it is not restarted again$")
        time.sleep(1.5)  # longer than any back-off: no restart follows
        assert "restarted stage0 (standby, pid" not in up.text().split("giving up on stage0")[1]
        assert up.proc.poll() is None
    finally:
        pids = up.pids()
        code = up.stop(signal.SIGTERM)
    assert code == 0, up.text()[-3000:]
    assert _gone(pids) == []
    assert _ports_free(up.port)


def test_restart_back_off_doubles_up_to_its_ceiling():
    from dair.commands.supervise import RestartPolicy

    p = RestartPolicy.from_config({"restart_delay_s": 1, "restart_delay_max_s": 5, "give_up_deaths": 9,
                                   "give_up_window_s": 60})
    assert [p.delay(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]
