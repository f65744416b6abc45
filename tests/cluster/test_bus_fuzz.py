"""Malformed input to the bus and to a stage: an error reply (or a drop) and a counter, never a crash.

Property-based (hypothesis): every malformed message gets an `error` reply naming what is
wrong; afterwards the bus and the stage keep serving, and a generation is still correct.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.cluster_fixtures import TEST_MAX_FRAME, stage_behind_fake_bus

from dair.bus import protocol as P
from dair.bus.client import BusClient
from dair.bus.local import _command

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

_WRONG = {int: "x", str: 5, list: 5, tuple: 5, dict: 5, bool: "x", float: "x", object: None}


def _wrong_value(types: tuple[type, ...]) -> object:
    return _WRONG[types[0]]


@st.composite
def malformed(draw: st.DrawFn, layer_limit: int = 30) -> list[bytes]:
    """One malformed message (frames), of a kind chosen by hypothesis."""
    kind = draw(st.sampled_from(["bytes", "map", "version", "missing", "mistyped", "buffer", "layer",
                                 "frames", "session"]))
    if kind == "bytes":
        return draw(st.lists(st.binary(min_size=0, max_size=200), min_size=1, max_size=3))
    if kind == "map":
        keys = st.text(min_size=1, max_size=8)
        vals = st.one_of(st.integers(-2**63, 2**63 - 1), st.text(max_size=10), st.none(), st.binary(max_size=10))
        d = draw(st.dictionaries(keys, vals, max_size=6))
        d["v"] = draw(st.sampled_from([1, 0, 2, "1", None]))
        d.setdefault("type", draw(st.text(max_size=10)))
        if d["v"] == 1 and d["type"] in P.SCHEMAS:
            d["type"] = "no-such-type"
        return [msgpack.packb(d)]
    if kind == "version":
        return [msgpack.packb({"v": draw(st.integers(-2**63, 2**63 - 1).filter(lambda v: v != 1)), "type": P.STATUS, "req": 1})]
    typ = draw(st.sampled_from(sorted(t for t, s in P.SCHEMAS.items() if any(r for _, r in s.values()))))
    required = [f for f, (_, r) in P.SCHEMAS[typ].items() if r]
    header: dict = {"v": 1, "type": typ, **{f: _wrong_value(P.SCHEMAS[typ][f][0]) for f in required}}
    if kind == "missing":
        header.pop(draw(st.sampled_from(required)))
        return [msgpack.packb(header)]
    if kind == "mistyped":
        return [msgpack.packb(header)]
    seg = {"sid": draw(st.text(min_size=1, max_size=6)), "pos": 0, "ids": [1, 2], "q": 1, "out": "sample"}
    act = {"v": 1, "type": P.ACT, "layer": 3, "dtype": "f32", "shape": [2, 576], "segs": [seg]}
    if kind == "buffer":
        return [msgpack.packb(act), b"\0" * draw(st.integers(0, 5000).filter(lambda n: n != 2 * 576 * 4))]
    if kind == "layer":
        act["layer"] = draw(st.one_of(st.integers(-5, -1), st.integers(layer_limit, 10**6)))
        return [msgpack.packb(act), b"\0" * (2 * 576 * 4)]
    if kind == "frames":
        return [msgpack.packb({"v": 1, "type": P.STATUS, "req": 1})] + [b"x"] * draw(st.integers(1, 6))
    # A well-formed request about a session nobody opened.
    sid = draw(st.text(min_size=1, max_size=12))
    return [msgpack.packb(draw(st.sampled_from([
        {"v": 1, "type": P.CANCEL, "sid": sid},
        {"v": 1, "type": P.SESSION_CLOSE, "sid": sid, "req": 7},
        {"v": 1, "type": P.GENERATE, "sid": sid, "req": 7, "ids": [1, 2, 3], "max_tokens": 1},
    ])))]


def _reply(sock: zmq.Socket, timeout: float = 5.0, skip: tuple[str, ...] = ()) -> dict | None:
    deadline = time.monotonic() + timeout
    while sock.poll(max(0.0, deadline - time.monotonic()) * 1000):
        frames = sock.recv_multipart()
        h, _ = P.decode(frames[-1:] if len(frames) == 1 else frames)
        if h["type"] not in skip:
            return h
    return None


@pytest.fixture(scope="module")
def bus_socket(cluster3):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(cluster3.addr)
    yield s
    s.close()


def test_bus_answers_every_malformed_message_with_an_error(cluster3, bus_socket):
    with BusClient(cluster3.addr) as c:
        before = c.status()["counters"].get("bad_frames", 0)

    @FUZZ
    @given(frames=malformed())
    def check(frames):
        bus_socket.send_multipart(frames)
        reply = _reply(bus_socket)
        assert reply is not None and reply["type"] == P.ERROR, (frames, reply)
        assert reply["code"] in {P.E_BAD_FRAME, P.E_VERSION, P.E_UNKNOWN_TYPE, P.E_MISSING, P.E_BAD_FIELD,
                                 P.E_BUFFER, P.E_LAYER, P.E_NOT_REGISTERED, P.E_UNKNOWN_SESSION,
                                 P.E_TOO_LARGE, P.E_FINGERPRINT}, reply

    check()
    with BusClient(cluster3.addr, timeout=60) as c:
        st_ = c.status()
        assert st_["ready"] and st_["counters"].get("bad_frames", 0) >= before + 100
        done = list(c.generate(ids=[504, 3575, 282, 4649, 314], max_tokens=2, params={"temperature": 0}))[-1]
        assert done["ids"] == [7042, 30]  # " Paris."


def test_bus_drops_huge_frames_and_keeps_serving(cluster3):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(cluster3.addr)
    try:
        s.send_multipart([msgpack.packb({"v": 1, "type": P.STATUS, "req": 1}), b"\0" * (TEST_MAX_FRAME + 1)])
        assert _reply(s, timeout=1.0) is None  # ZeroMQ refused it and dropped the connection
    finally:
        s.close()
    with BusClient(cluster3.addr, timeout=30) as c:
        assert c.status()["ready"]


@pytest.fixture(scope="module")
def lone_stage(default_model, tmp_path_factory):
    """A dair-stage (layer 0 only) connected to a ROUTER played by the test: a fake bus."""
    with stage_behind_fake_bus(default_model, tmp_path_factory.mktemp("lone-stage"), 0) as (router, ident, proc, _):
        yield router, ident, proc


def _stage_reply(router: zmq.Socket, timeout: float = 5.0) -> dict | None:
    deadline = time.monotonic() + timeout
    while router.poll(max(0.0, deadline - time.monotonic()) * 1000):
        _, *frames = router.recv_multipart()
        h, bufs = P.decode(frames)
        if h["type"] != P.HEARTBEAT:
            h["_buffers"] = bufs
            return h
    return None


def test_stage_answers_every_malformed_message_with_an_error(lone_stage):
    router, ident, proc = lone_stage

    @FUZZ
    @given(frames=malformed(layer_limit=1))
    def check(frames):
        router.send_multipart([ident, *frames])
        reply = _stage_reply(router)
        assert reply is not None and reply["type"] == P.ERROR, (frames, reply)

    check()
    assert proc.poll() is None
    # Still serving: embed + layer 0 for a real session, passed on to layer 1.
    router.send_multipart([ident, *P.encode({"type": P.OPEN, "sid": "ok"})])
    seg = {"sid": "ok", "pos": 0, "ids": [504, 3575], "q": 1, "out": "sample"}
    router.send_multipart([ident, *P.encode({"type": P.ACT, "layer": 0, "dtype": "ids", "shape": [2],
                                             "segs": [seg]})])
    out = _stage_reply(router, 30)
    assert out is not None and out["type"] == P.ACT and out["layer"] == 1 and out["shape"] == [2, 576]
    assert np.isfinite(np.frombuffer(out["_buffers"][0], np.float32)).all()
    # A batched step where one session is unknown: the others still get their step.
    segs = [{"sid": "gone", "pos": 0, "ids": [7], "q": 2, "out": "sample"},
            {"sid": "ok", "pos": 2, "ids": [282], "q": 3, "out": "sample"}]
    router.send_multipart([ident, *P.encode({"type": P.ACT, "layer": 0, "dtype": "ids", "shape": [2],
                                             "segs": segs})])
    got = [_stage_reply(router, 30), _stage_reply(router, 30)]
    err = next(g for g in got if g["type"] == P.ERROR)
    out = next(g for g in got if g["type"] == P.ACT)
    assert err["code"] == P.E_UNKNOWN_SESSION and err["sid"] == "gone"
    assert [s.sid for s in out["segs"]] == ["ok"] and out["shape"] == [1, 576]
    # The bad frames are counted in the stage's heartbeat stats.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        _, *frames = router.recv_multipart()
        h, _ = P.decode(frames)
        if h["type"] == P.HEARTBEAT:
            assert h["stats"]["bad_frames"] >= 100
            break
    else:
        pytest.fail("no heartbeat from the stage")


def test_stage_refuses_layers_beyond_the_model(default_model):
    r = subprocess.run(_command("dair-stage", "dair.stages.main") + [
        "--layers", "20-40", "--model", str(default_model), "--bus", "tcp://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "20-40" in r.stderr and "30 layers (0-29)" in r.stderr


def test_bus_refuses_a_different_model_file_and_foreign_ranges(cluster3, default_model, tmp_path):
    # A copy with one byte of metadata changed (the model's name): same layout, another fingerprint.
    data = bytearray(Path(default_model).read_bytes())
    i = data.index(b"Smollm2 135M")
    data[i] = ord("X")
    other = tmp_path / "other.gguf"
    other.write_bytes(bytes(data))
    r = subprocess.run(_command("dair-stage", "dair.stages.main") + [
        "--layers", "0-9", "--model", str(other), "--bus", cluster3.addr, "--threads", "1"],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "refused" in r.stderr and "different model file" in r.stderr
    # A hand-written registration beyond the model, and one overlapping a live stage.
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(cluster3.addr)
    try:
        with BusClient(cluster3.addr) as c:
            fp = c.hello()["model"]["fingerprint"]
        reg = {"type": P.REGISTER, "name": "liar", "n_layers": 30, "fingerprint": fp, "host": "h", "pid": 1,
               "rss": 0, "threads": 1, "wire": "f32", "state": "ready"}
        s.send_multipart(P.encode({**reg, "first": 25, "last": 35}))
        reply = _reply(s)
        assert reply["code"] == P.E_LAYER and reply["fatal"] and "0-29" in reply["msg"]
        s.send_multipart(P.encode({**reg, "first": 5, "last": 12}))
        reply = _reply(s)
        assert reply["code"] == P.E_OVERLAP and "layers 0-9" in reply["msg"]
    finally:
        s.close()
    with BusClient(cluster3.addr) as c:
        assert c.status()["ready"]
