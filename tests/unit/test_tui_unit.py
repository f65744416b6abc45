"""dair-tui without a cluster: the stats arithmetic, the layer map, the settings form, and
garbage in the stats never taking the UI down."""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("textual")

from dair.bus.protocol import stats_address  # noqa: E402
from dair.tui import fmt  # noqa: E402
from dair.tui.cluster import ClusterModel  # noqa: E402
from dair.tui.widgets.layermap import LayerMap, _ticks, layer_edges  # noqa: E402
from dair.tui.widgets.nodes import row_cells  # noqa: E402
from dair.tui.widgets.settings import Settings, parse_settings  # noqa: E402


def node(name: str, first: int, last: int, state: str = "ready", **kw: object) -> dict:
    return {"node": name, "name": name, "host": "h", "pid": 1, "first": first, "last": last, "state": state,
            "rss": 100 << 20, "cpu": 12.0, "bytes_in": 0, "bytes_out": 0, "heartbeat_age_s": 0.1, **kw}


def stats(nodes: list[dict], t: float, tokens: int = 0, n_layers: int = 30) -> dict:
    return {"ready": True, "problems": [], "n_layers": n_layers, "nodes": nodes, "sessions": [],
            "totals": {"tokens": tokens, "act_bytes": tokens * 1224, "bytes_per_token_hop": 612.0}, "t": t}


def test_rates_and_tokens_per_second() -> None:
    m = ClusterModel()
    m.ingest(stats([node("a", 0, 29, bytes_in=1000, bytes_out=0)], t=10.0, tokens=0), now=0)
    m.ingest(stats([node("a", 0, 29, bytes_in=3000, bytes_out=500)], t=12.0, tokens=50), now=0)
    assert m.nodes[0].rate_in == 1000.0 and m.nodes[0].rate_out == 250.0
    assert m.current_tok_s == 25.0 and m.tokens_total == 50
    # A restarted bus counts from zero again: no negative rates.
    m.ingest(stats([node("a", 0, 29)], t=13.0, tokens=3), now=0)
    assert m.current_tok_s == 0.0 and m.nodes[0].rate_in == 0.0


def test_bytes_per_token_sums_the_hops() -> None:
    m = ClusterModel()
    m.ingest(stats([node("a", 0, 9), node("b", 10, 19), node("c", 20, 29)], t=1.0, tokens=10), now=0)
    assert m.bytes_per_token_hop == 612.0 and m.bytes_per_token == 2 * 612.0


def test_layer_cells_gap_dead_and_takeover() -> None:
    m = ClusterModel(dead_after_s=3.0)
    m.ingest(stats([node("a", 0, 9), node("b", 10, 19, state="dead"), node("c", 22, 29)], t=1.0), now=0)
    kinds = [c.kind for c in m.layer_cells()]
    assert kinds[:10] == ["live"] * 10 and kinds[10:20] == ["dead"] * 10 and kinds[20:22] == ["gap"] * 2
    assert m.uncovered() == [(10, 19, "dead"), (20, 21, "gap")]
    # A stage that takes over the dead range wins over the dead one.
    m.ingest(stats([node("a", 0, 9), node("b", 10, 19, state="dead"), node("d", 10, 21),
                    node("c", 22, 29)], t=2.0), now=0)
    assert all(c.kind == "live" for c in m.layer_cells())


def test_silent_node_is_dead_before_the_bus_says_so() -> None:
    m = ClusterModel(dead_after_s=3.0)
    m.ingest(stats([node("a", 0, 29, heartbeat_age_s=3.5)], t=1.0), now=0)
    assert m.nodes[0].dead
    assert all("red" in str(c.style) for c in row_cells(m.nodes[0]))


@pytest.mark.parametrize("garbage", [
    {}, {"nodes": "x"}, {"nodes": [None, 3, {"first": "a"}]}, {"totals": [1]}, {"n_layers": -4},
    {"n_layers": 10**6, "nodes": [{"first": -5, "last": 10**7}]}, {"t": "now", "ready": "yes"},
])
def test_malformed_stats_do_not_raise(garbage: dict) -> None:
    m = ClusterModel()
    m.ingest(garbage, now=1.0)
    m.layer_cells()
    m.uncovered()


def test_layer_map_text() -> None:
    m = ClusterModel()
    m.ingest(stats([node("a", 0, 9), node("b", 10, 19, state="dead")], t=1.0), now=0)
    lm = LayerMap()
    lm.cells = m.layer_cells()
    text = lm.render().plain
    assert "a 0-9" in text and "b 10-19 dead" in text and "20-29 uncovered" in text
    assert _ticks(m.layer_cells(), layer_edges(30, 60)).split() == ["0", "10", "20", "29"]
    assert layer_edges(30, 75)[-1] == 75 and layer_edges(30, 10)[-1] == 30


def test_settings_parse() -> None:
    base = Settings()
    s = parse_settings(base, "0", "0.5", "12")
    assert (s.temperature, s.top_p, s.max_tokens) == (0.0, 0.5, 12)
    assert s.params()["temperature"] == 0.0 and s.params()["top_p"] == 0.5
    for bad in (("x", "1", "1"), ("-1", "1", "1"), ("1", "0", "1"), ("1", "1.5", "1"), ("1", "1", "0"),
                ("1", "1", "2.5")):
        with pytest.raises(ValueError):
            parse_settings(base, *bad)
    cfg = Settings.from_config()
    assert cfg.max_tokens > 0 and 0 < cfg.top_p <= 1


def test_settings_params_are_engine_names() -> None:
    from dair.engine.sampling import SamplingParams

    SamplingParams.from_dict(Settings.from_config().params())  # raises on an unknown name


def test_stats_address_and_fmt() -> None:
    assert stats_address("tcp://127.0.0.1:5555", None) == "tcp://127.0.0.1:5556"
    assert stats_address("tcp://10.0.0.2:7000", 7100) == "tcp://10.0.0.2:7100"
    assert stats_address("tcp://*:5555", None) == "tcp://127.0.0.1:5556"
    with pytest.raises(ValueError):
        stats_address("ipc:///tmp/x", None)
    assert fmt.human_bytes(1536) == "1.5K" and fmt.human_bytes(200 << 20) == "200M"
    assert fmt.span(3, 3) == "3" and fmt.span(0, 9) == "0-9"


def test_app_survives_garbage_and_no_bus() -> None:
    """No bus at all: the app starts, says it is connecting, and survives junk messages."""
    from dair.tui.app import DairApp
    from dair.tui.messages import GenerationDone, GenerationError, Stats, TokenPiece
    from dair.tui.widgets.status import StatusLine

    async def main() -> None:
        app = DairApp("tcp://127.0.0.1:9")  # nothing listens on the discard port
        async with app.run_test(size=(100, 30)) as pilot:
            for data in ({"nodes": [None, {"first": "x"}]}, {"n_layers": 4, "nodes": [node("a", 0, 1)]}):
                app.post_message(Stats(data, 0.0))
            app.post_message(TokenPiece(99, "stray", 0))
            app.post_message(GenerationDone(99, "eos", "", 0, 0, {}))
            app.post_message(GenerationError(None, "x", "y"))
            await pilot.pause(0.3)
            assert app.query_one(StatusLine).link in ("connecting", "reconnecting")
            assert [c.kind for c in app.cluster.layer_cells()] == ["live", "live", "gap", "gap"]
            await pilot.press(*"hi", "enter")
            await pilot.pause(0.2)
            assert not app.generating and app.messages == []  # refused, history untouched
            assert app.is_running

    asyncio.run(main())
