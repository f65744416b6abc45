"""A qwen3moe model across real stage processes (f32 wire: the in-process arithmetic exactly),
each streaming its experts under --max-ram:
greedy tokens equal the in-process ones, a SIGKILLed middle stage is replaced by a standby with
the same tokens, and `dair status` shows experts and disk bytes per token."""
from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dair.bus.client import BusClient, BusTimeout
from dair.bus.local import LocalCluster

PROMPT = [17, 230, 81, 402, 9, 77, 150]
N, KILL_AFTER = 24, 8
CONFIG = """
[bus]
heartbeat_interval_ms = 250
heartbeat_liveness = 8
"""


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory) -> Path:
    from dair.model.synth import write_synth

    return write_synth(tmp_path_factory.mktemp("moe") / "qwen3moe.gguf", "tiny-qwen3moe", "q8_0", n_layers=3, seed=2)


def _expert_bytes(path: Path) -> tuple[int, int]:
    """(bytes of one expert's three matrices, bytes of one layer without its experts)."""
    from dair.model import open_model

    with open_model(path) as mf:
        t, c = mf.layer_tensors(0), mf.config
        experts = sum(t[f].nbytes for f in ("gate_exps", "up_exps", "down_exps"))
        a, b = mf.layer_byte_range(0)
        return experts // c.n_experts, b - a - experts


def _local_greedy(path: Path) -> list[int]:
    from dair.backend import LocalBackend
    from dair.engine.sampling import SamplingParams

    return LocalBackend(path, quiet=True).generate(PROMPT, SamplingParams(temperature=0), N, set())["ids"]


@pytest.fixture(scope="module")
def cluster(moe_model: Path, tmp_path_factory) -> Iterator[LocalCluster]:
    tmp = tmp_path_factory.mktemp("moe-cluster")
    (tmp / "config.toml").write_text(CONFIG)
    expert, rest = _expert_bytes(moe_model)
    budget = rest + 2 * expert  # below the layer's 8 experts: they stream
    log_path = tmp / "cluster.log"
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed with the cluster
    c = LocalCluster(str(moe_model), [(0, 0), (1, 1), (2, 2)], threads=1, wire="f32",
                     config=str(tmp / "config.toml"), log=log, standby=1, stage_args=["--max-ram", str(budget)])
    c.start()
    try:
        c.wait_ready(120)
        _wait(c.addr, lambda s: sum(n["state"] == "standby" for n in s["nodes"]) == 1)
        yield c
    except BaseException:
        print(log_path.read_text()[-4000:])
        raise
    finally:
        c.stop()
        log.close()


def _wait(addr: str, cond, timeout: float = 60.0) -> dict:
    deadline, st = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        try:
            with BusClient(addr, timeout=3) as c:
                st = c.status()
        except BusTimeout:
            continue
        if cond(st):
            return st
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout:.0f}s: {st.get('problems')} {st.get('nodes')}")


def _run(addr: str, kill_pid: int | None = None) -> list[int]:
    import os

    ids: list[int] = []
    with BusClient(addr, timeout=120) as c:
        for ev in c.generate(ids=PROMPT, params={"temperature": 0}, max_tokens=N, stop_ids=[]):
            if ev["type"] == "token":
                if kill_pid is not None and len(ids) == KILL_AFTER:
                    os.kill(kill_pid, signal.SIGKILL)
                ids.append(ev["id"])
    return ids


def test_streaming_stages_give_the_in_process_tokens_and_show_experts(cluster, moe_model, capsys):
    from dair.cli import main

    want = _local_greedy(moe_model)
    assert _run(cluster.addr) == want
    st = _wait(cluster.addr, lambda s: all(n.get("experts_per_token", 0) > 0 for n in s["nodes"]
                                           if n["state"] != "standby"))
    for n in st["nodes"]:
        if n["state"] != "standby":
            assert n["mode"] == "streaming" and n["moe_layers"] == 1 and n["disk_bytes_per_token"] > 0
            assert 0 < n["experts_per_token"] <= n["experts_per_layer"]
    main(["status", "--bus", cluster.addr])
    out = capsys.readouterr().out
    assert "per token over 1 MoE layers (of 8 each)" in out and "MiB per token" in out


def test_middle_stage_killed_resumes_with_same_tokens(cluster, moe_model):
    want = _local_greedy(moe_model)
    st = _wait(cluster.addr, lambda s: s["ready"])
    victim = next(n["pid"] for n in st["nodes"] if n["first"] == 1 and n["state"] != "dead")
    assert _run(cluster.addr, kill_pid=victim) == want
    st = _status_after(cluster.addr)
    owner = next(n for n in st["nodes"] if n["first"] == 1 and n["state"] != "dead")
    assert owner["pid"] != victim
    assert np.all([n["state"] != "dead" for n in st["nodes"]])


def _status_after(addr: str) -> dict:
    return _wait(addr, lambda s: s["ready"])
