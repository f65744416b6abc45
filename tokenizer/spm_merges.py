"""BPE merges that make HF `tokenizers` encode as llama.cpp's SentencePiece search does.

llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose union is the highest-scoring
token. A BPE whose merges are every (left, right) split of every piece with both halves in the
vocabulary, ranked by the union's score, does the same (HF's SentencePieceExtractor builds them
so). For Gemma 3's 262k pieces that is 1.5M splits: a Python loop over them takes seconds, so
the splits are found with vectorised rolling hashes, one column of characters at a time, and
every pair found is then checked as strings (a hash collision falls back to the plain loop).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplication by it is a bijection mod 2^64


def spm_merges(pieces: dict[str, int], scores: Sequence[float]) -> tuple[list[int], list[int]]:
    """(left ids, right ids) of every split of every piece in `pieces` (text → id) whose two
    halves are pieces too, ordered by the union's score (highest first), then left id, then
    right id."""
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
            us.append(rows[hit])
            lefts.append(left[hit])
            rights.append(right[hit])
    u, a, b = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (us, lefts, rights))
    # Hashes find candidates; strings decide (a collision's false pair sends us to the loop).
    if not all(keys[x] + keys[y] == keys[z] for z, x, y in zip(u.tolist(), a.tolist(), b.tolist(), strict=True)):
        return None
    u, a, b = ids[u], ids[a], ids[b]
    if with_nul:
        nu, na, nb = _splits_loop(pieces, with_nul)
        u, a, b = np.concatenate([u, nu]), np.concatenate([a, na]), np.concatenate([b, nb])
    return u, a, b
