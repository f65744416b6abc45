"""Capacity-aware placement on a real cluster: stages started without --layers announce a
RAM budget and a speed, the bus places them with engine.placement.place() and re-plans as they
come and go; the residency figures of their heartbeats reach `dair status --json`."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dair.bus.client import BusBackend, BusClient
from dair.bus.local import LocalCluster
from dair.engine.placement import NodeCapacity, model_unit_bytes, place
from dair.engine.sampling import SamplingParams

DATA = Path(__file__).parent.parent / "data"
REF = json.loads((DATA / "SmolLM2-135M-Instruct.Q4_1.ref.json").read_text())
PROMPT = REF["prompts"]["capital"]["prompt_ids"]
CONFIG = "[bus]\nheartbeat_interval_ms = 200\nheartbeat_liveness = 8\n"
MIB = 2**20


def wait_status(c: BusClient, cond, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    st: dict = {}
    while time.monotonic() < deadline:
        st = c.status()
        if cond(st):
            return st
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last status: {json.dumps(st)[:2000]}")


def ranges(st: dict) -> list[tuple[str, int, int]]:
    return [(n["name"], n["first"], n["last"]) for n in st["nodes"] if n["state"] != "dead"]


def expected(model_file, nodes: list[NodeCapacity]) -> list[tuple[str, int, int]]:
    layer_bytes, head = model_unit_bytes(model_file)
    return sorted(((p.name, p.first, p.last) for p in place(layer_bytes, nodes, head)), key=lambda r: r[1])


@pytest.fixture
def bus_only(default_model, tmp_path):
    (tmp_path / "config.toml").write_text(CONFIG)
    log_path = tmp_path / "cluster.log"
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed below
    c = LocalCluster(str(default_model), [], threads=1, wire="f32", config=str(tmp_path / "config.toml"), log=log)
    c.log_path = log_path  # type: ignore[attr-defined]
    c.start()
    yield c
    c.stop()
    log.close()


@pytest.mark.slow
def test_placed_stages_get_proportional_ranges_and_replan(bus_only, model_file, local_backend):
    c = bus_only
    want_ids = local_backend.generate(PROMPT, SamplingParams(temperature=0), 8, {REF["eos"]})["ids"]
    with BusClient(c.addr, timeout=10) as cl:
        try:
            cl.hello(timeout=30)
            c.add_placed_stage(["--name", "small", "--max-ram", "40M"])
            wait_status(cl, lambda st: [n["name"] for n in st["nodes"]] == ["small"], 30, "the first stage")
            c.add_placed_stage(["--name", "big", "--max-ram", "80M", "--speed", "1.0"])
            st = wait_status(cl, lambda st: st["ready"], 40, "the 2 placed stages ready")
            assert sorted(ranges(st), key=lambda r: r[1]) == expected(
                model_file, [NodeCapacity("small", 40 * MIB), NodeCapacity("big", 80 * MIB)])
            by = {n["name"]: n for n in st["nodes"]}
            small = by["small"]
            assert small["place"] and small["max_ram"] == 40 * MIB and by["big"]["max_ram"] == 80 * MIB
            # Residency figures pass through from the heartbeats once the engine runs.
            st = wait_status(cl, lambda st: all(n["mode"] for n in st["nodes"]), 10, "residency figures")
            for n in st["nodes"]:
                assert n["mode"] in ("resident", "streaming") and n["resident_bytes"] > 0
                assert n["range_bytes"] > 0 and "disk_read_mb_s" in n and "disk_wait_fraction" in n
            b = BusBackend(c.addr, timeout=60)
            try:
                assert b.generate(PROMPT, SamplingParams(temperature=0), 8, {REF["eos"]})["ids"] == want_ids
            finally:
                b.close()

            # `dair status --json` and `dair plan --bus` show the same.
            out = subprocess.run([sys.executable, "-m", "dair", "status", "--bus", c.addr, "--json"],
                                 capture_output=True, text=True, timeout=60)
            js = json.loads(out.stdout)
            assert {n["name"]: n["max_ram"] for n in js["nodes"]} == {"small": 40 * MIB, "big": 80 * MIB}
            assert all("mode" in n and "disk_wait_fraction" in n for n in js["nodes"])
            out = subprocess.run([sys.executable, "-m", "dair", "plan", "--bus", c.addr, "--json"],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            plan = json.loads(out.stdout)
            assert [(p["name"], p["first"], p["last"]) for p in plan["stages"]] == sorted(ranges(st), key=lambda r: r[1])

            # A third stage (no budget: unlimited) joins: the bus re-plans over three.
            third = c.add_placed_stage(["--name", "third"])
            want3 = expected(model_file, [NodeCapacity("small", 40 * MIB), NodeCapacity("big", 80 * MIB),
                                          NodeCapacity("third", None)])
            wait_status(cl, lambda st: st["ready"] and sorted(ranges(st), key=lambda r: r[1]) == want3, 40,
                        "the re-plan over three stages")
            # It dies: the two left share the layers again.
            third.send_signal(signal.SIGKILL)
            wait_status(cl, lambda st: st["ready"] and [n["name"] for n in st["nodes"]] != []
                        and sorted(ranges(st), key=lambda r: r[1]) == expected(
                            model_file, [NodeCapacity("small", 40 * MIB), NodeCapacity("big", 80 * MIB)]),
                        40, "the re-plan after the third stage died")
            b = BusBackend(c.addr, timeout=60)
            try:
                assert b.generate(PROMPT, SamplingParams(temperature=0), 8, {REF["eos"]})["ids"] == want_ids
            finally:
                b.close()
        except AssertionError:
            print(c.log_path.read_text()[-4000:])
            raise


def test_placed_stages_fill_around_explicit_layers(bus_only, model_file, local_backend):
    c = bus_only
    want_ids = local_backend.generate(PROMPT, SamplingParams(temperature=0), 8, {REF["eos"]})["ids"]
    layer_bytes, head = model_unit_bytes(model_file)

    def around(a: int, b: int) -> list[tuple[str, int, int]]:
        plan = place(layer_bytes[a:b + 1], [NodeCapacity("p1"), NodeCapacity("p2")], head if b == 29 else 0)
        return [(p.name, p.first + a, p.last + a) for p in plan]

    with BusClient(c.addr, timeout=10) as cl:
        try:
            cl.hello(timeout=30)
            c.add_stage(0, 9, ["--name", "fixed"])
            wait_status(cl, lambda st: [n["name"] for n in st["nodes"]] == ["fixed"], 30, "the explicit stage")
            c.add_placed_stage(["--name", "p1"])
            wait_status(cl, lambda st: len(st["nodes"]) == 2, 30, "the first placed stage")
            c.add_placed_stage(["--name", "p2"])
            st = wait_status(cl, lambda st: st["ready"] and len(st["nodes"]) == 3
                             and all(n["first"] >= 0 for n in st["nodes"]), 40, "ready")
            assert sorted(ranges(st), key=lambda r: r[1]) == [("fixed", 0, 9), *around(10, 29)]
            # A stage with explicit layers takes the end: only the placed stages move.
            c.add_stage(25, 29, ["--name", "tail"])
            st = wait_status(cl, lambda st: st["ready"] and len(st["nodes"]) == 4
                             and sorted(ranges(st), key=lambda r: r[1])
                             == [("fixed", 0, 9), *around(10, 24), ("tail", 25, 29)], 40, "the re-plan")
            b = BusBackend(c.addr, timeout=60)
            try:
                assert b.generate(PROMPT, SamplingParams(temperature=0), 8, {REF["eos"]})["ids"] == want_ids
            finally:
                b.close()
        except AssertionError:
            print(c.log_path.read_text()[-4000:])
            raise


def test_placement_counts_each_stages_own_kv_cache_type(bus_only, model_file):
    """Two stages of the same budget, one with a Q8_0 KV cache: it holds about half the cache per
    layer, so the bus gives it more layers than an f16 stage in its place would get (each layer
    counts its weights plus the holding stage's own cache; the last stage holds the head too)."""
    from dair.engine.kvcache import kv_bytes_per_token

    c, cfg = bus_only, model_file.config
    with BusClient(c.addr, timeout=10) as cl:
        try:
            cl.hello(timeout=30)
            c.add_placed_stage(["--name", "f16", "--max-ram", "60M"])
            wait_status(cl, lambda st: [n["name"] for n in st["nodes"]] == ["f16"], 30, "the first stage")
            c.add_placed_stage(["--name", "q8", "--max-ram", "60M", "--kv-type", "q8_0"])
            st = wait_status(cl, lambda st: st["ready"] and len(st["nodes"]) == 2, 40, "both stages ready")
            tokens = st["model"]["max_context"]  # the config's 2,048: the session each stage must hold
            kv = {t: tokens * kv_bytes_per_token(t, cfg.n_kv_heads, cfg.head_dim) for t in ("f16", "q8_0")}
            weights = [b - a for a, b in (model_file.layer_byte_range(i) for i in range(cfg.n_layers))]
            head = model_file.output.nbytes + model_file.output_norm.nbytes
            plan = place(weights, [NodeCapacity("f16", 60 * MIB, kv_layer=kv["f16"]),
                                   NodeCapacity("q8", 60 * MIB, kv_layer=kv["q8_0"])], head)
            want = sorted(((p.name, p.first, p.last) for p in plan), key=lambda r: r[1])
            got = sorted(ranges(st), key=lambda r: r[1])
            assert got == want, (got, want)
            uniform = place([w + kv["f16"] for w in weights], [NodeCapacity("f16", 60 * MIB),
                                                                NodeCapacity("q8", 60 * MIB)], head)
            assert plan[-1].name == uniform[-1].name == "q8"
            assert plan[-1].last - plan[-1].first > uniform[-1].last - uniform[-1].first
            assert {n["name"]: n["kv_type"] for n in st["nodes"]} == {"f16": "f16", "q8": "q8_0"}
        except AssertionError:
            print(c.log_path.read_text()[-4000:])
            raise
