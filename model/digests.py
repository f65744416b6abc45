"""Per-tensor digests of a model file: what the bus compares before it admits a stage's range.

The header fingerprint (ModelFile.fingerprint) names the file's metadata and layout; these
digests see every byte of every tensor a stage uses, so a file corrupted inside a weight (a bad
copy, a disk error, an edit in place) is refused by tensor and layer instead of answering junk.

Hash: xxHash's XXH3-128 (PyPI `xxhash`). It is not cryptographic, and does not need to be: a
stage reports its own digests, so a hostile stage could lie whatever the hash; what they catch
is accidental damage, where 128 bits make a collision negligible. Against BLAKE3 (`blake3`,
single-threaded, the only fair use on a stage that computes) it hashes 2.0-2.7x as fast on the
same CPU (`python benchmarks/bench_digests.py`), and both release the GIL, so a stage's
heartbeats keep flowing while it hashes.

Bytes are read with pread into one reused buffer, never through the model's memory map: hashing
a range leaves no page of the file mapped in the process (its RSS stays its own layers'), and
the bus, which hashes ranges it never runs, maps nothing either. Digests are computed lazily, a
tensor at a time, only for the tensors asked for, and kept in a cache file per model file under
the dair cache dir, valid while the file's size, mtime_ns and inode and its header fingerprint
are the ones recorded in it.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dair.errors import ModelFormatError
from dair.units import format_bytes

ALGO = "xxh3_128"
CACHE_FORMAT = 1
# Read size: large enough that syscalls cost nothing next to the hash, small enough to stay in L2/L3.
CHUNK = 4 << 20
# Progress is reported for hashing that takes longer than this, then every REPORT_S seconds.
REPORT_S = 2.0
# Non-layer tensors that every layer uses (llama3-style rope frequency factors).
SHARED_TENSORS = ("rope_freqs.weight",)


def _hasher() -> Any:
    import xxhash

    return xxhash.xxh3_128()


def digest_bytes(data: bytes | memoryview) -> str:
    """The digest of one tensor's bytes, as the cache and the wire carry it (hex)."""
    h = _hasher()
    h.update(data)
    return h.hexdigest()


def range_tensor_names(model: Any, first: int, last: int) -> list[str]:
    """Names of the tensors layers first..last read: their own, the shared ones, the embedding if
    the range starts at layer 0, the final norm and output matrix if it ends at the last layer."""
    n = model.config.n_layers
    names = [name for name in model.tensors
             if name.startswith("blk.") and first <= int(name.split(".", 2)[1]) <= last]
    names += [s for s in SHARED_TENSORS if s in model.tensors]
    if first == 0:
        names.append("token_embd.weight")
    if last == n - 1:
        names += ["output_norm.weight", "output.weight"]
    return list(dict.fromkeys(names))


def tensor_role(name: str) -> str:
    """What a tensor is for, in an error message: "layer 15", "embedding", "head"."""
    if name.startswith("blk."):
        return f"layer {name.split('.')[1]}"
    if name == "token_embd.weight":
        return "embedding"
    if name in ("output.weight", "output_norm.weight"):
        return "head"
    return "every layer"


def cache_dir() -> Path:
    from dair.model.fetch import cache_dir as dair_cache

    return dair_cache() / "digests"


class FileDigests:
    """The digests of one opened model file, computed on demand and cached on disk.

    Thread-safe: the bus may ask from its loop while a warm-up thread is hashing.
    """

    def __init__(self, model: Any, cache: Path | None = None, progress: str | None = None) -> None:
        self.model = model
        self.path = Path(model.path).resolve()
        st = os.stat(self.path)
        self.identity = {"path": str(self.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                         "inode": st.st_ino, "fingerprint": model.fingerprint, "algo": ALGO,
                         "format": CACHE_FORMAT}
        base = cache if cache is not None else cache_dir()
        self.cache_path = base / (hashlib.sha256(str(self.path).encode()).hexdigest()[:32] + ".json")
        self.progress = progress
        self.digests: dict[str, str] = {}
        # How the cache file was found: "hit" (valid), "miss" (none), "stale" (another identity).
        self.cache_state = "miss"
        self.hashed_bytes = 0
        self._lock = threading.Lock()
        self._load()

    # -- queries -----------------------------------------------------------------------------
    def for_range(self, first: int, last: int, report: _Report | None = None) -> dict[str, str]:
        """{tensor name: digest} of every tensor layers first..last use (range_tensor_names)."""
        return self.get(range_tensor_names(self.model, first, last), report)

    def ready(self, first: int, last: int) -> bool:
        """Are that range's digests known (without hashing anything)?"""
        return all(n in self.digests for n in range_tensor_names(self.model, first, last))

    def missing_bytes(self, first: int, last: int) -> int:
        return sum(self.model.tensors[n].nbytes for n in range_tensor_names(self.model, first, last)
                   if n not in self.digests)

    def get(self, names: Iterable[str], report: _Report | None = None) -> dict[str, str]:
        names = list(names)
        with self._lock:
            missing = [n for n in names if n not in self.digests]
            if missing:
                self._compute(missing, report)
                self._save()
            return {n: self.digests[n] for n in names}

    def warm(self) -> None:
        """Every tensor's digest, layer by layer."""
        n = self.model.config.n_layers
        for i in range(n):
            self.for_range(i, i)

    # -- hashing -------------------------------------------------------------------------------
    def _compute(self, names: list[str], report: _Report | None = None) -> None:
        # A tied head is the embedding's bytes under a second name: hash each span once.
        known = {(self.model.tensors[n].offset, self.model.tensors[n].nbytes): d for n, d in self.digests.items()}
        spans: dict[tuple[int, int], list[str]] = {}
        for name in names:
            t = self.model.tensors[name]
            if (t.offset, t.nbytes) in known:
                self.digests[name] = known[(t.offset, t.nbytes)]
                continue
            spans.setdefault((t.offset, t.nbytes), []).append(name)
        own = report is None  # else a caller's, spanning several calls (the bus's whole file)
        if report is None:
            report = _Report(self.progress, self.path.name, sum(nb for _, nb in spans))
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            self._hash_spans(spans, view, report)
        except OSError as e:
            raise ModelFormatError(self.path, f"cannot read it to hash its tensors ({e.strerror or e})") from None
        if own:
            report.done()

    def _hash_spans(self, spans: dict[tuple[int, int], list[str]], view: memoryview, report: _Report) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            for (offset, nbytes), same in sorted(spans.items()):
                h = _hasher()
                pos, end = offset, offset + nbytes
                while pos < end:
                    want = min(CHUNK, end - pos)
                    got = _pread_into(fd, view[:want], pos)
                    if got <= 0:
                        raise ModelFormatError(self.path, f"truncated while hashing: no data at byte {pos}")
                    h.update(view[:got])
                    pos += got
                    report(got)
                digest = h.hexdigest()
                for name in same:
                    self.digests[name] = digest
                self.hashed_bytes += nbytes
        finally:
            os.close(fd)

    # -- cache file ------------------------------------------------------------------------------
    def _read_cache(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.cache_path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _valid(self, data: dict[str, Any] | None) -> bool:
        return (data is not None and all(data.get(k) == v for k, v in self.identity.items())
                and isinstance(data.get("tensors"), dict))

    def _load(self) -> None:
        data = self._read_cache()
        if data is None:
            self.cache_state = "miss"
        elif not self._valid(data):
            self.cache_state = "stale"  # the file changed since (or another file at that path)
        else:
            self.cache_state = "hit"
            known = set(self.model.tensors)
            self.digests = {k: v for k, v in data["tensors"].items() if k in known and isinstance(v, str)}

    def _save(self) -> None:
        """Merge our digests into the cache file (the bus and several stages may write it)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if (st.st_size, st.st_mtime_ns, st.st_ino) != (self.identity["size"], self.identity["mtime_ns"],
                                                       self.identity["inode"]):
            return  # the file changed while we hashed it: these digests describe neither version
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cache_path.with_suffix(".lock"), "w") as lock:
                _flock(lock)
                old = self._read_cache()
                merged = dict(old["tensors"]) if self._valid(old) else {}
                merged.update(self.digests)
                tmp = self.cache_path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps({**self.identity, "tensors": merged}, sort_keys=True))
                os.replace(tmp, self.cache_path)
        except OSError as e:  # a read-only cache dir costs a re-hash next time, nothing else
            print(f"dair: cannot write the digest cache {self.cache_path}: {e.strerror or e}", file=sys.stderr)


def check_range(bus: FileDigests, first: int, last: int, theirs: Any, who: str) -> str | None:
    """None when a stage's digests for layers first..last equal the bus's; otherwise the refusal,
    one line naming the differing tensors and the layer each belongs to."""
    span = f"layer {first}" if first == last else f"layers {first}-{last}"
    if not isinstance(theirs, Mapping) or not theirs:
        return (f"{who} sent no tensor digests for {span}; the bus admits a range only when its bytes "
                f"match {bus.path.name} (upgrade the stage)")
    ours = bus.for_range(first, last)
    bad = [name for name, d in ours.items() if theirs.get(name) != d]
    if not bad:
        return None
    shown = ", ".join(f"{name} ({tensor_role(name)})" for name in bad[:4])
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    return (f"{who} has a model file whose bytes differ from the bus's {bus.path.name} in {shown}{more} "
            f"(same header, different tensor data: a damaged or modified copy; copy the file again)")


class _Report:
    """Progress of a long hash on stderr: nothing for a short one, a line every REPORT_S otherwise."""

    def __init__(self, prefix: str | None, label: str, total: int) -> None:
        self.prefix, self.label, self.total = prefix, label, max(total, 1)
        self.done_bytes = 0
        self.t0 = self.last = time.monotonic()
        self.shown = False

    def __call__(self, n: int) -> None:
        self.done_bytes += n
        if self.prefix is None:
            return
        now = time.monotonic()
        if now - self.last >= REPORT_S:
            self.last, self.shown = now, True
            rate = self.done_bytes / max(now - self.t0, 1e-9)
            left = (self.total - self.done_bytes) / max(rate, 1.0)
            print(f"{self.prefix}: hashing {self.label}: {100 * self.done_bytes // self.total}% of "
                  f"{format_bytes(self.total)}, {format_bytes(rate)}/s, about {left:.0f}s left",
                  file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.shown and self.prefix is not None:
            dt = time.monotonic() - self.t0
            print(f"{self.prefix}: hashed {format_bytes(self.total)} of {self.label} in {dt:.1f}s "
                  f"({format_bytes(self.total / max(dt, 1e-9))}/s); cached for the next start",
                  file=sys.stderr, flush=True)


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[:len(data)] = data
    return len(data)


def _flock(f: Any) -> None:
    try:
        import fcntl

        fcntl.flock(f, fcntl.LOCK_EX)
    except ImportError:  # not POSIX: concurrent writers may lose each other's entries (a re-hash)
        pass


class RangeGate:
    """The bus's side: which stage connections have shown the bytes of the range they serve.

    A stage registering with layers shows its digests in `register`; one given a range later (a
    standby, a placed stage) in the heartbeats that follow loading it. Until they match, its
    range does not serve. The bus's own digests are hashed by a background thread, the ranges
    stages ask for first, then the rest of the file, so that its event loop never hashes: a
    range not hashed yet is answered "wait" (after waiting up to `wait_s` for it), and the stage
    asks again.
    """

    def __init__(self, model: Any, progress: str | None = "dair-bus", cache: Path | None = None,
                 wait_s: float = 0.5) -> None:
        self.digests = FileDigests(model, cache=cache)
        self.progress = progress
        self.wait_s = wait_s
        self.admitted: dict[bytes, tuple[int, int] | str] = {}
        # Digests a stage sent in a heartbeat for a range we had not hashed yet: (first, last, map).
        self.offered: dict[bytes, tuple[int, int, Mapping[str, Any]]] = {}
        self.error: str | None = None
        self._requests: list[tuple[int, int]] = []
        self._cv = threading.Condition()
        self._worker: threading.Thread | None = None

    def start(self) -> RangeGate:
        self._worker = threading.Thread(target=self._work, name="dair-digests", daemon=True)
        self._worker.start()
        return self

    def _work(self) -> None:
        n = self.digests.model.config.n_layers
        todo = [i for i in range(n) if not self.digests.ready(i, i)]
        total = sum(self.digests.missing_bytes(i, i) for i in todo)
        report = _Report(self.progress, self.digests.path.name, total)
        try:
            while True:
                with self._cv:
                    want = next((r for r in self._requests if not self.digests.ready(*r)), None)
                    self._requests = [r for r in self._requests if not self.digests.ready(*r)]
                if want is None:
                    layer = next((i for i in range(n) if not self.digests.ready(i, i)), None)
                    if layer is None:
                        break
                    want = (layer, layer)
                for i in range(want[0], want[1] + 1):  # a layer at a time: a request waits for one at most
                    self.digests.for_range(i, i, report)
                    with self._cv:
                        self._cv.notify_all()
        except Exception as e:  # the checks hash on demand instead, and fail with the reason
            self.error = str(e)
        report.done()
        with self._cv:
            self._cv.notify_all()

    def _ready(self, first: int, last: int) -> bool:
        if self.digests.ready(first, last):
            return True
        if self._worker is None or not self._worker.is_alive():
            if self._worker is None:
                return False
            self.digests.for_range(first, last)  # the worker failed: hash here, raising its error
            return True
        with self._cv:
            if (first, last) in self._requests:
                return False  # asked already: the bus loop waits for a range once, not at every beat
            self._requests.append((first, last))
            self._cv.wait_for(lambda: self.digests.ready(first, last), timeout=self.wait_s)
        return self.digests.ready(first, last)

    def _waiting(self, first: int, last: int) -> str:
        span = f"layer {first}" if first == last else f"layers {first}-{last}"
        left = self.digests.missing_bytes(first, last)
        return (f"the bus is still hashing its model file {self.digests.path.name} ({format_bytes(left)} of "
                f"{span} to go); this stage registers again in a moment")

    def admit(self, ident: bytes, first: int, last: int, theirs: Any, who: str,
              known: Iterable[bytes] = ()) -> tuple[str, str]:
        """("ok", ""), ("wait", why) when our digests of the range are not ready yet, or
        ("refused", the one-line refusal); ok and refused are remembered for this connection."""
        if not self._ready(first, last):
            return "wait", self._waiting(first, last)
        refusal = check_range(self.digests, first, last, theirs, who)
        keep = set(known)
        self.admitted = {i: r for i, r in self.admitted.items() if i in keep or i == ident}
        self.offered = {i: o for i, o in self.offered.items() if i in keep}
        self.admitted[ident] = (first, last) if refusal is None else "refused"
        return ("ok", "") if refusal is None else ("refused", refusal)

    def refused(self, ident: bytes) -> bool:
        return self.admitted.get(ident) == "refused"

    def beat(self, ident: bytes, first: int, last: int, h: Mapping[str, Any], who: str,
             known: Iterable[bytes] = ()) -> tuple[str, str]:
        """For a heartbeat claiming a live state for first..last: as `admit`, with "wait" also
        while the stage has not sent that range's digests (a beat from before it loaded the
        range, or from before its ASSIGN)."""
        if self.admitted.get(ident) == (first, last):
            return "ok", ""
        st = h.get("stats") or {}
        if "digests" in h and (st.get("first"), st.get("last")) == (first, last):
            self.offered[ident] = (first, last, h["digests"])
        offer = self.offered.get(ident)
        if offer is None or offer[:2] != (first, last):
            return "wait", "no digests for this range yet"
        return self.admit(ident, first, last, offer[2], who, known)
