"""The wire protocol's one source of truth: message types, their fields, framing and validation.

See docs/protocol.md. Every peer (bus, stage, client) encodes with `encode` and decodes with
`decode`, which validates the header and the buffer lengths before anything else looks at it.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lz4.block
import msgpack

VERSION = 1

# Message types. Stage <-> bus.
REGISTER = "register"
ASSIGN = "assign"
HEARTBEAT = "heartbeat"
OPEN = "open"
CLOSE = "close"
ACT = "act"
TOKENS = "tokens"
ERROR = "error"
# Client <-> bus.
HELLO = "hello"
WELCOME = "welcome"
GENERATE = "generate"
TOKEN = "token"
DONE = "done"
CANCEL = "cancel"
SESSION_OPEN = "session_open"
OPENED = "opened"
SESSION_CLOSE = "session_close"
CLOSED = "closed"
SCORE = "score"
SCORED = "scored"
# bus -> client, asked for with generate's "progress": prefill tokens done of a long prompt
PROGRESS = "progress"
STATUS = "status"
CLUSTER = "cluster"
# Published on the bus's PUB socket under STATS_TOPIC, every stats_interval_ms.
STATS = "stats"
STATS_TOPIC = b"stats"

# Error codes (docs/protocol.md, "Validation").
E_BAD_FRAME = "bad_frame"
E_VERSION = "version"
E_UNKNOWN_TYPE = "unknown_type"
E_MISSING = "missing_field"
E_BAD_FIELD = "bad_field"
E_BUFFER = "buffer_length"
E_TOO_LARGE = "too_large"
E_UNKNOWN_SESSION = "unknown_session"
E_LAYER = "layer_range"
E_NOT_REGISTERED = "not_registered"
E_FINGERPRINT = "fingerprint"
E_OVERLAP = "overlap"
E_NOT_READY = "not_ready"
E_CONTEXT = "context_full"
E_BUSY = "busy"
E_ENGINE = "engine"
# A CURVE peer whose key role (stage or client) may not send this message type.
E_FORBIDDEN = "forbidden"
# A stage's activation or result for work the bus did not give it (bus/trust.py).
E_REFUSED = "refused"
# Raised by clients (never sent): the bus answering them is a new process that lost their sessions.
E_BUS_RESTARTED = "bus_restarted"
# Raised by clients (never sent): the bus fell silent, so the client dropped its connection.
E_DISCONNECTED = "disconnected"

DTYPES = ("f32", "f16", "q8_0")
WIRE_DTYPES = DTYPES
OUT_KINDS = ("sample", "score", "none")
# Alternatives a `sample` step may ask for with its token (`k`), as OpenAI's top_logprobs allows;
# `score` steps (a whole prompt's rows) may ask for up to MAX_SCORE_K.
MAX_SAMPLE_K = 20
MAX_SCORE_K = 1000
# Token ids and positions are below this (int32 on the stages).
ID_LIMIT = 1 << 31
# A step id is the bus's counter; a session id the bus's 12 hex digits (longer ones are made up).
STEP_ID_LIMIT = 1 << 63
MAX_SID_CHARS = 64

_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_LIST = (list, tuple)
_MAP = (dict,)
_BOOL = (bool,)
_ANY = (object,)

# The cluster as the bus sees it (bus/stats.py): the body of `stats` and of `cluster`.
_CLUSTER_STATE: dict[str, tuple[tuple[type, ...], bool]] = {
    "ready": (_BOOL, True), "problems": (_LIST, True), "n_layers": (_INT, True), "nodes": (_LIST, True),
    "sessions": (_LIST, True), "model": (_MAP, True), "totals": (_MAP, True), "counters": (_MAP, True),
    "t": (_NUM, True)}

# type -> {field: (accepted python types, required)}. "v" and "type" are implied.
SCHEMAS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    REGISTER: {"name": (_STR, True), "first": (_INT, True), "last": (_INT, True),
               "n_layers": (_INT, True), "fingerprint": (_STR, True), "host": (_STR, True),
               "pid": (_INT, True), "rss": (_INT, True), "threads": (_INT, True),
               "wire": (_STR, True), "state": (_STR, True), "max_ram": (_INT, False),
               "standby": (_BOOL, False),
               "resume": (_STR, False),
               "place": (_BOOL, False), "speed": (_NUM, False), "kv_type": (_STR, False),
               # {tensor name: xxh3_128 hex} of every tensor its range uses (model/digests.py).
               "digests": (_MAP, False)},
    ASSIGN: {"node": (_STR, True), "first": (_INT, True), "last": (_INT, True),
             "heartbeat_ms": (_INT, True), "liveness": (_INT, True),
             "resume": (_STR, False)},
    HEARTBEAT: {"t": (_NUM, True), "state": (_STR, False), "stats": (_MAP, False), "boot": (_STR, False),
                "sids": (_LIST, False),
                # A stage that loaded a range the bus assigned: that range's digests, as in register.
                "digests": (_MAP, False)},
    OPEN: {"sid": (_STR, True)},
    CLOSE: {"sid": (_STR, True)},
    ACT: {"layer": (_INT, True), "dtype": (_STR, True), "shape": (_LIST, True),
          "segs": (_LIST, True), "ct": (_NUM, False)},
    TOKENS: {"results": (_LIST, True), "ct": (_NUM, False), "q": (_INT, False)},
    ERROR: {"code": (_STR, True), "msg": (_STR, True), "sid": (_STR, False),
            "req": (_INT, False), "fatal": (_BOOL, False)},
    HELLO: {"name": (_STR, False)},
    WELCOME: {"model": (_MAP, True), "stats_port": (_INT, True), "heartbeat_ms": (_INT, False),
              "liveness": (_INT, False), "stats_interval_ms": (_INT, False), "boot": (_STR, False)},
    GENERATE: {"req": (_INT, True), "sid": (_STR, False), "ids": (_LIST, False),
               "text": (_STR, False), "messages": (_LIST, False), "params": (_MAP, False),
               "max_tokens": (_INT, False), "stop_ids": (_LIST, False), "stream": (_BOOL, False),
               "logprobs": (_INT, False), "progress": (_BOOL, False)},
    TOKEN: {"req": (_INT, True), "sid": (_STR, True), "id": (_INT, True), "pos": (_INT, True),
            "text": (_STR, True), "lp": (_NUM, False), "top": (_LIST, False)},
    DONE: {"req": (_INT, True), "sid": (_STR, True), "stop": (_STR, True), "ids": (_LIST, True),
           "text": (_STR, True), "n_prompt": (_INT, True), "timings": (_MAP, True)},
    CANCEL: {"sid": (_STR, True)},
    SESSION_OPEN: {"req": (_INT, True), "params": (_MAP, False)},
    OPENED: {"req": (_INT, True), "sid": (_STR, True)},
    SESSION_CLOSE: {"sid": (_STR, True), "req": (_INT, False)},
    CLOSED: {"sid": (_STR, True), "req": (_INT, False)},
    SCORE: {"req": (_INT, True), "top_k": (_INT, True), "ids": (_LIST, False), "text": (_STR, False)},
    SCORED: {"req": (_INT, True), "positions": (_LIST, True)},
    PROGRESS: {"req": (_INT, True), "sid": (_STR, True), "done": (_INT, True), "total": (_INT, True)},
    STATUS: {"req": (_INT, True)},
    CLUSTER: {"req": (_INT, True), **_CLUSTER_STATE},
    STATS: _CLUSTER_STATE,
}

# Which peer may send which type to the bus (anything else is `unknown_type` for that peer).
STAGE_TO_BUS = frozenset({REGISTER, HEARTBEAT, ACT, TOKENS, ERROR})
CLIENT_TO_BUS = frozenset({HELLO, GENERATE, CANCEL, SESSION_OPEN, SESSION_CLOSE, SCORE, STATUS,
                           HEARTBEAT, ERROR})
BUS_TO_STAGE = frozenset({ASSIGN, HEARTBEAT, OPEN, CLOSE, ACT, ERROR})

# Bounds that hold whatever the configuration says (a header is small; ids and results are
# lz4-compressed above lz4_min_bytes).
MAX_HEADER_BYTES = 4 << 20
MAX_FRAMES = 4


def stats_address(bus_addr: str, stats_port: int | None = None, connect: bool = True) -> str:
    """The PUB address of the bus at `bus_addr` (tcp://HOST:PORT): the same host, port
    `stats_port` (as a welcome states it; default PORT + 1). To connect to (`connect`), a
    wildcard host means this machine; to bind, it stays a wildcard."""
    from urllib.parse import urlsplit

    parts = urlsplit(bus_addr)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "tcp" or port is None:
        raise ValueError(f"bus address {bus_addr!r} is not tcp://HOST:PORT")
    host = parts.netloc.rpartition(":")[0]
    if connect and host.strip("[]") in ("*", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"tcp://{host}:{stats_port or port + 1}"


class ProtocolError(Exception):
    """A message that fails validation; `code` is one of the E_* codes."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def _is_int(v: Any) -> bool:
    # bool is an int in Python; a bool where an int is expected is a type error on the wire.
    return isinstance(v, int) and not isinstance(v, bool)


_JUST_INT = frozenset({int})


def _token_ids(v: Any) -> bool:
    if not isinstance(v, list):
        return False
    if not v:
        return True
    if _JUST_INT.issuperset(map(type, v)):  # the usual case, checked in C: a step's ids are plain ints
        return 0 <= min(v) and max(v) < ID_LIMIT
    return all(_is_int(i) and 0 <= i < ID_LIMIT for i in v)


@dataclass(frozen=True, slots=True)
class Step:
    """One session's consecutive tokens sent through the pipeline: the unit of work the bus
    schedules, a stage batches with other sessions' steps, and the last stage answers.

    On the wire it is a segment of an `act` message (docs/protocol.md, "Activations"), with the
    short keys in brackets. Constructing one checks every field (ProtocolError, `bad_field`), so a
    Step that exists is well formed: `from_wire` is how a receiver gets one from untrusted input.
    """
    sid: str  # ["sid"] the session
    pos: int  # ["pos"] position of ids[0] in the session's context
    ids: list[int]  # ["ids"] the tokens at pos, pos + 1, ...
    step_id: int  # ["q"] the bus's number for this step; the result (or a stage's error) names it
    out: str = "none"  # ["out"] what the last stage returns: one of OUT_KINDS
    # ["k"] sample: also the sampled token's log-probability and the top_k likeliest ids' (1..20);
    # score: the top_k likeliest ids of every row (1..1000). None: not asked.
    top_k: int | None = None
    next_id: int | None = None  # ["nx"] score: the id after ids[-1], so the last row is scored too
    params: dict[str, int | float] | None = None  # ["p"] sampling settings, from now on for the session
    # ["r"] sample, with a repeat penalty: the ids before pos that the penalty looks back on (the
    # bus owns each session's history; a stage keeps none).
    recent: list[int] | None = None

    def __post_init__(self) -> None:
        # Run for every step a peer receives, on the path of each token: the checks are plain
        # expressions, and an error message is built only when one fails.
        sid, pos, ids, q = self.sid, self.pos, self.ids, self.step_id
        if not isinstance(sid, str) or not 0 < len(sid) <= MAX_SID_CHARS:
            raise self._bad(f"'sid' must be a string of 1..{MAX_SID_CHARS} characters")
        if not _is_int(pos) or not 0 <= pos < ID_LIMIT:
            raise self._bad(f"'pos' {pos!r} is not a position (0..2^31-1)")
        if not ids or not _token_ids(ids):
            raise self._bad("'ids' must be a non-empty list of token ids (0..2^31-1)")
        if pos + len(ids) > ID_LIMIT:
            raise self._bad("'pos' + len('ids') beyond 2^31")
        if not _is_int(q) or not 0 <= q < STEP_ID_LIMIT:
            raise self._bad(f"'q' {q!r} is not a step id (0..2^63-1)")
        if self.out not in OUT_KINDS:
            raise self._bad(f"'out' {self.out!r} is not one of {OUT_KINDS}")
        if self.top_k is not None:
            limit = MAX_SAMPLE_K if self.out == "sample" else MAX_SCORE_K
            if not _is_int(self.top_k) or not 0 < self.top_k <= limit:
                raise self._bad(f"'k' {self.top_k!r}: a {self.out} step's 'k' must be in 1..{limit}")
        if self.next_id is not None and not (_is_int(self.next_id) and 0 <= self.next_id < ID_LIMIT):
            raise self._bad(f"'nx' {self.next_id!r} is not a token id")
        if self.params is not None:
            if not isinstance(self.params, dict) or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v) for k, v in self.params.items()):
                raise self._bad("'p' must map sampling setting names to finite numbers")
        if self.recent is not None and not _token_ids(self.recent):
            raise self._bad("'r' must be a list of token ids")

    def _bad(self, msg: str) -> ProtocolError:
        who = f"session {self.sid!r}" if isinstance(self.sid, str) else "a step"
        return ProtocolError(E_BAD_FIELD, f"act: {who}: {msg}")

    @property
    def end(self) -> int:
        """The position after the step's last token (where a sampled token goes)."""
        return self.pos + len(self.ids)

    def to_wire(self) -> dict[str, Any]:
        """The step as an `act` segment (optional fields only when set)."""
        d: dict[str, Any] = {"sid": self.sid, "pos": self.pos, "ids": self.ids, "q": self.step_id, "out": self.out}
        if self.top_k is not None:
            d["k"] = self.top_k
        if self.next_id is not None:
            d["nx"] = self.next_id
        if self.params is not None:
            d["p"] = self.params
        if self.recent is not None:
            d["r"] = self.recent
        return d

    @classmethod
    def from_wire(cls, seg: Any) -> Step:
        """A step from an `act` segment as decoded; ProtocolError (`bad_field`) if malformed.
        Unknown keys are ignored (a newer bus may add some)."""
        if isinstance(seg, Step):
            return seg
        if not isinstance(seg, dict):
            raise ProtocolError(E_BAD_FIELD, "act: a segment is not a map")
        for name in ("sid", "pos", "ids", "q"):
            if name not in seg:
                raise ProtocolError(E_BAD_FIELD, f"act: segment field {name!r} missing")
        ids, recent = seg["ids"], seg.get("r")
        return cls(sid=seg["sid"], pos=seg["pos"], ids=list(ids) if isinstance(ids, (list, tuple)) else ids,
                   step_id=seg["q"], out=seg.get("out", "none"), top_k=seg.get("k"), next_id=seg.get("nx"),
                   params=seg.get("p"),
                   recent=list(recent) if isinstance(recent, (list, tuple)) else recent)


def _packable(obj: Any) -> Any:
    """msgpack's hook for what it cannot pack itself: a Step travels as its wire form."""
    if isinstance(obj, Step):
        return obj.to_wire()
    raise TypeError(f"cannot send a {type(obj).__name__} in a message")


def row_bytes(dtype: str, dim: int) -> int:
    """Bytes of one activation row of `dim` values in wire format `dtype`."""
    if dtype == "f32":
        return 4 * dim
    if dtype == "f16":
        return 2 * dim
    if dtype == "q8_0":
        return 34 * (dim // 32)
    raise ProtocolError(E_BAD_FIELD, f"unknown dtype {dtype!r}")


def encode(header: dict[str, Any], buffers: Sequence[Any] = (), lz4_min_bytes: int = 4096) -> list[Any]:
    """Frames of a message: the msgpack header (lz4-compressed when large) and raw buffers."""
    body = dict(header)
    body["v"] = VERSION
    packed = msgpack.packb(body, use_bin_type=True, default=_packable)
    if lz4_min_bytes and len(packed) > lz4_min_bytes:
        rest = {k: v for k, v in body.items() if k not in ("v", "type")}
        packed = msgpack.packb({"v": VERSION, "type": body["type"],
                                "z": lz4.block.compress(msgpack.packb(rest, use_bin_type=True,
                                                                      default=_packable))},
                               use_bin_type=True)
    return [packed, *buffers]


def _buffer_len(frame: Any) -> int:
    return len(frame.buffer) if hasattr(frame, "buffer") else len(frame)


def _frame_bytes(frame: Any) -> bytes | memoryview:
    return frame.buffer if hasattr(frame, "buffer") else frame


def decode(frames: Sequence[Any], max_bytes: int = 64 << 20,
           max_inflated: int = MAX_HEADER_BYTES * 8) -> tuple[dict[str, Any], list[Any]]:
    """Validate and decode frames (bytes or zmq.Frame) into (header, buffers). Raises ProtocolError.

    A compressed header may inflate to at most `max_inflated` bytes: decoding costs time in
    proportion, so a receiver bounds it by what the sender may legitimately send."""
    if not frames:
        raise ProtocolError(E_BAD_FRAME, "empty message")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(E_BAD_FRAME, f"{len(frames)} frames (at most {MAX_FRAMES})")
    raw = _frame_bytes(frames[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(E_TOO_LARGE, f"header of {len(raw)} bytes (at most {MAX_HEADER_BYTES})")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(E_BAD_FRAME, f"frame 0 is not msgpack: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError(E_BAD_FRAME, "frame 0 is not a msgpack map")
    if header.get("v") != VERSION:
        raise ProtocolError(E_VERSION, f"protocol version {header.get('v')!r}, expected {VERSION}")
    mtype = header.get("type")
    if not isinstance(mtype, str) or mtype not in SCHEMAS:
        raise ProtocolError(E_UNKNOWN_TYPE, f"unknown message type {mtype!r}")
    if "z" in header:
        header = _inflate(header, min(max_bytes, max_inflated))
    validate(header)
    buffers = list(frames[1:])
    _check_buffers(header, buffers)
    return header, buffers


def _inflate(header: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    z = header["z"]
    if not isinstance(z, bytes) or len(z) < 4:
        raise ProtocolError(E_BAD_FIELD, "field 'z' is not an lz4 block")
    (size,) = struct.unpack_from("<I", z)
    # Checked before decompressing, so that a forged size cannot make us allocate gigabytes.
    if size > max_bytes:
        raise ProtocolError(E_TOO_LARGE, f"compressed header claims {size} bytes")
    try:
        rest = msgpack.unpackb(lz4.block.decompress(z), raw=False, strict_map_key=True)
    except Exception as e:
        raise ProtocolError(E_BAD_FIELD, f"field 'z' does not decompress: {type(e).__name__}") from None
    if not isinstance(rest, dict):
        raise ProtocolError(E_BAD_FIELD, "field 'z' is not a map")
    rest.pop("v", None)
    rest.pop("type", None)
    return {"v": header["v"], "type": header["type"], **rest}


def validate(header: dict[str, Any]) -> None:
    """Check presence and types of a decoded header's fields (and the shape of act/tokens).
    An `act`'s segments are replaced by the Steps they describe."""
    mtype = header["type"]
    for name, (types, required) in SCHEMAS[mtype].items():
        if name not in header or header[name] is None:
            if required:
                raise ProtocolError(E_MISSING, f"{mtype}: missing field {name!r}")
            continue
        value = header[name]
        # bool is an int in Python; a bool where an int is expected is a type error on the wire.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ProtocolError(E_BAD_FIELD, f"{mtype}: field {name!r} has type {type(value).__name__}")
    if mtype == ACT:
        _validate_act(header)
    elif mtype in (STATS, CLUSTER):
        if not all(isinstance(n, dict) for n in header["nodes"]):
            raise ProtocolError(E_BAD_FIELD, f"{mtype}: each node is a map")
    elif mtype == TOKENS:
        for r in header["results"]:
            if not isinstance(r, dict) or not isinstance(r.get("sid"), str):
                raise ProtocolError(E_BAD_FIELD, "tokens: each result needs a 'sid'")
    elif mtype in (GENERATE, SCORE):
        _validate_ids(mtype, header.get("ids"))
        _validate_ids(mtype, header.get("stop_ids"))
        for k, v in (header.get("params") or {}).items():
            if not isinstance(k, str) or not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ProtocolError(E_BAD_FIELD, f"{mtype}: sampling setting {k!r} must be a number")
        if mtype == GENERATE and not 0 <= header.get("logprobs", 0) <= MAX_SAMPLE_K:
            raise ProtocolError(E_BAD_FIELD, f"generate: 'logprobs' must be in 0..{MAX_SAMPLE_K}")
        if mtype == GENERATE and sum(k in header for k in ("ids", "text", "messages")) != 1:
            raise ProtocolError(E_MISSING, "generate: give exactly one of 'ids', 'text', 'messages'")
        if mtype == SCORE and sum(k in header for k in ("ids", "text")) != 1:
            raise ProtocolError(E_MISSING, "score: give exactly one of 'ids', 'text'")


def _validate_ids(mtype: str, ids: Any) -> None:
    if ids is None:
        return
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 31 for i in ids):
        raise ProtocolError(E_BAD_FIELD, f"{mtype}: 'ids' must be non-negative integers")


def _validate_act(h: dict[str, Any]) -> None:
    if h["layer"] < 0:
        raise ProtocolError(E_LAYER, f"act: layer {h['layer']} is negative")
    shape = h["shape"]
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ProtocolError(E_BAD_FIELD, "act: shape must be non-negative integers")
    if not h["segs"]:
        raise ProtocolError(E_BAD_FIELD, "act: no segments")
    # Each segment becomes a Step, which checks its fields (the one place a step is validated).
    h["segs"] = steps = [Step.from_wire(s) for s in h["segs"]]
    total = sum(len(s.ids) for s in steps)
    if h["layer"] == 0:
        if h["dtype"] != "ids" or list(shape) != [total]:
            raise ProtocolError(E_BAD_FIELD, "act: layer 0 takes dtype 'ids' and shape [n tokens]")
    else:
        if h["dtype"] not in DTYPES:
            raise ProtocolError(E_BAD_FIELD, f"act: dtype {h['dtype']!r} not one of {DTYPES}")
        if len(shape) != 2 or shape[0] != total or shape[1] <= 0:
            raise ProtocolError(E_BAD_FIELD, f"act: shape {list(shape)} does not match {total} tokens")
        if h["dtype"] == "q8_0" and shape[1] % 32:
            raise ProtocolError(E_BAD_FIELD, "act: q8_0 needs a dim that is a multiple of 32")


def _check_buffers(h: dict[str, Any], buffers: list[Any]) -> None:
    if h["type"] != ACT:
        if buffers:
            raise ProtocolError(E_BAD_FRAME, f"{h['type']}: carries no buffers, got {len(buffers)}")
        return
    if h["layer"] == 0:
        if buffers:
            raise ProtocolError(E_BUFFER, "act: layer 0 carries ids, not a buffer")
        return
    if len(buffers) != 1:
        raise ProtocolError(E_BUFFER, f"act: expected 1 buffer, got {len(buffers)}")
    n, dim = h["shape"]
    want = n * row_bytes(h["dtype"], dim)
    got = _buffer_len(buffers[0])
    if got != want:
        raise ProtocolError(E_BUFFER, f"act: buffer of {got} bytes, {h['dtype']} {n}x{dim} needs {want}")


def error(code: str, msg: str, **extra: Any) -> dict[str, Any]:
    """An error header (extra: sid, req, fatal)."""
    return {"type": ERROR, "code": code, "msg": msg, **{k: v for k, v in extra.items() if v is not None}}


def monitor_event(sock: Any) -> tuple[int, int]:
    """(event, value) of the next message on a ZeroMQ socket-monitor socket (libzmq's format:
    a 6-byte frame, u16 event and i32 value in native byte order, then the endpoint). Parsed here
    rather than by pyzmq's zmq.utils.monitor, which imports asyncio and ssl (7 MB of a stage)."""
    frames = sock.recv_multipart()
    if len(frames) != 2 or len(frames[0]) != 6:
        raise ValueError(f"not a socket-monitor event: {len(frames)} frames")
    event, value = struct.unpack("=Hi", frames[0])
    return event, value
