"""SentencePiece-style ("llama") vocabularies encoded as llama.cpp does, without HF `tokenizers`.

llama.cpp (llama-vocab.cpp) first splits the text on special tokens, longest first (control and
unknown tokens only when special tokens are parsed, user-defined ones always), then runs its SPM
search on every fragment of plain text: a space prefix where the fragment follows a special token
or starts the text (if the vocabulary asks for one), spaces as U+2581, and then the merge search
of dair.ops.strings.SpmEncoder. Building that encoder is a hash table of the pieces (tens of
milliseconds for 262k pieces), where a BPE equivalent needs half a million merges found and
handed to `tokenizers` (about a second for Gemma 3).
"""
from __future__ import annotations

import numpy as np

from dair.ops.strings import SpmEncoder
from dair.tokenizer.vocab import CONTROL, UNKNOWN, USER_DEFINED, Vocab


class SpmTextEncoder:
    """Text → ids for a "llama" vocabulary (no BOS: the Tokenizer adds it)."""

    def __init__(self, vocab: Vocab) -> None:
        n = len(vocab.tokens)
        scores = np.zeros(n, np.float32) if vocab.scores is None else np.asarray(vocab.scores, np.float32)
        types = np.asarray(vocab.token_types, np.int64)
        unk = np.flatnonzero(types == UNKNOWN)
        self._enc = SpmEncoder(vocab.tokens, np.ascontiguousarray(scores), int(unk[0]) if unk.size else -1)
        self._space_prefix = vocab.add_space_prefix
        # llama.cpp's cache_special_tokens: control, user-defined and unknown tokens, longest first
        # (a text given twice: the first id).
        special = np.flatnonzero(np.isin(types, (CONTROL, USER_DEFINED, UNKNOWN))).tolist()
        seen: dict[str, int] = {}
        for i in special:
            t = vocab.tokens[i]
            if t and t not in seen:
                seen[t] = i
        order = sorted(seen.items(), key=lambda kv: -len(kv[0]))
        # By their first two characters, so that a text is searched for the few groups it holds,
        # not for each of thousands of tokens (Gemma 3 has 6k "<unused...>" ones).
        self._groups: tuple[dict[str, list[tuple[int, str, int]]], ...] = ({}, {})
        for rank, (t, i) in enumerate(order):
            for always, groups in enumerate(self._groups):
                if not always or vocab.token_types[i] == USER_DEFINED:
                    groups.setdefault(t[:2], []).append((rank, t, i))

    def _specials_in(self, text: str, parse_special: bool) -> list[tuple[int, str, int]]:
        """(rank, text, id) of the special tokens in `text`, longest first."""
        found = [s for key, group in self._groups[0 if parse_special else 1].items() if key in text
                 for s in group if s[1] in text]
        found.sort()
        return found

    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        frags: list[str | int] = [text]
        for _, tok, tid in self._specials_in(text, parse_special):
            split: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tok not in f:
                    split.append(f)
                    continue
                for k, part in enumerate(f.split(tok)):
                    if k:
                        split.append(tid)
                    if part:
                        split.append(part)
            frags = split
        ids: list[int] = []
        prev_special = True
        for f in frags:
            if isinstance(f, int):
                ids.append(f)
                prev_special = True
                continue
            if self._space_prefix and prev_special:
                f = " " + f
            ids += self._enc.encode(f.replace(" ", "▁").encode("utf-8", "replace"))
            prev_special = False
        return ids
