"""Hostile input: thousands of malformed frames on every socket, and bounded pending work.

The fuzz runs send DAIR_FUZZ_EXAMPLES malformed messages (default 2000) to each target: the bus
ROUTER as a client, the bus ROUTER as a registered stage identity, a stage (through the ROUTER
the stage connects to, i.e. whatever a bus could forward), and the stats PUB socket (an XSUB
sending arbitrary frames upstream, plus raw TCP garbage on both ports). Messages go in batches
of BATCH without reconnecting; every one must get exactly one reply (an `error`), or, where the
protocol says it is dropped, show up in a counter. Afterwards both still serve, and a greedy
generation gives the in-process engine's tokens.
"""
from __future__ import annotations

import math
import os
import socket
import struct
import time

import lz4.block
import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.cluster_fixtures import TEST_CONFIG, stage_behind_fake_bus, start_cluster, stop_cluster

from dair.bus import protocol as P
from dair.bus.client import BusClient
from dair.engine.sampling import SamplingParams

EXAMPLES = int(os.environ.get("DAIR_FUZZ_EXAMPLES", "2000"))
BATCH = 25
FUZZ = settings(max_examples=max(1, EXAMPLES // BATCH), deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck), database=None)
DIM, N_LAYERS = 576, 30
PROMPT = [504, 3575, 282, 4649, 314]
ERROR_CODES = {P.E_BAD_FRAME, P.E_VERSION, P.E_UNKNOWN_TYPE, P.E_MISSING, P.E_BAD_FIELD, P.E_BUFFER,
               P.E_TOO_LARGE, P.E_UNKNOWN_SESSION, P.E_LAYER, P.E_NOT_REGISTERED, P.E_FINGERPRINT,
               P.E_CONTEXT, P.E_BUSY, P.E_REFUSED}

INTS = st.one_of(st.integers(-2**63, 2**64 - 1), st.sampled_from([-1, 0, 1, 2**31, 2**32, -2**31]))
ANY = st.recursive(st.one_of(st.none(), st.booleans(), INTS, st.floats(), st.text(max_size=8),
                             st.binary(max_size=8)),
                   lambda inner: st.one_of(st.lists(inner, max_size=3),
                                           st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                   max_leaves=8)


def _nested(depth: int) -> bytes:
    # msgpack nesting far beyond the unpacker's stack (array of one array of ...).
    return b"\x91" * depth + b"\xc0"


def _z(size: int, payload: bytes = b"") -> bytes:
    return struct.pack("<I", size) + payload


@st.composite
def malformed(draw: st.DrawFn, for_stage: bool = False) -> list[bytes]:
    """One message that is wrong in a way chosen by hypothesis (never a valid one)."""
    kind = draw(st.sampled_from(["bytes", "map", "version", "missing", "mistyped", "nested", "z",
                                 "buffer", "dtype", "shape", "layer", "frames", "negative", "nan",
                                 "huge", "session", "type"]))
    typ = draw(st.sampled_from(sorted(t for t, s in P.SCHEMAS.items() if any(r for _, r in s.values()))))
    required = [f for f, (_, r) in P.SCHEMAS[typ].items() if r]
    seg = {"sid": draw(st.text(min_size=1, max_size=6)), "pos": 0, "ids": [1, 2], "q": 1, "out": "sample"}
    act = {"v": 1, "type": P.ACT, "layer": 29 if for_stage else 3, "dtype": "f32", "shape": [2, DIM],
           "segs": [seg]}
    good_buf = b"\0" * (2 * DIM * 4)
    if kind == "bytes":
        return draw(st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=4))
    if kind == "map":
        d = draw(st.dictionaries(st.text(min_size=1, max_size=8), ANY, max_size=6))
        d["v"] = 1
        d["type"] = draw(st.text(max_size=10).filter(lambda t: t not in P.SCHEMAS))
        return [msgpack.packb(d)]
    if kind == "version":
        v = draw(st.one_of(INTS.filter(lambda v: v != 1), st.none(), st.text(max_size=3),
                          st.floats().filter(lambda v: v != 1)))
        return [msgpack.packb({"v": v, "type": P.STATUS, "req": 1})]
    if kind == "type":
        return [msgpack.packb({"v": 1, "type": draw(st.one_of(INTS, st.binary(max_size=5), st.none(),
                                                               st.lists(st.text(max_size=3), max_size=2)))})]
    if kind == "missing":
        header = {"v": 1, "type": typ, **{f: draw(ANY) for f in required}}
        header.pop(draw(st.sampled_from(required)))
        return [msgpack.packb(header)]
    if kind == "mistyped":
        wrong = {int: "x", str: 5, list: 5, dict: [1], bool: "x", float: "x"}
        header = {"v": 1, "type": typ, **{f: wrong[P.SCHEMAS[typ][f][0][0]] for f in required}}
        return [msgpack.packb(header)]
    if kind == "nested":
        return [draw(st.sampled_from([_nested(3000), _nested(100_000),
                                      msgpack.packb({"v": 1, "type": P.STATUS, "req": 1})[:-1] + b"\xdd\xff\xff\xff\xff"]))]
    if kind == "z":
        # Compressed headers: a forged size, garbage, or a block that inflates to a non-map.
        z = draw(st.sampled_from([_z(2**32 - 1), _z(1 << 30), b"\x01", _z(20, b"garbage"),
                                  lz4.block.compress(msgpack.packb([1, 2, 3])),
                                  lz4.block.compress(msgpack.packb({"req": "x"})), b"", 5]))
        return [msgpack.packb({"v": 1, "type": P.STATUS, "z": z})]
    if kind == "buffer":
        n = draw(st.integers(0, 3 * len(good_buf)).filter(lambda n: n != len(good_buf)))
        return [msgpack.packb(act), b"\x7f" * n]
    if kind == "dtype":
        act["dtype"] = draw(st.sampled_from(["f64", "int8", "", "q4_0", "ids", "F32"]))
        return [msgpack.packb(act), good_buf]
    if kind == "shape":
        act["shape"] = draw(st.sampled_from([[2], [2, DIM, 1], [3, DIM], [2, -DIM], [2, 0], [-2, DIM],
                                             [2**40, DIM], [2, 2**62], [2, 33], [2, "x"], [2, 1.5]]))
        if act["shape"] == [2, 33]:
            act["dtype"] = "q8_0"
        return [msgpack.packb(act), good_buf]
    if kind == "layer":
        act["layer"] = draw(st.one_of(st.integers(-2**63, -1), st.integers(N_LAYERS, 2**63 - 1)))
        return [msgpack.packb(act), good_buf]
    if kind == "frames":
        return [msgpack.packb({"v": 1, "type": P.STATUS, "req": 1})] + [b"x"] * draw(st.integers(1, 40))
    if kind == "negative":
        seg[draw(st.sampled_from(["pos", "q"]))] = -draw(st.integers(1, 2**63))
        bad = draw(st.sampled_from([{**act, "segs": [{**seg, "pos": -1}]},
                                    {**act, "segs": [{**seg, "ids": [-5, 1]}]},
                                    {**act, "segs": [{**seg, "k": -3, "out": "score"}]},
                                    {**act, "segs": []},
                                    {"v": 1, "type": P.GENERATE, "req": 1, "ids": [-1, 2]},
                                    {"v": 1, "type": P.GENERATE, "req": 1, "ids": [1 << 40]},
                                    {"v": 1, "type": P.SCORE, "req": 1, "top_k": -1, "ids": [1, 2]},
                                    {"v": 1, "type": P.GENERATE, "req": 1, "ids": [1], "stop_ids": [-1]}]))
        return [msgpack.packb(bad), good_buf] if bad["type"] == P.ACT else [msgpack.packb(bad)]
    if kind == "nan":
        f = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        bad = draw(st.sampled_from([{**act, "segs": [{**seg, "pos": f}]},
                                    {**act, "layer": f},
                                    {**act, "shape": [2, f]},
                                    {"v": 1, "type": P.GENERATE, "req": f, "ids": [1, 2]},
                                    {"v": 1, "type": P.GENERATE, "req": 1, "ids": [1, f]},
                                    {"v": 1, "type": P.GENERATE, "req": 1, "ids": PROMPT,
                                     "params": {"temperature": math.nan}},
                                    {"v": 1, "type": P.GENERATE, "req": 1, "ids": PROMPT,
                                     "params": {"repeat_penalty": math.nan}},
                                    {"v": 1, "type": P.GENERATE, "req": 1, "ids": PROMPT,
                                     "params": {"temperature": math.inf, "top_p": f}}]))
        if for_stage and bad["type"] == P.GENERATE:
            bad = {"v": 1, "type": P.OPEN, "sid": f}
        return [msgpack.packb(bad), good_buf] if bad["type"] == P.ACT else [msgpack.packb(bad)]
    if kind == "huge":
        bad = draw(st.sampled_from([{"v": 1, "type": P.GENERATE, "req": 1, "ids": [1] * 100_000},
                                    {"v": 1, "type": P.SCORE, "req": 2**64 - 1, "top_k": 5},
                                    {**act, "segs": [{**seg, "ids": [1] * 50_000}]}]))
        return [msgpack.packb(bad), good_buf] if bad["type"] == P.ACT else [msgpack.packb(bad)]
    # Well-formed, about a session nobody opened.
    sid = draw(st.text(min_size=1, max_size=12))
    if for_stage:
        return [msgpack.packb({**act, "segs": [{**seg, "sid": "nobody-" + sid}]}), good_buf]
    return [msgpack.packb(draw(st.sampled_from([
        {"v": 1, "type": P.CANCEL, "sid": sid},
        {"v": 1, "type": P.SESSION_CLOSE, "sid": sid, "req": 7},
        {"v": 1, "type": P.GENERATE, "sid": sid, "req": 7, "ids": [1, 2, 3], "max_tokens": 1},
    ])))]


def _replies(sock: zmq.Socket, n: int, timeout: float, router: bool = False,
             skip: tuple[str, ...] = (P.HEARTBEAT, P.ASSIGN)) -> list[dict]:
    """Up to n replies (fewer if none comes within `timeout` of the last)."""
    out: list[dict] = []
    while len(out) < n and sock.poll(timeout * 1000):
        frames = sock.recv_multipart()
        h, bufs = P.decode(frames[1:] if router else frames)
        if h["type"] not in skip:
            h["_buffers"] = bufs
            out.append(h)
    return out


def _dealer(addr: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 0)
    s.setsockopt(zmq.SNDHWM, 0)
    s.connect(addr)
    return s


@pytest.fixture(scope="module")
def reference(local_backend) -> list[int]:
    return local_backend.generate(PROMPT, SamplingParams(temperature=0), 12, set())["ids"]


@pytest.fixture(scope="module")
def cluster(default_model, tmp_path_factory):
    """Its own cluster: the fuzz registers a fake stage, and the bounds are set low to test them."""
    cfg = tmp_path_factory.mktemp("hostile") / "config.toml"
    cfg.write_text(TEST_CONFIG + "max_sessions_per_client = 6\nmax_pending_per_client = 4\n"
                   "max_stages = 5\n")
    c = start_cluster(default_model, [(0, 14), (15, 29)], tmp_path_factory.mktemp("hostile-cluster"),
                      wire="f32", config=cfg)
    yield c
    stop_cluster(c)


def _counters(addr: str) -> dict:
    with BusClient(addr, timeout=30) as c:
        return c.status()["counters"]


def _check_generation(addr: str, reference: list[int]) -> None:
    with BusClient(addr, timeout=60) as c:
        assert c.status()["ready"]
        done = list(c.generate(ids=PROMPT, max_tokens=len(reference), stop_ids=[],
                               params={"temperature": 0}))[-1]
        assert done["type"] == P.DONE and done["ids"] == reference


def test_fuzz_bus_as_client(cluster, reference):
    """DAIR_FUZZ_EXAMPLES (default 2000) malformed messages to the bus ROUTER from one client
    socket, in batches of 25: each gets one `error` reply and is counted in bad_frames."""
    sock = _dealer(cluster.addr)
    before = _counters(cluster.addr).get("bad_frames", 0)
    sent = [0]

    @FUZZ
    @given(batch=st.lists(malformed(), min_size=BATCH, max_size=BATCH))
    def check(batch):
        for frames in batch:
            sock.send_multipart(frames)
        got = _replies(sock, len(batch), 5.0)
        assert len(got) == len(batch), (batch, got)
        for frames, reply in zip(batch, got, strict=True):
            assert reply["type"] == P.ERROR and reply["code"] in ERROR_CODES, (frames, reply)
        sent[0] += len(batch)

    try:
        check()
        # Many frames in one message: refused as a whole, with one reply.
        sock.send_multipart([msgpack.packb({"v": 1, "type": P.STATUS, "req": 1})] + [b"x" * 64] * 20_000)
        got = _replies(sock, 2, 5.0)
        assert [(r["type"], r["code"]) for r in got] == [(P.ERROR, P.E_BAD_FRAME)]
    finally:
        sock.close()
    assert sent[0] >= EXAMPLES * 0.9
    assert _counters(cluster.addr).get("bad_frames", 0) >= before + sent[0] * 0.9
    _check_generation(cluster.addr, reference)


def test_fuzz_bus_as_registered_stage(cluster, reference):
    """DAIR_FUZZ_EXAMPLES (default 2000) malformed messages from a peer registered as a standby
    stage, then 200 NaN activations for steps the bus never sent (refused: a standby was given no
    work; each answered and counted for that peer)."""
    sock = _dealer(cluster.addr)
    with BusClient(cluster.addr) as c:
        fp = c.hello()["model"]["fingerprint"]
    sock.send_multipart(P.encode({"type": P.REGISTER, "name": "fuzzer", "first": -1, "last": -1,
                                  "n_layers": N_LAYERS, "fingerprint": fp, "host": "fuzz", "pid": 424242,
                                  "rss": 0, "threads": 1, "wire": "f32", "state": "standby",
                                  "standby": True}))
    h, _ = P.decode(sock.recv_multipart())
    assert h["type"] == P.ASSIGN and h["first"] == -1
    sent = [0]

    @FUZZ
    @given(batch=st.lists(malformed(), min_size=BATCH, max_size=BATCH))
    def check(batch):
        for frames in batch:
            sock.send_multipart(frames)
        got = _replies(sock, len(batch), 5.0)
        assert len(got) == len(batch), (batch, got)
        assert all(r["type"] == P.ERROR and r["code"] in ERROR_CODES for r in got), got
        sent[0] += len(batch)
        sock.send_multipart(P.encode({"type": P.HEARTBEAT, "t": time.time(), "state": "standby"}))

    try:
        check()
        # Activations for steps the bus never sent (a stage making them up) are refused and counted.
        refused0 = _counters(cluster.addr).get("stage_refused", 0)
        for i in range(200):
            seg = {"sid": f"s{i}", "pos": 0, "ids": [1, 2], "q": i, "out": "sample"}
            buf = np.full((2, DIM), np.nan, np.float32).tobytes()
            sock.send_multipart(P.encode({"type": P.ACT, "layer": 15, "dtype": "f32", "shape": [2, DIM],
                                          "segs": [seg]}, [buf]))
        got = _replies(sock, 200, 5.0)
        assert len(got) == 200 and {(r["type"], r["code"]) for r in got} == {(P.ERROR, P.E_REFUSED)}, got[:3]
        assert _counters(cluster.addr).get("stage_refused", 0) >= refused0 + 200
    finally:
        sock.close()
    _check_generation(cluster.addr, reference)


def test_fuzz_stats_socket_and_raw_tcp(cluster, reference):
    """DAIR_FUZZ_EXAMPLES (default 2000) arbitrary frames sent upstream to the stats PUB (which
    takes only subscriptions), and raw TCP garbage on the ROUTER and PUB ports."""
    stats_addr = P.stats_address(cluster.addr)
    xsub = zmq.Context.instance().socket(zmq.XSUB)
    xsub.setsockopt(zmq.LINGER, 0)
    xsub.connect(stats_addr)

    @FUZZ
    @given(batch=st.lists(st.lists(st.binary(max_size=64), min_size=1, max_size=3), min_size=BATCH,
                          max_size=BATCH))
    def check(batch):
        for frames in batch:
            xsub.send_multipart(frames)

    try:
        check()
        xsub.send(b"\x01" + P.STATS_TOPIC)  # subscribe: the PUB still publishes to us
        assert xsub.poll(10_000)
        assert xsub.recv_multipart()[0] == P.STATS_TOPIC
    finally:
        xsub.close()
    rnd = np.random.default_rng(7)
    for addr in (cluster.addr, stats_addr):
        host, port = addr.removeprefix("tcp://").rsplit(":", 1)
        for n in (0, 1, 10, 64, 4096, 1 << 20):
            with socket.create_connection((host, int(port)), timeout=5) as s:
                try:
                    s.sendall(rnd.bytes(n) if n else b"\xff" + b"\0" * 8 + b"\x7f")
                except OSError:
                    pass  # libzmq hung up on the garbage: what it should do
    _check_generation(cluster.addr, reference)


def test_bus_bounds_sessions_and_pending_requests(cluster, reference):
    """A client flooding requests gets `busy` beyond max_pending_per_client (4 here) and beyond
    max_sessions_per_client (6); the refusals are counted; the bus serves everyone after."""
    busy0 = _counters(cluster.addr).get(P.E_BUSY, 0)
    sock = _dealer(cluster.addr)
    try:
        for i in range(40):
            sock.send_multipart(P.encode({"type": P.GENERATE, "req": i, "ids": PROMPT, "max_tokens": 64,
                                          "stop_ids": [], "stream": False, "params": {"temperature": 0}}))
        got = _replies(sock, 40, 30.0)
        assert len(got) == 40
        busy = [r for r in got if r["type"] == P.ERROR]
        done = [r for r in got if r["type"] == P.DONE]
        assert all(r["code"] == P.E_BUSY for r in busy) and len(busy) >= 40 - 4 * 3, busy[:3]
        assert done and all(r["ids"][:len(reference)] == reference for r in done)
        # Sessions: six open, the seventh refused.
        for i in range(7):
            sock.send_multipart(P.encode({"type": P.SESSION_OPEN, "req": 100 + i}))
        got = _replies(sock, 7, 10.0)
        assert [r["type"] for r in got] == [P.OPENED] * 6 + [P.ERROR] and got[-1]["code"] == P.E_BUSY
        for r in got[:6]:
            sock.send_multipart(P.encode({"type": P.SESSION_CLOSE, "sid": r["sid"], "req": 1}))
        assert [r["type"] for r in _replies(sock, 6, 10.0)] == [P.CLOSED] * 6
    finally:
        sock.close()
    assert _counters(cluster.addr).get(P.E_BUSY, 0) >= busy0 + len(busy) + 1
    _check_generation(cluster.addr, reference)


def test_bus_bounds_registered_stages(cluster, reference):
    """Registrations beyond max_stages (5 here, 2 real stages) are refused with `busy`, not fatal."""
    with BusClient(cluster.addr) as c:
        fp = c.hello()["model"]["fingerprint"]
    socks = [_dealer(cluster.addr) for _ in range(6)]
    try:
        codes = []
        for i, s in enumerate(socks):
            s.send_multipart(P.encode({"type": P.REGISTER, "name": f"sb{i}", "first": -1, "last": -1,
                                       "n_layers": N_LAYERS, "fingerprint": fp, "host": "bounds",
                                       "pid": 5000 + i, "rss": 0, "threads": 1, "wire": "f32",
                                       "state": "standby", "standby": True}))
            r = _replies(s, 1, 5.0, skip=(P.HEARTBEAT,))[0]
            codes.append(r["type"] if r["type"] != P.ERROR else (r["code"], r.get("fatal", False)))
        live = sum(1 for n in _status(cluster.addr)["nodes"] if n["state"] != "dead")
        assert live <= 5 and codes[-1] == (P.E_BUSY, False), codes
    finally:
        for s in socks:
            s.close()
    _check_generation(cluster.addr, reference)


def _status(addr: str) -> dict:
    with BusClient(addr, timeout=30) as c:
        return c.status()


@pytest.fixture(scope="module")
def last_stage(default_model, tmp_path_factory):
    """A dair-stage for the last layer (it samples) connected to a ROUTER played by the test."""
    with stage_behind_fake_bus(default_model, tmp_path_factory.mktemp("hostile-stage"), 29,
                               "[stage]\nmax_queued_acts = 64\n") as fixture:
        yield fixture


def _stage_counters(router: zmq.Socket) -> dict:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and router.poll(1000):
        _, *frames = router.recv_multipart()
        h, _ = P.decode(frames)
        if h["type"] == P.HEARTBEAT:
            return h["stats"]
    pytest.fail("no heartbeat from the stage")


def test_fuzz_stage(last_stage):
    """DAIR_FUZZ_EXAMPLES (default 2000) malformed messages to a stage (whatever a bus could
    forward), in batches of 25, each answered with an `error`; then NaN and infinite activations
    and a flood of 3000 acts; the stage keeps serving and samples deterministically."""
    router, ident, proc, log = last_stage
    sent = [0]

    @FUZZ
    @given(batch=st.lists(malformed(for_stage=True), min_size=BATCH, max_size=BATCH))
    def check(batch):
        for frames in batch:
            router.send_multipart([ident, *frames])
        got = _replies(router, len(batch), 5.0, router=True)
        assert len(got) == len(batch), (batch, got, log.read_text()[-2000:])
        assert all(r["type"] == P.ERROR and r["code"] in ERROR_CODES for r in got), got
        sent[0] += len(batch)

    check()
    assert proc.poll() is None, log.read_text()[-3000:]
    assert sent[0] >= EXAMPLES * 0.9
    # NaN and infinite activations for a real session: a token comes back, no crash.
    router.send_multipart([ident, *P.encode({"type": P.OPEN, "sid": "nan"})])
    for i, fill in enumerate([np.nan, np.inf, -np.inf, 3e38]):
        seg = {"sid": "nan", "pos": 0, "ids": [1, 2], "q": i, "out": "sample", "p": {"temperature": 0.7}}
        router.send_multipart([ident, *P.encode({"type": P.ACT, "layer": 29, "dtype": "f32", "shape": [2, DIM],
                                                 "segs": [seg]}, [np.full((2, DIM), fill, np.float32)])])
        out = _replies(router, 1, 30.0, router=True)
        assert out and out[0]["type"] in (P.TOKENS, P.ERROR), out
    # A flood of acts well beyond max_queued_acts (64): each is answered, memory stays bounded.
    flood = 3000
    for i in range(flood):
        seg = {"sid": f"gone{i}", "pos": 0, "ids": [1], "q": i, "out": "sample"}
        router.send_multipart([ident, *P.encode({"type": P.ACT, "layer": 29, "dtype": "f32",
                                                 "shape": [1, DIM], "segs": [seg]}, [b"\0" * (4 * DIM)])])
    got = _replies(router, flood, 10.0, router=True)
    assert len(got) == flood and {r["code"] for r in got} == {P.E_UNKNOWN_SESSION}
    stats = _stage_counters(router)
    assert stats["bad_frames"] >= sent[0] + flood
    assert stats["rss"] < 2 << 30
    # Still correct: the same last-layer input twice gives the same greedy token.
    router.send_multipart([ident, *P.encode({"type": P.OPEN, "sid": "ok"})])
    x = np.random.default_rng(1).standard_normal((2, DIM)).astype(np.float32)
    toks = []
    for pos in (0, 0):
        seg = {"sid": "ok", "pos": pos, "ids": [1, 2], "q": 9, "out": "sample", "p": {"temperature": 0}}
        router.send_multipart([ident, *P.encode({"type": P.ACT, "layer": 29, "dtype": "f32",
                                                 "shape": [2, DIM], "segs": [seg]}, [x])])
        out = _replies(router, 1, 30.0, router=True)
        assert out and out[0]["type"] == P.TOKENS, out
        toks.append(out[0]["results"][0]["id"])
    assert toks[0] == toks[1] and proc.poll() is None
