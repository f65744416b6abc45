"""Heartbeats both ways: a silent stage is declared dead (by layer range), a replacement makes the
pipeline ready again, and stages re-register by themselves when the bus restarts."""
from __future__ import annotations

import asyncio
import math
import re
import time

import pytest
from support.cluster_fixtures import start_cluster, stop_cluster

from dair.bus.client import BusClient, BusError, BusTimeout
from dair.config import ReconnectConfig, load_config, section

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


BACKOFF_CONFIG = """
[bus]
heartbeat_interval_ms = 200
heartbeat_liveness = 5
[reconnect]
initial_ms = 200
max_ms = 1600
jitter = 0.5
"""
RETRY = re.compile(r"dair-stage: no word from the bus at \S+; reconnecting \(attempt (\d+), next in ([0-9.]+)s")


def test_stage_and_client_back_off_exponentially_while_the_bus_is_away(default_model, tmp_path):
    """A real bus stopped for ~8 s and started again: the stage's reconnect attempts and the
    asyncio client's follow [reconnect] (doubling from initial_ms up to max_ms, with jitter),
    and both are back on their own once the bus is."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(BACKOFF_CONFIG)
    c = start_cluster(default_model, [(0, 29)], tmp_path, wire="f32", config=cfg)
    rc = section(ReconnectConfig, load_config(cfg))
    outage_s = 8.0
    states_seen: list[tuple[str, int]] = []

    async def follow() -> tuple[list[int], bool]:
        from dair.bus.aclient import AsyncBusClient

        client = AsyncBusClient(c.addr, name="backoff-test", cfg=load_config(cfg))
        client.on_state = lambda state, attempt: states_seen.append((state, attempt))
        try:
            await client.start(30)
            loop = asyncio.get_running_loop()
            c.bus.kill()
            await loop.run_in_executor(None, c.bus.wait)
            await asyncio.sleep(outage_s)
            c.bus = c._spawn(c.bus_command())
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not (client.connected and states_seen[-1][0] == "connected"
                                                      and len(states_seen) > 2):
                await asyncio.sleep(0.1)
            return [a for s, a in states_seen if s == "reconnecting"], client.connected
        finally:
            await client.close()

    try:
        attempts, back = asyncio.run(follow())
        assert back, states_seen
        # The client: attempts counted 1, 2, 3, ... and, backing off, few of them: an outage of
        # T seconds takes about log2(T / initial) attempts, then one per max_ms at most. (The
        # client notices the outage only after its stale timeout, so T here bounds it from above.)
        assert attempts == list(range(1, len(attempts) + 1)), states_seen
        doubling = math.ceil(math.log2(rc.max_ms / rc.initial_ms)) + 1
        assert 2 <= len(attempts) <= doubling + (outage_s + 5) / (rc.max_ms / 1000 * (1 - rc.jitter)), attempts
        _wait(c.addr, lambda s: s["ready"], 120)
        with BusClient(c.addr, timeout=60) as cl:
            assert list(cl.generate(ids=PROMPT, max_tokens=2, params={"temperature": 0}))[-1]["ids"] == [7042, 30]
        # The stage: each attempt's wait lies in [ceiling x (1 - jitter), ceiling], the ceiling
        # doubling from initial_ms up to max_ms; it says so until the wait reaches the cap.
        retries = [(int(a), float(d)) for a, d in RETRY.findall(c.log_path.read_text())]
        assert len(retries) >= 3, c.log_path.read_text()[-3000:]
        assert [a for a, _ in retries] == list(range(1, len(retries) + 1))
        for a, d in retries:
            ceiling = min(rc.max_ms, rc.initial_ms * 2 ** (a - 1)) / 1000
            assert ceiling * (1 - rc.jitter) - 0.01 <= d <= ceiling + 0.01, (a, d, ceiling)
        assert len({d for _, d in retries}) > 1
        print(f"client attempts {attempts}; stage waits {retries}")
    finally:
        stop_cluster(c)
