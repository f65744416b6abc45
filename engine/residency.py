"""Which weights of a layer range are in RAM, and bringing the others in from disk in time.

A range whose weights fit the budget (`max_ram`) is *resident*: its pages are advised in once
and stay mapped. Otherwise it *streams* (the AirLLM mode): the range is cut into units (each
layer, then the head when the range has it) and

- as many units as the budget allows are pinned (mapped once, never released);
- the others pass through: while unit u computes, a background thread brings the next
  streamed unit in (`MADV_POPULATE_READ` on the map, or `pread` into one of two reusable
  buffers), and u's pages are dropped after use (`MADV_DONTNEED`, optionally
  `POSIX_FADV_DONTNEED` to drop them from the page cache too).

Why pinning and not an LRU: every token sweeps the units in the same order, and on a cyclic
sweep longer than the cache an LRU always evicts exactly the unit needed soonest (hit rate 0).
A fixed pinned set gets the optimal hit rate (pinned / total) with a predictable RSS.

The budget counts weight bytes held at once: pinned units + the streamed unit computing + the
one being prefetched (when two streamed units do not fit, prefetch waits for the release and
the stream is serial). KV caches, activations and the interpreter are outside it.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dair.errors import DairError
from dair.units import format_bytes

PAGE = mmap.PAGESIZE
MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_POPULATE_READ = 22  # Linux 5.14+: fault the range in synchronously, without touching it

_libc = ctypes.CDLL(None, use_errno=True)  # CDLL calls release the GIL: the worker runs beside the kernels
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.restype = ctypes.c_int

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNIT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int | None) -> int | None:
    """'512M', '2G', '1.5GiB', '100MB', '4096' -> bytes; '' / None / 0 -> None (no budget).

    Suffixes are powers of 1024 whatever their spelling (K, KB, KiB alike), as for RAM
    sizes in `docker --memory` or `ulimit`.
    """
    if text is None:
        return None
    if isinstance(text, int):
        return text or None
    m = _SIZE_RE.match(str(text))
    if not m:
        if not str(text).strip():
            return None
        raise DairError(f"size {text!r}: expected a number with an optional K/M/G/T suffix, e.g. 512M, 2G, 1.5GiB")
    n = int(float(m.group(1)) * _UNIT[m.group(2).lower()])
    return n or None


def _addr(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def _madvise(start: int, end: int, advice: int, outward: bool) -> int:
    """madvise over [start, end) rounded to pages (outward to cover, inward not to touch neighbours)."""
    if outward:
        a, b = start // PAGE * PAGE, -(-end // PAGE) * PAGE
    else:
        a, b = -(-start // PAGE) * PAGE, end // PAGE * PAGE
    if b <= a:
        return 0
    if _libc.madvise(a, b - a, advice) != 0:
        return ctypes.get_errno()
    return 0


def storage_read_bytes() -> int:
    """Bytes this process has caused to be fetched from storage (page-cache misses), /proc/self/io."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Unit:
    """A layer (key = its index in the range) or the head (key = "head"): its map span."""

    key: int | str
    start: int  # address in the map
    end: int
    file_offset: int
    tensors: list[Any]  # the model's Tensor objects
    # The map ranges it covers when not all of start..end (an MoE layer without its experts,
    # which are brought in one by one as the router picks them: Residency.experts).
    spans: list[tuple[int, int]] = field(default_factory=list)
    pinned: bool = False
    state: str = "out"  # out | loading | in
    slot: int = -1  # pread method: which buffer holds it
    weights: Any = None  # pread method: weights over the buffer
    ready: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if not self.spans:
            self.spans = [(self.start, self.end)]

    @property
    def nbytes(self) -> int:
        return sum(b - a for a, b in self.spans)


class Residency:
    """Residency of one RangeEngine's units; `acquire(u)` before computing with unit u, `release(u)` after.

    `method`: "mmap" (populate/drop pages of the read-only map) or "pread" (read into two reusable
    buffers; weights are rebuilt over the buffer). `drop_cache`: also evict released units from the
    page cache, so the next sweep really reads the disk (honest cold figures; costs speed when the
    machine could have cached the file).
    """

    def __init__(self, model: Any, units: list[Unit], max_ram: int | None, method: str = "mmap",
                 drop_cache: bool = False, rebuild: Any = None, expert_spans: list[tuple[int, int]] | None = None,
                 expert_reserve: int = 0) -> None:
        """expert_spans: map ranges of the range's MoE experts (in no unit: streamed one expert at a
        time as the router picks them); expert_reserve: the most expert bytes held at once."""
        if method not in ("mmap", "pread"):
            raise DairError(f"residency method {method!r}: expected mmap or pread")
        self.model, self.units, self.budget = model, units, max_ram
        self.method, self.drop_cache = method, drop_cache
        self._rebuild = rebuild  # (unit, raw_of(tensor)) -> weights over the buffer
        self.expert_spans = list(expert_spans or [])
        self.range_bytes = sum(u.nbytes for u in units) + sum(b - a for a, b in self.expert_spans)
        self.expert_reserve = expert_reserve
        self.mode = "resident" if max_ram is None or self.range_bytes <= max_ram else "streaming"
        self.depth = 0
        self.error: Exception | None = None
        self._stop = False
        self._fd = -1
        self._lock = threading.Condition()
        self._queue: list[int] = []
        self._held: set[int] = set()  # streamed units mapped / in a buffer now
        # statistics
        self.disk_read_bytes = 0
        self.experts_read = 0  # expert FFNs brought in from disk (streaming mode)
        self.expert_bytes_read = 0
        self.read_s = 0.0
        self.wait_s = 0.0
        self.busy_s = 0.0
        self._io0 = storage_read_bytes()
        self._trim()
        if self.mode == "resident":
            for u in units:
                u.pinned, u.state = True, "in"
                u.ready.set()
                for a, b in u.spans:
                    _madvise(a, b, MADV_WILLNEED, outward=True)
            for a, b in self.expert_spans:
                _madvise(a, b, MADV_WILLNEED, outward=True)
            return
        self._plan()
        self._fd = os.open(str(model.path), os.O_RDONLY)
        if method == "pread" and self._streamed:
            size = max(u.end - u.start + PAGE for u in units if not u.pinned)
            self._slots = [_aligned(size) for _ in range(2)]
        for u in units:
            if u.pinned:
                self._populate(u)
                u.state = "in"
                u.ready.set()
        if not self._streamed:  # everything but the experts is pinned: they alone stream
            return
        self._worker = threading.Thread(target=_worker_loop, args=(weakref.ref(self),), daemon=True,
                                        name="dair-prefetch")
        self._worker.start()
        self._request(self._streamed[0])

    def _trim(self) -> None:
        """Unmap what opening the file touched outside this range (header, tokenizer arrays,
        fingerprint samples and the kernel's fault-around of them: 16 MB on the 94 MB default
        model), so that a stage's RSS is its own layers. Re-reading them later just faults again."""
        m = getattr(self.model, "_map", None)
        if m is None or not len(self.units):
            return
        lo, hi = _addr(m), _addr(m) + m.nbytes
        keep = sorted([span for u in self.units for span in u.spans] + self.expert_spans)
        pos = lo
        for a, b in keep:
            _madvise(pos, a, MADV_DONTNEED, outward=False)
            pos = max(pos, b)
        _madvise(pos, hi, MADV_DONTNEED, outward=False)

    # -- planning --------------------------------------------------------------------------
    def _plan(self) -> None:
        budget = int(self.budget or 0) - self.expert_reserve
        biggest = max(self.units, key=lambda u: u.nbytes)
        if budget < biggest.nbytes:
            what = "the head" if biggest.key == "head" else f"layer {biggest.key}"
            raise DairError(f"RAM budget {format_bytes(budget)} is smaller than one unit of this range: "
                            f"{what} needs {format_bytes(biggest.nbytes)} ({biggest.nbytes} bytes)")
        # Pin the biggest units first while what is left still streams within the budget.
        for depth in (1, 0):
            pinned: set[int] = set()
            for idx in sorted(range(len(self.units)), key=lambda i: -self.units[i].nbytes):
                trial = pinned | {idx}
                if self._need(trial, depth) <= budget:
                    pinned = trial
            if self._need(pinned, depth) <= budget:
                self.depth = depth
                break
        for i, u in enumerate(self.units):
            u.pinned = i in pinned
        self._streamed = [i for i, u in enumerate(self.units) if not u.pinned]
        self._next = {s: self._streamed[(k + 1) % len(self._streamed)] for k, s in enumerate(self._streamed)}

    def _need(self, pinned: set[int], depth: int) -> int:
        rest = [self.units[i].nbytes for i in range(len(self.units)) if i not in pinned]
        held = sum(self.units[i].nbytes for i in pinned)
        if not rest:
            return held
        if len(rest) == 1:
            return held + rest[0]
        window = max(rest) if depth == 0 else max(rest[k] + rest[(k + 1) % len(rest)] for k in range(len(rest)))
        return held + window

    # -- the compute thread's side ------------------------------------------------------------
    def acquire(self, idx: int) -> Any:
        """Block until unit idx is in; start bringing the next streamed unit. Returns its weights
        when they live in a buffer (pread method), else None (use the map-backed weights)."""
        u = self.units[idx]
        if u.pinned:
            return None
        if u.state == "out":
            self._request(idx)
        if not u.ready.is_set():
            t0 = time.perf_counter()
            u.ready.wait()
            self.wait_s += time.perf_counter() - t0
        if self.error is not None:
            raise DairError(f"{self.model.path}: reading unit {u.key} failed: {self.error}")
        if self.depth:
            self._request(self._next[idx])
        return u.weights

    def release(self, idx: int) -> None:
        u = self.units[idx]
        if u.pinned:
            return
        with self._lock:
            u.state = "out"
            u.ready.clear()
            self._held.discard(idx)
            u.weights = None
        if self.method == "mmap":
            for a, b in u.spans:
                _madvise(a, b, MADV_DONTNEED, outward=False)
        if self.drop_cache:
            os.posix_fadvise(self._fd, u.file_offset, u.end - u.start, os.POSIX_FADV_DONTNEED)
        if not self.depth:
            self._request(self._next[idx])

    def experts(self, spans: list[tuple[int, int]]) -> None:
        """Bring one expert's matrices (map ranges) in now, before the compute thread uses them;
        `drop(spans)` after. Streaming mode only: a resident range has them mapped already."""
        if self.mode != "streaming":
            return
        t0 = time.perf_counter()
        for a, b in spans:
            if _madvise(a, b, MADV_POPULATE_READ, outward=True):
                _madvise(a, b, MADV_WILLNEED, outward=True)  # older kernels: the compute faults the rest
        dt = time.perf_counter() - t0
        n = sum(b - a for a, b in spans)
        self.read_s += dt
        self.wait_s += dt  # the compute thread waited for it
        self.disk_read_bytes += n
        self.expert_bytes_read += n
        self.experts_read += 1

    def drop(self, spans: list[tuple[int, int]]) -> None:
        if self.mode != "streaming":
            return
        base = _addr(self.model._map)
        for a, b in spans:
            _madvise(a, b, MADV_DONTNEED, outward=False)
            if self.drop_cache:
                os.posix_fadvise(self._fd, a - base, b - a, os.POSIX_FADV_DONTNEED)

    def release_span(self, raw: np.ndarray) -> None:
        """Drop the pages of a tensor touched outside the stream (the embedding rows of a token)."""
        if self.mode == "streaming":
            a = _addr(raw)
            _madvise(a, a + raw.nbytes, MADV_DONTNEED, outward=False)

    def _request(self, idx: int) -> None:
        u = self.units[idx]
        with self._lock:
            if u.state != "out":
                return
            u.state = "loading"
            u.ready.clear()
            self._queue.append(idx)
            self._lock.notify_all()

    # -- the worker's side -------------------------------------------------------------------
    def _populate(self, u: Unit) -> None:
        t0 = time.perf_counter()
        if self.method == "pread" and not u.pinned:
            slot = self._slots[u.slot]
            lo = u.file_offset - (u.start - u.start // PAGE * PAGE)
            n = u.end - u.start // PAGE * PAGE
            view = memoryview(slot)[:n]
            base = u.start // PAGE * PAGE
            for a, b in u.spans:  # each span at its own place in the buffer
                got, lo_a, n_a = 0, lo + (a - base), b - a
                while got < n_a:
                    r = os.preadv(self._fd, [view[a - base + got:b - base]], lo_a + got)
                    if r <= 0:
                        raise DairError(f"{self.model.path}: short read at byte {lo_a + got}")
                    got += r

            def raw_of(t: Any) -> np.ndarray:
                a = _addr(t.raw) - base
                return slot[a:a + t.nbytes]

            u.weights = self._rebuild(u, raw_of)
        elif any(_madvise(a, b, MADV_POPULATE_READ, outward=True) for a, b in u.spans):
            # Older kernels: ask for readahead, then touch one byte per page.
            for a, b in u.spans:
                _madvise(a, b, MADV_WILLNEED, outward=True)
            for t in u.tensors:
                int(np.add.reduce(t.raw[::PAGE], dtype=np.uint64))
        if self.drop_cache and self.method == "pread":
            os.posix_fadvise(self._fd, u.file_offset, u.nbytes, os.POSIX_FADV_DONTNEED)
        dt = time.perf_counter() - t0
        if not u.pinned:
            self.disk_read_bytes += u.nbytes
            self.read_s += dt

    def _take(self) -> Unit | None:
        with self._lock:
            if not self._queue and not self._stop:
                self._lock.wait(0.5)
            if not self._queue or self._stop:
                return None
            idx = self._queue.pop(0)
            u = self.units[idx]
            if self.method == "pread":
                used = {self.units[i].slot for i in self._held}
                u.slot = 0 if 0 not in used else 1
            self._held.add(idx)
            return u

    # -- reporting ---------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        """Weight bytes held now: pinned units + streamed units mapped or in a buffer."""
        with self._lock:
            held = sum(self.units[i].nbytes for i in self._held)
        return sum(u.nbytes for u in self.units if u.pinned) + held

    def stats(self) -> dict[str, Any]:
        streamed = [u for u in self.units if not u.pinned]
        return {
            "mode": self.mode,
            "max_ram": self.budget,
            "range_bytes": self.range_bytes,
            "resident_bytes": self.resident_bytes(),
            "pinned_units": sum(1 for u in self.units if u.pinned),
            "streamed_units": len(streamed),
            "prefetch": self.depth > 0,
            "method": self.method,
            "disk_read_bytes": self.disk_read_bytes,
            "experts_read": self.experts_read,
            "expert_bytes_read": self.expert_bytes_read,
            "disk_read_mb_s": self.disk_read_bytes / 1e6 / self.read_s if self.read_s else 0.0,
            "storage_read_bytes": storage_read_bytes() - self._io0,
            "disk_wait_s": self.wait_s,
            "busy_s": self.busy_s,
            "disk_wait_fraction": self.wait_s / self.busy_s if self.busy_s else 0.0,
        }

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _worker_loop(ref: weakref.ref) -> None:
    # Holds the Residency only while working, so an engine that is dropped is collected.
    while True:
        res = ref()
        if res is None or getattr(res, "_stop", True):
            return
        u = res._take()
        if u is None:
            del res
            continue
        try:
            res._populate(u)
        except Exception as e:  # the compute thread must not wait forever on a failed read
            res.error = e
        with res._lock:
            u.state = "in"
            u.ready.set()
        del res, u


def _aligned(n: int, align: int = PAGE) -> np.ndarray:
    buf = np.empty(n + align, np.uint8)
    off = (-_addr(buf)) % align
    return buf[off:off + n]
