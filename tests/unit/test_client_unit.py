"""The client's pure parts, without sockets: the reconnect schedule, the typed config sections,
the stats schema and its one decoder, a client's bookkeeping of the bus process, the
resubmission of an interrupted generation, and the byte formatter."""
from __future__ import annotations

import random
from dataclasses import fields

import pytest

from dair.bus import protocol as P
from dair.bus import states
from dair.bus.backoff import Backoff, zmq_reconnect_options
from dair.bus.connection import BusError, ClientCore, Resume, decode_stats
from dair.bus.registry import Node
from dair.bus.stats import NodeStats, nodes_of
from dair.config import BusConfig, ReconnectConfig, StageConfig, load_config, section
from dair.errors import DairError
from dair.units import format_bytes


# --- backoff ----------------------------------------------------------------------------------
def test_backoff_doubles_up_to_the_cap_with_jitter_below_each_step() -> None:
    b = Backoff(0.25, 8.0, 0.5, rng=random.Random(1))
    ceilings = [0.25 * 2**k for k in range(6)] + [8.0] * 4  # 0.25, 0.5, ... 8, then capped
    delays = [b.next() for _ in ceilings]
    for d, top in zip(delays, ceilings, strict=True):
        assert top * 0.5 <= d <= top
    assert len(set(delays)) == len(delays)  # jitter: no two peers' schedules coincide exactly
    assert b.attempts == len(ceilings)
    b.reset()
    assert b.attempts == 0 and b.next() <= 0.25


def test_backoff_without_jitter_is_exact_and_config_is_read() -> None:
    b = Backoff(1.0, 5.0, 0.0)
    assert [b.next() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    rc = section(ReconnectConfig)
    d = Backoff.from_config()
    assert (d.initial_s, d.max_s, d.jitter) == (rc.initial_ms / 1000, rc.max_ms / 1000, rc.jitter)
    import zmq

    assert zmq_reconnect_options() == {zmq.RECONNECT_IVL: rc.initial_ms, zmq.RECONNECT_IVL_MAX: rc.max_ms}
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0, 0.1)
    with pytest.raises(ValueError):
        Backoff(1.0, 2.0, 1.0)


# --- config -----------------------------------------------------------------------------------
def test_typed_sections_hold_every_setting_of_config_toml(tmp_path) -> None:
    cfg = load_config()
    for cls, name in ((BusConfig, "bus"), (StageConfig, "stage"), (ReconnectConfig, "reconnect")):
        assert {f.name for f in fields(cls)} == set(cfg[name])  # one field per setting, no other
        view = section(cls, cfg)
        assert all(getattr(view, k) == v for k, v in cfg[name].items())
    user = tmp_path / "c.toml"
    user.write_text("[bus]\nheartbeat_interval_ms = 300\nheartbeat_liveness = 10\n")
    bus = section(BusConfig, load_config(user))
    assert bus.heartbeat_s == 0.3 and bus.dead_after_s == 3.0 and bus.max_stages == cfg["bus"]["max_stages"]
    user.write_text("[bus]\nheartbeat_intervall_ms = 300\n")
    with pytest.raises(DairError, match="unknown setting.*heartbeat_intervall_ms"):
        section(BusConfig, load_config(user))
    user.write_text('[stage]\nmax_batch = "many"\n')
    with pytest.raises(DairError, match=r"max_batch = 'many': expected int"):
        section(StageConfig, load_config(user))


# --- stats ------------------------------------------------------------------------------------
def _stats(nodes: list) -> dict:
    return {"type": P.STATS, "ready": True, "problems": [], "n_layers": 30, "nodes": nodes, "sessions": [],
            "model": {"name": "m"}, "totals": {"tokens": 0}, "counters": {}, "t": 1.0}


def test_stats_are_decoded_by_protocol_decode_and_nodes_by_their_dataclass() -> None:
    node = Node(ident=b"x", node="n1", name="a", host="h", pid=7, first=0, last=9, threads=1, wire="f32",
                state=states.BUSY, rss=5 << 20)
    node.stage_stats = {"sessions": 2, "kv_type": "f16", "kv_bytes": 1024, "mode": "resident"}
    wire = node.to_stats(node.last_seen).to_wire()
    frames = [P.STATS_TOPIC, P.encode(_stats([wire]))[0]]
    st = decode_stats(frames)
    assert st is not None and st["type"] == P.STATS
    (back,) = nodes_of(st)
    assert back == NodeStats.from_wire(wire) and back.live and not back.dead
    assert (back.node, back.first, back.last, back.sessions, back.kv_type, back.rss) == ("n1", 0, 9, 2, "f16", 5 << 20)
    # The schema: a field missing, mistyped, or a node that is not a map is refused, not guessed.
    for bad in ({k: v for k, v in _stats([]).items() if k != "ready"}, {**_stats([]), "nodes": "x"},
                _stats([3])):
        assert decode_stats([P.STATS_TOPIC, P.encode(bad)[0]]) is None
        with pytest.raises(P.ProtocolError):
            P.decode(P.encode(bad))
    assert decode_stats([b"other", frames[1]]) is None and decode_stats([P.STATS_TOPIC, b"\xc1"]) is None
    # A mistyped field of one node takes its default; the rest of the node is kept.
    odd = NodeStats.from_wire({"node": "n2", "pid": "seven", "cpu": 3, "place": 1, "hop_ms_p50": None})
    assert (odd.node, odd.pid, odd.cpu, odd.place, odd.hop_ms_p50) == ("n2", 0, 3.0, False, None)
    assert NodeStats.from_wire(None) == NodeStats()


def test_liveness_and_display_states() -> None:
    assert set(states.LIVE) == {states.READY, *states.DISPLAY}
    assert not set(states.LIVENESS) & set(states.DISPLAY)
    assert [states.liveness(s) for s in states.ALL] == [*states.LIVENESS, states.READY, states.READY]
    assert all(states.is_live(s) == (states.liveness(s) == states.READY) for s in states.ALL)


def test_stats_address_one_helper() -> None:
    assert P.stats_address("tcp://*:5555", connect=False) == "tcp://*:5556"
    assert P.stats_address("tcp://[::1]:5555") == "tcp://[::1]:5556"
    assert P.stats_address("tcp://0.0.0.0:5555", 6000) == "tcp://127.0.0.1:6000"


# --- a client's bookkeeping -------------------------------------------------------------------
def test_core_notices_a_new_bus_process_and_numbers_requests() -> None:
    core = ClientCore("tcp://127.0.0.1:1")
    assert core.number({"type": P.STATUS})["req"] == 1 and core.number({"type": P.STATUS})["req"] == 2
    assert "req" not in core.number({"type": P.CANCEL, "sid": "s"})
    w = core.receive(P.encode({"type": P.WELCOME, "model": {}, "stats_port": 2, "heartbeat_ms": 200,
                               "liveness": 4, "stats_interval_ms": 250, "boot": "a"}))
    assert w is not None and w.kind == "welcome" and not w.restarted
    assert (core.heartbeat_s, core.dead_after_s, core.stale_after_s) == (0.2, 0.8, 0.8)
    same = core.receive(P.encode({"type": P.HEARTBEAT, "t": 0.0, "boot": "a"}))
    assert same is not None and same.kind == "beat" and not same.restarted
    new = core.receive(P.encode({"type": P.HEARTBEAT, "t": 0.0, "boot": "b"}))
    assert new is not None and new.restarted and core.boot == "b"
    core.new_connection()  # a fresh socket: whatever bus answers it is not a restart
    again = core.receive(P.encode({"type": P.HEARTBEAT, "t": 0.0, "boot": "c"}))
    assert again is not None and not again.restarted
    assert core.receive([b"garbage"]) is None
    reply = core.receive(P.encode({"type": P.OPENED, "req": 1, "sid": "s"}))
    assert reply is not None and reply.kind == "reply"
    lost = core.lost(3)
    assert lost["code"] == P.E_BUS_RESTARTED and lost["req"] == 3


def test_resume_asks_for_the_rest_after_the_tokens_received() -> None:
    run = Resume([1, 2, 3], max_tokens=5, timeout_s=60)
    assert run.attempt() == ([1, 2, 3], 5)
    run.token(10, "Hel")
    run.token(11, "lo")
    assert run.may_retry(BusError(P.E_BUS_RESTARTED, "x")) and run.may_retry(BusError(P.E_DISCONNECTED, "x"))
    assert not run.may_retry(BusError(P.E_BUSY, "x"))
    assert run.attempt() == ([1, 2, 3, 10, 11], 3)
    run.token(12, ",")
    assert run.ids([12, 13]) == [10, 11, 12, 13] and run.resumed_at == 2
    assert run.text(", world") == "Hello, world"  # the pieces before the resubmission, then its done.text
    late = Resume([1], 5, timeout_s=-1)
    assert not late.may_retry(BusError(P.E_BUS_RESTARTED, "x"))


# --- units ------------------------------------------------------------------------------------
def test_one_byte_formatter() -> None:
    assert [format_bytes(n) for n in (0, 900, 1536, 2 << 20, 3 << 30)] == \
        ["0 B", "900 B", "1.5 KiB", "2.0 MiB", "3.0 GiB"]
    assert [format_bytes(n, compact=True) for n in (5, 1536, 200 << 20)] == ["5B", "1.5K", "200M"]
    assert format_bytes(123 << 20, compact=True, unit="MiB", digits=0) == "123M"
    assert format_bytes(3 << 19, unit="MiB", digits=2) == "1.50 MiB" and format_bytes(None) == "-"
