"""The wire protocol in isolation: framing, validation, compression, activation formats, tiling."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest

from dair.bus import protocol as P
from dair.bus import wire
from dair.bus.registry import coverage_problems


def act(layer: int = 3, n: int = 2, dim: int = 64, dtype: str = "f32") -> tuple[dict, list]:
    segs = [{"sid": "s", "pos": 0, "ids": list(range(n)), "q": 1, "out": "sample"}]
    x = np.arange(n * dim, dtype=np.float32).reshape(n, dim) / 100
    return {"type": P.ACT, "layer": layer, "dtype": dtype, "shape": [n, dim], "segs": segs}, [wire.pack(x, dtype)]


def roundtrip(header: dict, buffers: list = ()) -> tuple[dict, list]:
    frames = [bytes(memoryview(f).cast("B")) for f in P.encode(header, buffers)]
    return P.decode(frames)


def test_every_type_has_a_schema_and_a_direction():
    directed = P.STAGE_TO_BUS | P.CLIENT_TO_BUS | P.BUS_TO_STAGE
    replies = {P.WELCOME, P.TOKEN, P.PROGRESS, P.DONE, P.OPENED, P.CLOSED, P.SCORED, P.CLUSTER}
    published = {P.STATS}
    assert directed | replies | published == set(P.SCHEMAS)


@pytest.mark.parametrize("dtype", P.DTYPES)
def test_act_roundtrip_and_buffer_length(dtype):
    h, bufs = act(dtype=dtype)
    got, gbufs = roundtrip(h, bufs)
    assert got["layer"] == 3 and got["v"] == P.VERSION
    x = wire.unpack(gbufs[0], dtype, 2, 64)
    assert np.allclose(x, np.arange(128, dtype=np.float32).reshape(2, 64) / 100, atol=0.01)
    with pytest.raises(P.ProtocolError) as e:
        P.decode([P.encode(h)[0], bytes(memoryview(bufs[0]).cast("B"))[:-1]])
    assert e.value.code == P.E_BUFFER


def test_q8_0_is_34_bytes_per_32_values_and_matches_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 576)).astype(np.float32) * 3
    buf = np.asarray(wire.pack(x, "q8_0")).view(np.uint8)
    assert buf.nbytes == 5 * 18 * 34 == P.row_bytes("q8_0", 576) * 5
    ref = wire.quantize_q8_0_np(x)
    assert np.array_equal(wire.dequantize_q8_0_np(buf, 5, 576), wire.dequantize_q8_0_np(ref, 5, 576))
    err = np.abs(wire.unpack(buf, "q8_0", 5, 576) - x).max()
    assert err <= np.abs(x).max() / 127  # half a step of the largest block's scale, with margin


@pytest.mark.parametrize("mutate, code", [
    (lambda h: h.update(v=2), P.E_VERSION),
    (lambda h: h.update(type="nonsense"), P.E_UNKNOWN_TYPE),
    (lambda h: h.pop("layer"), P.E_MISSING),
    (lambda h: h.update(layer="3"), P.E_BAD_FIELD),
    (lambda h: h.update(layer=True), P.E_BAD_FIELD),
    (lambda h: h.update(layer=-1), P.E_LAYER),
    (lambda h: h.update(shape=[3, 64]), P.E_BAD_FIELD),
    (lambda h: h.update(dtype="f64"), P.E_BAD_FIELD),
    (lambda h: h["segs"][0].pop("sid"), P.E_BAD_FIELD),
    (lambda h: h["segs"][0].update(ids=[-1, 2]), P.E_BAD_FIELD),
    (lambda h: h["segs"][0].update(out="logits"), P.E_BAD_FIELD),
])
def test_invalid_act_headers_are_named(mutate, code):
    h, bufs = act()
    mutate(h)
    raw = msgpack.packb({**h, "v": h.get("v", 1)})
    with pytest.raises(P.ProtocolError) as e:
        P.decode([raw, bytes(memoryview(bufs[0]).cast("B"))])
    assert e.value.code == code


def test_garbage_and_too_many_frames():
    for frames in ([b"\xc1"], [b""], [msgpack.packb([1, 2])], [b"x"] * 9, []):
        with pytest.raises(P.ProtocolError) as e:
            P.decode(frames)
        assert e.value.code == P.E_BAD_FRAME


def test_large_headers_are_lz4_compressed_and_bounded():
    ids = [504, 3575, 282, 4649, 314] * 4000
    plain = P.encode({"type": P.GENERATE, "req": 1, "ids": ids}, lz4_min_bytes=0)
    frames = P.encode({"type": P.GENERATE, "req": 1, "ids": ids}, lz4_min_bytes=4096)
    assert len(frames[0]) < len(plain[0]) / 10 and b"z" in frames[0][:40]
    h, _ = P.decode(frames)
    assert h["ids"] == ids
    # A forged size prefix is refused before anything is decompressed.
    bomb = msgpack.packb({"v": 1, "type": P.STATUS, "z": (2**31).to_bytes(4, "little") + b"\0" * 8})
    with pytest.raises(P.ProtocolError) as e:
        P.decode([bomb])
    assert e.value.code == P.E_TOO_LARGE


def test_layer_zero_takes_ids_not_buffers():
    h = {"type": P.ACT, "layer": 0, "dtype": "ids", "shape": [2],
         "segs": [{"sid": "s", "pos": 0, "ids": [5, 6], "q": 1}]}
    assert roundtrip(h)[0]["segs"][0].ids == [5, 6]
    with pytest.raises(P.ProtocolError):
        P.decode([P.encode(h)[0], b"\0" * 8])


def test_coverage_reports_gaps_and_overlaps_by_layer():
    assert coverage_problems([(0, 9), (10, 19), (20, 29)], 30) == []
    assert coverage_problems([(0, 3), (4, 28), (29, 29)], 30) == []
    assert coverage_problems([(0, 9), (20, 29)], 30) == ["layers 10-19 not covered"]
    assert coverage_problems([(0, 12), (10, 29)], 30) == ["layers 10-12 owned by more than one stage"]
    assert coverage_problems([(0, 28)], 30) == ["layer 29 not covered"]
    assert "outside" in coverage_problems([(0, 40)], 30)[0]


def test_monitor_event_reads_a_real_disconnect():
    """P.monitor_event parses libzmq's socket-monitor frames (what pyzmq's zmq.utils.monitor does,
    without its asyncio import) on a real disconnect over TCP."""
    import zmq

    ctx = zmq.Context()
    try:
        router = ctx.socket(zmq.ROUTER)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        mon = router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(b"hi")
        assert router.poll(5000) and router.recv_multipart()[1] == b"hi"
        dealer.close(linger=0)
        assert mon.poll(5000)
        event, value = P.monitor_event(mon)
        assert event == zmq.EVENT_DISCONNECTED and value > 0  # the value is the closed fd
        mon.close(linger=0)
        router.close(linger=0)
    finally:
        ctx.term()


def test_a_step_travels_as_its_wire_form_and_back():
    step = P.Step("s1", 17, [4093, 12], 812, "sample", top_k=3, params={"temperature": 0.5, "seed": 7},
                  recent=[1, 2])
    wire_form = step.to_wire()
    # The short keys of docs/protocol.md ("Activations"), optional ones only when set.
    assert wire_form == {"sid": "s1", "pos": 17, "ids": [4093, 12], "q": 812, "out": "sample", "k": 3,
                         "p": {"temperature": 0.5, "seed": 7}, "r": [1, 2]}
    assert P.Step.from_wire(wire_form) == step and step.end == 19
    assert P.Step("s", 0, [1], 1).to_wire() == {"sid": "s", "pos": 0, "ids": [1], "q": 1, "out": "none"}
    h = {"type": P.ACT, "layer": 0, "dtype": "ids", "shape": [2], "segs": [step]}
    got, _ = roundtrip(h)
    assert got["segs"] == [step]
    # What goes on the wire is plain msgpack: a peer that never saw the class reads the same map.
    assert msgpack.unpackb(P.encode(h, lz4_min_bytes=0)[0])["segs"] == [wire_form]


@pytest.mark.parametrize("change, words", [
    ({"sid": ""}, "'sid'"), ({"sid": 5}, "'sid'"), ({"sid": "x" * 65}, "'sid'"),
    ({"pos": -1}, "'pos'"), ({"pos": 1.5}, "'pos'"), ({"pos": True}, "'pos'"), ({"pos": 1 << 31}, "'pos'"),
    ({"ids": []}, "'ids'"), ({"ids": [1, -2]}, "'ids'"), ({"ids": [1 << 31]}, "'ids'"), ({"ids": "ab"}, "'ids'"),
    ({"q": -1}, "'q'"), ({"q": 1 << 63}, "'q'"), ({"q": "1"}, "'q'"),
    ({"out": "logits"}, "'out'"), ({"k": 0}, "'k'"), ({"k": 21}, "1..20"), ({"k": 2.0}, "'k'"),
    ({"out": "score", "k": 1001}, "1..1000"), ({"nx": -1}, "'nx'"), ({"nx": 1 << 31}, "'nx'"),
    ({"p": [1]}, "'p'"), ({"p": {"temperature": float("nan")}}, "'p'"), ({"p": {"top_k": True}}, "'p'"),
    ({"p": {1: 2}}, "'p'"), ({"r": [-1]}, "'r'"), ({"r": 5}, "'r'"),
    ({"ids": [1, True]}, "'ids'"), ({"ids": [3, 1.0]}, "'ids'"), ({"r": [1, False]}, "'r'"),
    ({"r": [2, 1 << 31]}, "'r'"),
])
def test_a_malformed_step_is_refused_by_name(change, words):
    seg = {"sid": "s1", "pos": 0, "ids": [1, 2], "q": 1, "out": "sample", **change}
    with pytest.raises(P.ProtocolError) as e:
        P.Step.from_wire(seg)
    assert e.value.code == P.E_BAD_FIELD and words in e.value.msg
    if isinstance(seg["sid"], str) and seg["sid"]:
        assert repr(seg["sid"]) in e.value.msg  # the error names the session
    for missing in ("sid", "pos", "ids", "q"):
        with pytest.raises(P.ProtocolError) as e:
            P.Step.from_wire({k: v for k, v in seg.items() if k != missing})
        assert e.value.code == P.E_BAD_FIELD and repr(missing) in e.value.msg
    with pytest.raises(P.ProtocolError):
        P.Step.from_wire([seg])


def test_token_ids_of_an_int_subclass_other_than_bool_still_pass():
    """The plain-int fast path and the element-by-element check agree: an int subclass (not
    bool) is a token id, as it always was."""
    import enum

    class Tok(enum.IntEnum):
        A = 7

    assert P.Step("s", 0, [Tok.A, 2], 1).ids == [Tok.A, 2]
    assert P._token_ids([]) and P._token_ids([0, (1 << 31) - 1]) and not P._token_ids([0, 1 << 31])
