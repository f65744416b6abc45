"""`dair up` starts a bus and stages, `dair status` sees them, and stopping it leaves no orphans."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import psutil
import pytest

from dair.bus.client import BusClient
from dair.bus.local import _command, free_port_pair

DAIR = _command("dair", "dair.cli")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if not _gone(p)]
        if not left:
            return []
        time.sleep(0.1)
    return left


def _pids_from(text: str) -> list[int]:
    return [int(p) for p in re.findall(r"\bpid (\d+)\)", text)]


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_up_status_and_no_orphans(default_model, tmp_path, how):
    port = free_port_pair()
    addr = f"tcp://127.0.0.1:{port}"
    out = open(tmp_path / "up.out", "w+")  # noqa: SIM115
    up = subprocess.Popen(DAIR + ["up", "--split", "0-14,15-29", "--port", str(port), "--threads", "1",
                                  "--model", str(default_model)], stdout=out, stderr=subprocess.STDOUT)
    try:
        with BusClient(addr, timeout=5) as c:
            st = c.wait_ready(120, alive=lambda: up.poll() is None)
        assert [(n["first"], n["last"]) for n in st["nodes"]] == [(0, 14), (15, 29)]
        r = subprocess.run(DAIR + ["status", "--bus", addr, "--json"], capture_output=True, text=True, timeout=60)
        status = json.loads(r.stdout)
        assert r.returncode == 0 and status["ready"] is True
        assert {n["state"] for n in status["nodes"]} == {"ready"}
        # Each stage is a dair-stage process whose command line shows its layers.
        for n in status["nodes"]:
            cmdline = " ".join(psutil.Process(n["pid"]).cmdline())
            assert "dair-stage" in cmdline and f"--layers {n['first']}-{n['last']}" in cmdline
        text = subprocess.run(DAIR + ["status", "--bus", addr], capture_output=True, text=True, timeout=60).stdout
        assert "ready: yes" in text and "0-14" in text
        out.flush()
        children = _pids_from((tmp_path / "up.out").read_text())
        assert len(children) == 3  # the bus and two stages
        up.send_signal(how)
        up.wait(30)
        assert _wait_gone(children) == []
    finally:
        if up.poll() is None:
            up.kill()
        out.close()


def test_up_generate_answers_and_exits(default_model):
    port = free_port_pair()
    r = subprocess.run(DAIR + ["up", "--stages", "2", "--port", str(port), "--threads", "1", "--model",
                               str(default_model), "--generate", "The capital of France is", "--raw", "-n", "3",
                               "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "generated at" in r.stderr
    assert len(_pids_from(r.stderr)) == 3 and _wait_gone(_pids_from(r.stderr)) == []
