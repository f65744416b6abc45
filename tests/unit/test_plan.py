"""Capacity-aware placement (dair.engine.placement) and `dair plan`."""
from __future__ import annotations

import json

import pytest

from dair.cli import main
from dair.engine.placement import NodeCapacity, place
from dair.errors import DairError

G = 1 << 30


def ranges(plan) -> list[tuple[int, int]]:
    return [(p.first, p.last) for p in plan]


def test_ranges_proportional_to_budgets():
    plan = place([100] * 32, [NodeCapacity("a", 1 * G), NodeCapacity("b", 2 * G), NodeCapacity("c", 1 * G)])
    assert ranges(plan) == [(0, 7), (8, 23), (24, 31)]
    plan = place([100] * 30, [NodeCapacity("a", 512 << 20), NodeCapacity("b", 1 * G), NodeCapacity("c", 2 * G)])
    assert ranges(plan) == [(0, 3), (4, 12), (13, 29)]  # 1 : 2 : 4 of 30 layers = 4.3 : 8.6 : 17.1


def test_every_layer_once_and_speed_weighting():
    nodes = [NodeCapacity("a", G, speed=1.0), NodeCapacity("b", G, speed=3.0)]
    plan = place([7] * 40, nodes)
    assert ranges(plan) == [(0, 9), (10, 39)]
    for k in range(1, 9):
        plan = place([5] * 17, [NodeCapacity(str(i), G * (i + 1)) for i in range(k)])
        flat = [i for p in plan for i in range(p.first, p.last + 1)]
        assert flat == list(range(17)) and all(p.last >= p.first for p in plan)


def test_unlimited_nodes_and_modes():
    plan = place([10 << 20] * 10, [NodeCapacity("a", None), NodeCapacity("b", 20 << 20)], head_bytes=1 << 20)
    assert plan[0].mode == "resident" and plan[1].mode == "streaming"
    assert plan[1].last == 9 and plan[1].nbytes == (plan[1].last - plan[1].first + 1) * (10 << 20) + (1 << 20)


def test_budget_too_small_for_one_layer():
    with pytest.raises(DairError, match=r"node b: budget 1\.0 MiB cannot hold even one layer \(2\.0 MiB\)"):
        place([2 << 20] * 10, [NodeCapacity("a", G), NodeCapacity("b", 1 << 20), NodeCapacity("c", G)])
    with pytest.raises(DairError, match="3 nodes but only 2 layers"):
        place([1, 1], [NodeCapacity(str(i)) for i in range(3)])


def test_head_goes_to_a_node_that_can_hold_it():
    plan = place([1 << 20] * 10, [NodeCapacity("big", 64 << 20), NodeCapacity("small", 8 << 20)],
                 head_bytes=30 << 20)
    assert [p.name for p in plan] == ["small", "big"] and plan[-1].last == 9


def test_cli_json_and_config(default_model, tmp_path, capsys):
    assert main(["plan", "--budgets", "1G,2G,512M", "--model", str(default_model), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in out["stages"]] == ["node0", "node1", "node2"]
    assert out["stages"][0]["first"] == 0 and out["stages"][-1]["last"] == out["n_layers"] - 1
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[stages]]\nhost = "10.0.0.1"\nmax_ram = "30M"\n[[stages]]\nhost = "10.0.0.2"\n'
                   'max_ram = "1M"\n')
    assert main(["plan", "--config", str(cfg), "--model", str(default_model)]) == 2
    assert "cannot hold even one layer" in capsys.readouterr().err


def test_each_node_counts_its_own_kv_cache_type():
    """Weights 3 MiB a layer; a full-length session's KV cache 6 MiB a layer on an f16 stage and
    3.2 MiB on a Q8_0 one: with equal budgets the Q8_0 stage takes the larger share, so that both
    are filled alike (9 x = 6.2 (30 - x): 12 layers and 18)."""
    M = 1 << 20
    f16, q8 = 6 * M, int(3.2 * M)
    plan = place([3 * M] * 30, [NodeCapacity("f16", 200 * M, kv_layer=f16), NodeCapacity("q8", 200 * M, kv_layer=q8)])
    assert ranges(plan) == [(0, 11), (12, 29)]
    assert [p.nbytes for p in plan] == [12 * (3 * M + f16), 18 * (3 * M + q8)]
    # the same type everywhere is the uniform case: kv_layer is then just part of each layer
    same = place([3 * M] * 30, [NodeCapacity("a", 200 * M, kv_layer=f16), NodeCapacity("b", 100 * M, kv_layer=f16)])
    assert ranges(same) == ranges(place([9 * M] * 30, [NodeCapacity("a", 200 * M), NodeCapacity("b", 100 * M)]))
    with pytest.raises(DairError, match=r"node q8: budget 5\.0 MiB cannot hold even one layer \(6\.2 MiB\)"):
        place([3 * M] * 30, [NodeCapacity("f16", 200 * M, kv_layer=f16), NodeCapacity("q8", 5 * M, kv_layer=q8)])
