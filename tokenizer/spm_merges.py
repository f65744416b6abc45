"""BPE merges that make HF `tokenizers` encode as llama.cpp's SentencePiece search does.

llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose union is the highest-scoring
token. A BPE whose merges are every (left, right) split of every piece with both halves in the
vocabulary, ranked by the union's score, does the same (HF's SentencePieceExtractor builds them
so). For Gemma 3's 262k pieces that is 1.5M splits: a Python loop over them takes seconds, so
the splits are found with vectorised rolling hashes, one column of characters at a time, and
every pair found is then checked as strings (a hash collision falls back to the plain loop).
Big vocabularies keep their merges in the cache directory, keyed by a digest of the pieces,
their ids and scores, so that the next load of the same vocabulary skips the search.
`vocab_merges` keys them by the vocabulary arrays as the model file states them instead, so
that a cache hit costs no Python loop over the pieces at all.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplication by it is a bijection mod 2^64


CACHE_MIN_PIECES = 32768  # smaller vocabularies take well under a second: not worth a file
_CACHE_VERSION = b"dair-spm-merges-1"
_VOCAB_CACHE_VERSION = b"dair-spm-vocab-merges-1"


def vocab_merges(tokens: Sequence[str], types: Sequence[int], scores: Sequence[float] | None,
                 skip_types: Collection[int], cache: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`spm_merges` of the pieces of `tokens` whose type is not in `skip_types` (the last id of a
    duplicate stands for it), as int64 arrays of token ids. The cache key is a digest of the arrays
    themselves: the dict of pieces is built only when the merges are searched."""
    scores = scores if scores is not None else [0.0] * len(tokens)
    path = None
    if cache is not None and len(tokens) >= CACHE_MIN_PIECES:
        h = hashlib.sha256(_VOCAB_CACHE_VERSION)
        h.update(np.fromiter(map(len, tokens), np.int64, len(tokens)).tobytes())
        h.update("".join(tokens).encode("utf-8", "surrogatepass"))
        h.update(np.asarray(types, np.int64).tobytes())
        h.update(np.asarray(sorted(skip_types), np.int64).tobytes())
        h.update(np.asarray(scores, np.float64).tobytes())
        path = cache / f"spm-vocab-merges-{h.hexdigest()[:40]}.npz"
        hit = _load_arrays(path)
        if hit is not None:
            return hit
    skip = set(skip_types)
    pieces: dict[str, int] = {}
    for i, (t, typ) in enumerate(zip(tokens, types, strict=True)):
        if typ not in skip:
            pieces[t] = i
    lefts, rights = _search(pieces, scores)
    if path is not None:
        _store(path, lefts, rights)
    return np.asarray(lefts, np.int64), np.asarray(rights, np.int64)


def spm_merges(pieces: dict[str, int], scores: Sequence[float],
               cache: Path | None = None) -> tuple[list[int], list[int]]:
    """(left ids, right ids) of every split of every piece in `pieces` (text → id) whose two
    halves are pieces too, ordered by the union's score (highest first), then left id, then
    right id. `cache`: a directory to keep them in (vocabularies of CACHE_MIN_PIECES or more)."""
    path = None
    if cache is not None and len(pieces) >= CACHE_MIN_PIECES:
        path = cache / f"spm-merges-{_vocab_digest(pieces, scores)}.npz"
        hit = _load(path)
        if hit is not None:
            return hit
    lefts, rights = _search(pieces, scores)
    if path is not None:
        _store(path, lefts, rights)
    return lefts, rights


def _vocab_digest(pieces: dict[str, int], scores: Sequence[float]) -> str:
    h = hashlib.sha256(_CACHE_VERSION)
    h.update(np.fromiter(map(len, pieces), np.int64, len(pieces)).tobytes())
    h.update("".join(pieces).encode("utf-8", "surrogatepass"))
    h.update(np.fromiter(pieces.values(), np.int64, len(pieces)).tobytes())
    h.update(np.asarray(scores, dtype=np.float64).tobytes())
    return h.hexdigest()[:40]


def _check(lefts: np.ndarray, rights: np.ndarray) -> bytes:
    return hashlib.sha256(lefts.tobytes() + rights.tobytes()).digest()


def _load(path: Path) -> tuple[list[int], list[int]] | None:
    hit = _load_arrays(path)
    return None if hit is None else (hit[0].tolist(), hit[1].tolist())


def _load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached merges, or None if absent or damaged (then they are searched again)."""
    try:
        with np.load(path) as z:
            lefts, rights, check = z["lefts"], z["rights"], z["check"].tobytes()
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    if lefts.shape != rights.shape or lefts.dtype != np.int32 or check != _check(lefts, rights):
        return None
    return lefts.astype(np.int64), rights.astype(np.int64)


def _store(path: Path, lefts: list[int], rights: list[int]) -> None:
    a, b = np.asarray(lefts, np.int32), np.asarray(rights, np.int32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError:
        return  # a read-only cache costs the next load the search, nothing else
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, lefts=a, rights=b, check=np.frombuffer(_check(a, b), np.uint8))
        os.replace(tmp, path)  # whole or not at all, even with loads running beside us
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def _search(pieces: dict[str, int], scores: Sequence[float]) -> tuple[list[int], list[int]]:
    found = _splits_vectorised(pieces)
    if found is None:
        found = _splits_loop(pieces, pieces)
    u, a, b = found
    s = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((b, a, -s[u]))
    return a[order].tolist(), b[order].tolist()


def _splits_loop(pieces: dict[str, int], within: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The plain definition: every split of every piece of `within`, looked up in `pieces`."""
    get = pieces.get
    out: list[tuple[int, int, int]] = []
    for piece, i in within.items():
        for k in range(1, len(piece)):
            left = get(piece[:k])
            if left is not None:
                right = get(piece[k:])
                if right is not None:
                    out.append((i, left, right))
    arr = np.array(out, dtype=np.int64).reshape(-1, 3)  # (union, left, right)
    return arr[:, 0], arr[:, 1], arr[:, 2]


def _splits_vectorised(pieces: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    # numpy's fixed-width strings drop trailing NULs: pieces holding one go through the loop.
    with_nul = {t: i for t, i in pieces.items() if "\x00" in t}
    keys = [t for t in pieces if "\x00" not in t] if with_nul else list(pieces)
    if not keys:
        return _splits_loop(pieces, with_nul)
    ids = np.fromiter(map(pieces.__getitem__, keys), np.int64, len(keys))
    lens = np.fromiter(map(len, keys), np.int64, len(keys))
    width = int(lens.max())
    codes = np.array(keys, dtype=f"<U{width}").view(np.uint32).reshape(len(keys), width)
    powers = np.ones(width + 1, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(1, width + 1):
            powers[j] = powers[j - 1] * _BASE
        # full[r] = sum over j < len of (c_j + 1) * BASE^(len - 1 - j), mod 2^64
        prefix = np.zeros(len(keys), np.uint64)
        full = np.zeros(len(keys), np.uint64)
        for k in range(1, width + 1):
            prefix = prefix * _BASE + (codes[:, k - 1].astype(np.uint64) + np.uint64(1))
            full[lens == k] = prefix[lens == k]
        order = np.argsort(full, kind="stable")
        sorted_full = full[order]
        if sorted_full.size > 1 and (sorted_full[1:] == sorted_full[:-1]).any():
            return None  # two pieces share a hash: let the loop decide

        def lookup(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            pos = np.minimum(np.searchsorted(sorted_full, h), sorted_full.size - 1)
            return order[pos], sorted_full[pos] == h

        us, lefts, rights = [], [], []
        prefix[:] = 0
        for k in range(1, width):
            prefix = prefix * _BASE + (codes[:, k - 1].astype(np.uint64) + np.uint64(1))
            rows = np.flatnonzero(lens > k)
            left, hit = lookup(prefix[rows])
            rows, left = rows[hit], left[hit]
            suffix = full[rows] - prefix[rows] * powers[lens[rows] - k]
            right, hit = lookup(suffix)
            rows, left, right = rows[hit], left[hit], right[hit]
            # Hashes find candidates; the characters decide, compared as arrays (zero-padded
            # rows, no NUL inside a piece). A collision's false pair sends us to the loop.
            if not ((lens[left] == k).all() and (lens[right] == lens[rows] - k).all()
                    and (codes[left, :k] == codes[rows, :k]).all()
                    and (codes[right, :width - k] == codes[rows, k:]).all()):
                return None
            us.append(rows)
            lefts.append(left)
            rights.append(right)
    u, a, b = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (us, lefts, rights))
    u, a, b = ids[u], ids[a], ids[b]
    if with_nul:
        nu, na, nb = _splits_loop(pieces, with_nul)
        u, a, b = np.concatenate([u, nu]), np.concatenate([a, na]), np.concatenate([b, nb])
    return u, a, b
