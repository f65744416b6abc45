"""Heartbeats both ways: a silent stage is declared dead (by layer range), a replacement makes the
pipeline ready again, and stages re-register by themselves when the bus restarts."""
from __future__ import annotations

import time

import pytest
from cluster_fixtures import start_cluster, stop_cluster

from dair.bus.client import BusClient, BusError, BusTimeout

PROMPT = [504, 3575, 282, 4649, 314]  # "The capital of France is" -> " Paris."


def _wait(addr: str, cond, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    st: dict = {}
    while time.monotonic() < deadline:
        try:
            with BusClient(addr, timeout=2) as c:
                st = c.status()
        except BusTimeout:  # the bus is (re)starting
            continue
        if cond(st):
            return st
        time.sleep(0.2)
    raise AssertionError(f"condition not met: {st}")


def test_dead_stage_replacement_and_bus_restart(default_model, cluster_config, tmp_path):
    c = start_cluster(default_model, [(0, 14), (15, 29)], tmp_path, wire="f32", config=cluster_config)
    try:
        owner = BusClient(c.addr, timeout=60)
        sid = owner.open_session({"temperature": 0})
        first = list(owner.generate(sid=sid, ids=PROMPT, max_tokens=2))[-1]["ids"]
        assert first == [7042, 30]
        c.stages[1].kill()
        c.stages[1].wait()
        st = _wait(c.addr, lambda s: not s["ready"])  # 300 ms x 10 heartbeats in the test config
        assert any(n["state"] == "dead" and (n["first"], n["last"]) == (15, 29) for n in st["nodes"])
        assert any("15-29" in p for p in st["problems"])
        with BusClient(c.addr, timeout=30) as cl, pytest.raises(BusError) as e:
            list(cl.generate(ids=PROMPT, max_tokens=1))
        assert e.value.code == "not_ready"
        # A new stage for the range: the session is reopened on it and replayed from history.
        c.add_stage(15, 29)
        st = _wait(c.addr, lambda s: s["ready"], 120)
        assert [n["state"] for n in st["nodes"]] == ["ready", "ready"]
        # The session outlived its stage: the new one rebuilds its KV cache from the bus's history.
        more = list(owner.generate(sid=sid, ids=PROMPT + first, max_tokens=2))[-1]
        assert more["ids"] == [198, 198] and more["n_prompt"] == 7
        owner.close()
        # Bus restart: the stages notice the silence, reconnect and register again.
        c.bus.terminate()
        c.bus.wait(10)
        c.bus = c._spawn(c.bus_command())
        _wait(c.addr, lambda s: s["ready"], 120)
        with BusClient(c.addr, timeout=60) as cl:
            assert list(cl.generate(ids=PROMPT, max_tokens=2, params={"temperature": 0}))[-1]["ids"] == [7042, 30]
    finally:
        stop_cluster(c)
