"""BPE merges that make HF `tokenizers` encode as llama.cpp's SentencePiece search does.

llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose union is the highest-scoring
token. A BPE whose merges are every (left, right) split of every piece with both halves in the
vocabulary, ranked by the union's score, does the same (HF's SentencePieceExtractor builds them
so). For Gemma 3's 262k pieces that is 1.5M splits to look up, 515k found: a Python loop over
them takes a second, so they are found in C (dair.ops.strings.spm_splits: a hash table of the
pieces' code points, every candidate compared in full), in about a tenth of that.
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
    return lefts, rights


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
    return lefts.tolist(), rights.tolist()


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


def _store(path: Path, lefts: np.ndarray, rights: np.ndarray) -> None:
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


def _search(pieces: dict[str, int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(left ids, right ids) of every split, ordered by the union's score (highest first), then
    left id, then right id."""
    from dair.ops.strings import spm_splits

    keys = list(pieces)
    ids = np.fromiter(pieces.values(), np.int64, len(keys))
    r, a, b = spm_splits(keys)
    u, a, b = ids[r], ids[a], ids[b]
    order = np.lexsort((b, a, -np.asarray(scores, dtype=np.float64)[u]))
    return a[order], b[order]


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
