"""bus/membership.py in one process: the stages' rules without sockets.

`Membership` talks only through callbacks; here they record what would go on the wire, and the
test plays the stages by handing it their `register` and `heartbeat` headers. Digest admission is
the real one (model/digests.py RangeGate over the default model), so a registration shows the
digests of its range as a real stage does. Expected values come from the rules (which standby
registered first, which layers are free), not from the code.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from dair.bus import protocol as P
from dair.bus.membership import Membership
from dair.bus.registry import Registry
from dair.bus.requests import Requests
from dair.bus.states import DEAD, LOADING, STANDBY
from dair.config import load_config
from dair.model.digests import FileDigests, RangeGate


@dataclass
class Wire:
    sent: list[tuple[bytes, dict[str, Any]]] = field(default_factory=list)
    errors: list[tuple[bytes, str, str, dict[str, Any]]] = field(default_factory=list)
    told: list[tuple[bytes, dict[str, Any]]] = field(default_factory=list)

    def to(self, ident: bytes, t: str | None = None) -> list[dict[str, Any]]:
        return [h for i, h in self.sent if i == ident and (t is None or h["type"] == t)]

    def clear(self) -> None:
        self.sent.clear()
        self.errors.clear()
        self.told.clear()


@pytest.fixture(scope="module")
def tokenizer(model_file):
    from dair.tokenizer import load_tokenizer

    return load_tokenizer(model_file)


@pytest.fixture(scope="module")
def file_digests(model_file):
    return FileDigests(model_file)


@pytest.fixture()
def bus(model_file, tokenizer):
    cfg = load_config(None)
    reg = Registry(model_file.config.n_layers)
    w = Wire()
    req = Requests(cfg, model_file, tokenizer, reg, send=lambda i, h: w.sent.append((i, h)),
                   tell=lambda c, h: w.told.append((c, h)), route=lambda layer, q, f, segs: None,
                   busy_at=lambda i: False, count=lambda code: None, log=lambda msg: None)
    gate = RangeGate(model_file, progress=None, wait_s=60.0).start()
    m = Membership(cfg, model_file, reg, req, gate, send=lambda i, h: w.sent.append((i, h)),
                   reply_error=lambda i, code, msg, **x: w.errors.append((i, code, msg, x)),
                   count=lambda code: None, log=lambda msg: None)
    return m, w


def _register(m: Membership, fd: FileDigests, ident: bytes, first: int = -1, last: int = -1, *,
              standby: bool = False, place: bool = False, speed: float = 1.0, resume: str = "",
              digests: dict[str, str] | None = None) -> None:
    """A stage's `register` as stages/link.py sends it (digests of its range when it has one)."""
    h: dict[str, Any] = {"type": P.REGISTER, "name": ident.decode(), "first": first, "last": last,
                         "n_layers": m.registry.n_layers, "fingerprint": m.model.fingerprint, "host": "h",
                         "pid": os.getpid(), "rss": 0, "threads": 1, "wire": "f32",
                         "state": "ready" if first >= 0 else STANDBY, "standby": standby, "place": place,
                         "speed": speed}
    if resume:
        h["resume"] = resume
    if first >= 0:
        h["digests"] = digests if digests is not None else fd.for_range(first, last)
    m.on_register(ident, m.registry.get(ident), h, "")


def _ready_beat(m: Membership, fd: FileDigests, ident: bytes) -> None:
    """The heartbeat of a stage that has loaded the range the bus assigned it."""
    n = m.registry.get(ident)
    n.heard(time.monotonic(), 2.0 * m.hb_s)  # as Broker.on_frames does for any message
    m.on_heartbeat(ident, n, {"type": P.HEARTBEAT, "t": time.time(), "state": "ready",
                              "stats": {"first": n.first, "last": n.last},
                              "digests": fd.for_range(n.first, n.last)})


def _expire(m: Membership, *silent: bytes) -> None:
    """The heartbeat timer, long after `silent` last spoke (the others spoke just now)."""
    later = max(n.last_seen for n in m.registry.nodes.values()) + 10 * m.hb_s * m.liveness
    for n in m.registry.nodes.values():
        if n.ident not in silent:
            n.last_seen = later
    m.heartbeat(later, later)


def _sessions(m: Membership, n: int) -> list[str]:
    for i in range(n):
        m.req.on_session_open(b"client", {"type": P.SESSION_OPEN, "req": i})
    return list(m.sessions)


def test_failover_goes_to_the_first_free_standby_in_registration_order(bus, file_digests):
    m, w = bus
    _register(m, file_digests, b"s0", 0, 14)
    _register(m, file_digests, b"s1", 15, 29)
    _register(m, file_digests, b"sb1", standby=True)
    _register(m, file_digests, b"sb2", standby=True)
    assert m.registry.ready()
    sids = _sessions(m, 2)
    w.clear()

    _expire(m, b"s1")
    sb1, sb2 = m.registry.get(b"sb1"), m.registry.get(b"sb2")
    assert (sb1.first, sb1.last, sb1.state) == (15, 29, LOADING)
    assert sb2.state == STANDBY and sb2.first < 0
    # ASSIGN first (the stage builds its engine), then every session opened on it.
    assert [h["type"] for h in w.to(b"sb1")[:3]] == [P.ASSIGN, P.OPEN, P.OPEN]
    assert [h["sid"] for h in w.to(b"sb1", P.OPEN)] == sids
    assert w.to(b"sb2", P.ASSIGN) == []
    assert b"s1" not in m.registry.nodes  # the dead row goes once its range is retaken
    assert not m.registry.ready()  # until the standby shows it loaded the right bytes
    _ready_beat(m, file_digests, b"sb1")
    assert m.registry.ready() and m.registry.owner(20) is sb1

    # The next death takes the next standby.
    _expire(m, b"s0")
    assert (sb2.first, sb2.last, sb2.state) == (0, 14, LOADING)


def test_no_free_standby_fails_running_requests_with_not_ready(bus, file_digests):
    m, w = bus
    _register(m, file_digests, b"s0", 0, 14)
    _register(m, file_digests, b"s1", 15, 29)
    m.req.on_generate(b"client", {"type": P.GENERATE, "req": 7, "ids": [1, 2, 3], "max_tokens": 4})
    w.clear()
    _expire(m, b"s0")
    errors = [h for c, h in w.told if h["type"] == P.ERROR]
    assert [(e["code"], e["req"]) for e in errors] == [(P.E_NOT_READY, 7)]
    assert "layers 0-14" in errors[0]["msg"]


def test_a_live_range_is_not_registered_again_from_another_connection(bus, file_digests):
    m, w = bus
    _register(m, file_digests, b"s0", 0, 14)
    token = w.to(b"s0", P.ASSIGN)[0]["resume"]
    # Same name, pid and host, another connection, no proof: refused, the owner keeps its range.
    _register(m, file_digests, b"impostor", 5, 20)
    assert [(i, code, x) for i, code, _, x in w.errors] == [(b"impostor", P.E_OVERLAP, {"fatal": True})]
    assert b"impostor" not in m.registry.nodes and m.registry.owner(5).ident == b"s0"
    # The resume token given over the old connection proves it is the same stage: it moves.
    _register(m, file_digests, b"s0-again", 0, 14, resume=token)
    assert b"s0" not in m.registry.nodes
    again = m.registry.get(b"s0-again")
    assert again.node == "n1" and again.resume == token and m.registry.owner(0) is again


def test_wrong_bytes_are_refused_and_not_served(bus, file_digests):
    m, w = bus
    bad = {k: "0" * 32 for k in file_digests.for_range(0, 14)}
    _register(m, file_digests, b"s0", 0, 14, digests=bad)
    assert [(code, x) for _, code, _, x in w.errors] == [(P.E_FINGERPRINT, {"fatal": True})]
    assert m.registry.get(b"s0") is None and m.registry.owner(0) is None


def test_a_returning_dead_stage_is_told_to_close_the_sessions_closed_meanwhile(bus, file_digests):
    m, w = bus
    _register(m, file_digests, b"s0", 0, 14)
    _register(m, file_digests, b"s1", 15, 29)
    keep, gone = _sessions(m, 2)
    _expire(m, b"s1")
    s1 = m.registry.get(b"s1")
    assert s1.state == DEAD
    m.req.close_session(m.sessions[gone])
    assert w.to(b"s1", P.CLOSE) == []  # a dead stage is sent nothing, so it missed this close
    w.clear()
    _ready_beat(m, file_digests, b"s1")  # nobody took its range: it is back
    assert s1.live and m.registry.ready()
    m.heartbeat(time.monotonic(), time.monotonic())
    assert [h["sids"] for h in w.to(b"s1", P.HEARTBEAT)] == [[keep]]  # it closes `gone` itself


def test_placement_on_join_and_leave(bus, file_digests):
    m, w = bus
    _register(m, file_digests, b"slow", place=True, speed=1.0)
    _register(m, file_digests, b"fast", place=True, speed=3.0)
    assert m.plan_due > 0  # one plan for stages that register together, not one per arrival
    assert all(n.first < 0 for n in m.registry.nodes.values())
    sids = _sessions(m, 1)
    w.clear()
    m.replan()
    slow, fast = m.registry.get(b"slow"), m.registry.get(b"fast")
    # They tile the model between them, in registration order, the faster with more layers.
    assert (slow.first, fast.last, slow.last + 1) == (0, 29, fast.first)
    assert fast.last - fast.first > slow.last - slow.first
    for ident in (b"slow", b"fast"):
        assert [h["type"] for h in w.to(ident)] == [P.ASSIGN, P.OPEN]
        assert w.to(ident, P.OPEN)[0]["sid"] == sids[0]
        _ready_beat(m, file_digests, ident)
    assert m.registry.ready()

    # An explicit stage that joins takes its layers; the placed ones share the rest.
    _register(m, file_digests, b"explicit", 25, 29)
    assert m.plan_due > 0
    m.replan()
    assert (slow.first, fast.last) == (0, 24) and slow.last + 1 == fast.first

    # A placed stage that leaves: the survivor takes the free layers again.
    _expire(m, b"slow")
    assert m.plan_due > 0
    w.clear()
    m.replan()
    assert (fast.first, fast.last, fast.state) == (0, 24, LOADING)
    assert b"slow" not in m.registry.nodes
    assert w.to(b"fast", P.ASSIGN)[0]["first"] == 0


def test_a_closed_connection_is_a_death_after_one_heartbeat_interval(bus, file_digests):
    m, w = bus
    _register(m, file_digests, b"s0", 0, 14)
    _register(m, file_digests, b"s1", 15, 29)
    _register(m, file_digests, b"sb", standby=True)
    m.connected(b"s0", 7)
    m.connected(b"s1", 8)
    now = time.monotonic()
    for n in m.registry.nodes.values():
        n.last_seen = now
    m.on_disconnect(8)
    m.heartbeat(now + 0.5 * m.hb_s, now)  # within the interval it may still register again
    assert m.registry.get(b"s1").live
    m.connected(b"s1", 9)  # it did, over a new socket: alive, nothing moves
    m.heartbeat(now + 1.5 * m.hb_s, now)
    assert m.registry.get(b"s1").live and m.registry.get(b"sb").state == STANDBY
    m.on_disconnect(7)
    m.heartbeat(now + 3.0 * m.hb_s, now)  # well within the silence timeout: the close decides
    assert m.registry.get(b"s0") is None and m.registry.get(b"sb").first == 0


def test_registrations_beyond_max_stages_are_busy_not_fatal(bus, file_digests):
    m, w = bus
    m.max_stages = 2
    _register(m, file_digests, b"s0", 0, 14)
    _register(m, file_digests, b"s1", 15, 29)
    with pytest.raises(P.ProtocolError) as e:
        _register(m, file_digests, b"sb", standby=True)
    assert e.value.code == P.E_BUSY and b"sb" not in m.registry.nodes
