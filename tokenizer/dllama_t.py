"""distributed-llama `.t` tokenizer files.

The `.t` format holds each token's bytes and a score, BOS, EOS ids and the chat template, but
no merges, token types or pre-tokenizer. What dair chose:

- Merges are rebuilt from the vocabulary: a byte-level BPE vocabulary lists tokens in merge
  order (dllama's converter writes score = -id), so the merge that made token t is found by
  running BPE with the merges rebuilt so far on t's own spelling; it must split into exactly
  two known tokens. For SmolLM2 this reproduces the GGUF's 48,900 merges exactly (tested).
- dair's converter appends a trailer after the last token (`DAIRTOK1`, uint32 length, JSON:
  kind, pre-tokenizer, non-normal token types, add_bos, add_space_prefix). dllama stops
  reading after the vocabulary, so the file stays valid for it; dair reads the trailer and
  then tokenizes exactly like the GGUF.
- A `.t` without the trailer (written by dllama's own converter) is read with heuristics:
  scores equal to -id mean byte-level BPE, otherwise SentencePiece; special tokens are BOS,
  the EOS ids, the ids at or above bos_id when BOS sits in the upper half of the vocabulary
  (dllama's own rule, right for Llama 3) and multi-character tokens no merge produces; the
  pre-tokenizer is llama3's if the vocabulary has <|begin_of_text|>, digit-splitting if it
  has no multi-digit tokens, else GPT-2's.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from dair.errors import ModelFormatError
from dair.tokenizer.vocab import (
    BYTE,
    CONTROL,
    NORMAL,
    USER_DEFINED,
    Vocab,
    byte_to_unicode,
    unicode_to_byte,
)

MAGIC = 0x567124
OLD_MAGIC = 0x567123
TRAILER = b"DAIRTOK1"
KEYS = {0: "version", 1: "vocab_size", 2: "max_token_length", 3: "bos_id", 4: "eos_id", 5: "pad_id",
        6: "chat_eos_id", 7: "chat_template", 8: "chat_stop", 9: "n_eos_tokens", 10: "add_bos"}
KEY_IDS = {v: k for k, v in KEYS.items()}


# -- writing ------------------------------------------------------------------------------------

def _token_bytes(v: Vocab, i: int) -> bytes:
    t, typ = v.tokens[i], v.token_types[i]
    if v.kind == "gpt2" and typ == NORMAL:
        u2b = unicode_to_byte()
        if all(c in u2b for c in t):
            return bytes(u2b[c] for c in t)
    if v.kind == "llama" and typ == NORMAL:
        return t.replace("▁", " ").encode("utf-8")  # as dllama's sentencepiece converter does
    return t.encode("utf-8")


def write_t(path: str | Path, vocab: Vocab, eos_ids: list[int] | None = None) -> Path:
    """Write `vocab` as a dllama `.t` (version 1) with dair's trailer."""
    path = Path(path)
    pieces = [_token_bytes(vocab, i) for i in range(len(vocab))]
    template = (vocab.chat_template or "").encode("utf-8")
    eos = eos_ids if eos_ids is not None else ([vocab.eos_id] if vocab.eos_id is not None else [])
    params = {"version": 1, "vocab_size": len(pieces), "max_token_length": max(len(p) for p in pieces),
              "bos_id": vocab.bos_id if vocab.bos_id is not None else -1, "n_eos_tokens": len(eos)}
    if template:
        params["chat_template"] = len(template)
    if vocab.add_bos:  # older dllama readers reject key 10, so only write it when it says something
        params["add_bos"] = 1
    body = b"".join(struct.pack("<ii", KEY_IDS[k], v) for k, v in params.items())
    out = [struct.pack("<ii", MAGIC, 8 + len(body)), body, template, struct.pack(f"<{len(eos)}i", *eos)]
    scores = vocab.scores if vocab.kind == "llama" and vocab.scores else [-float(i) for i in range(len(pieces))]
    for p, s in zip(pieces, scores, strict=True):
        out.append(struct.pack("<fI", s, len(p)))
        out.append(p)
    extra = {
        "kind": vocab.kind,
        "pre": vocab.pre,
        "types": {str(i): t for i, t in enumerate(vocab.token_types) if t != NORMAL},
        "add_bos": vocab.add_bos,
        "add_space_prefix": vocab.add_space_prefix,
        "eos_id": vocab.eos_id,
        "eot_ids": vocab.eot_ids,
    }
    blob = json.dumps(extra, separators=(",", ":")).encode()
    out += [TRAILER, struct.pack("<I", len(blob)), blob]
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(b"".join(out))
    tmp.replace(path)
    return path


# -- reading ------------------------------------------------------------------------------------

class _Reader:
    def __init__(self, path: Path, data: bytes) -> None:
        self.path, self.data, self.pos = path, data, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ModelFormatError(self.path, f"truncated: {what} runs past the end of the file")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def ints(self, n: int, what: str, fmt: str = "i") -> tuple[Any, ...]:
        return struct.unpack(f"<{n}{fmt}", self.take(4 * n, what))


def read_t(path: str | Path) -> Vocab:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelFormatError(path, "no such file") from None
    r = _Reader(path, data)
    if len(data) < 8:
        raise ModelFormatError(path, "truncated: shorter than a .t header")
    (magic,) = r.ints(1, "magic")
    if magic == OLD_MAGIC:
        raise ModelFormatError(path, "old distributed-llama tokenizer format: regenerate it")
    if magic != MAGIC:
        raise ModelFormatError(path, f"bad magic 0x{magic & 0xFFFFFFFF:X}, not a distributed-llama .t file")
    (header_size,) = r.ints(1, "header size")
    if header_size < 8 or (header_size - 8) % 8:
        raise ModelFormatError(path, f"bad header size {header_size}")
    kv = r.ints((header_size - 8) // 4, "header")
    h: dict[str, int] = {}
    eos: list[int] = []
    for key, value in zip(kv[::2], kv[1::2], strict=True):
        name = KEYS.get(key)
        if name is None:
            raise ModelFormatError(path, f"unknown header key {key} (value {value})")
        h[name] = value
        if name in ("eos_id", "chat_eos_id"):
            eos.append(value)
        if name == "chat_stop":
            r.take(value, "chat stop string")  # dllama skips it right after the header
    if h.get("version") != 1:
        raise ModelFormatError(path, f"tokenizer version {h.get('version')} is not supported (1)")
    n = h.get("vocab_size", 0)
    if n <= 0:
        raise ModelFormatError(path, "vocab_size missing or not positive")
    template = r.take(h["chat_template"], "chat template").decode("utf-8", "replace") \
        if h.get("chat_template", 0) > 0 else None
    eos += list(r.ints(h.get("n_eos_tokens", 0), "eos ids"))
    pieces: list[bytes] = []
    scores: list[float] = []
    for i in range(n):
        score, length = struct.unpack("<fI", r.take(8, f"token {i}"))
        pieces.append(r.take(length, f"token {i}"))
        scores.append(score)
    extra = None
    if r.pos + len(TRAILER) + 4 <= len(data) and data[r.pos:r.pos + len(TRAILER)] == TRAILER:
        r.take(len(TRAILER), "trailer")
        (size,) = r.ints(1, "trailer", "I")
        try:
            extra = json.loads(r.take(size, "trailer"))
        except ValueError as e:
            raise ModelFormatError(path, f"corrupt dair trailer ({e})") from None
    bos = h.get("bos_id", -1)
    bos_id = bos if 0 <= bos < n else None
    eos = [e for e in eos if 0 <= e < n]
    return _vocab(path, pieces, scores, bos_id, eos, template, extra, bool(h.get("add_bos", 0)))


def _vocab(path: Path, pieces: list[bytes], scores: list[float], bos_id: int | None, eos: list[int],
           template: str | None, extra: dict[str, Any] | None, add_bos: bool) -> Vocab:
    n = len(pieces)
    if extra is not None:
        kind = extra.get("kind", "gpt2")
        types = [NORMAL] * n
        for i, t in extra.get("types", {}).items():
            types[int(i)] = int(t)
    else:
        kind = "gpt2" if all(s == -float(i) for i, s in enumerate(scores)) else "llama"
        types = [NORMAL] * n
        # dllama's own rule (ids from bos_id up are special) only where the specials do sit at
        # the end (Llama 3); elsewhere BOS/EOS, plus tokens no merge produces (marked below).
        if bos_id is not None and bos_id >= n // 2:
            for i in range(bos_id, n):
                types[i] = CONTROL
        for i in [*eos, *([bos_id] if bos_id is not None else [])]:
            types[i] = CONTROL
    b2u = byte_to_unicode()
    tokens: list[str] = []
    for i, p in enumerate(pieces):
        if kind == "gpt2" and types[i] == NORMAL:
            tokens.append("".join(b2u[b] for b in p))
        elif kind == "llama" and types[i] == NORMAL:
            text = p.decode("utf-8", "replace")
            if extra is None and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                types[i] = BYTE
            tokens.append(text.replace(" ", "▁"))
        else:
            tokens.append(p.decode("utf-8", "replace"))
    merges = None
    if kind == "gpt2":
        merges = rebuild_merges(tokens, types, mark_unreachable=extra is None)
    pre = extra.get("pre") if extra else _guess_pre(tokens)
    return Vocab(
        kind=kind, tokens=tokens, token_types=types, scores=scores if kind == "llama" else None,
        merges=merges, bos_id=bos_id,
        eos_id=(extra or {}).get("eos_id", eos[0] if eos else None),
        eot_ids=[e for e in eos if e != (extra or {}).get("eos_id")] + list((extra or {}).get("eot_ids", [])),
        add_bos=bool(extra.get("add_bos", add_bos)) if extra else add_bos,
        add_space_prefix=bool(extra.get("add_space_prefix", kind == "llama")) if extra else kind == "llama",
        pre=pre or "gpt2", chat_template=template, source=str(path),
    )


def _guess_pre(tokens: list[str]) -> str:
    vocab = set(tokens)
    if "<|begin_of_text|>" in vocab:
        return "llama3"
    if not any(len(t) > 1 and t.isdigit() for t in tokens):
        return "smollm"  # single-digit splitting (starcoder family)
    return "gpt2"


def rebuild_merges(tokens: list[str], types: list[int], mark_unreachable: bool = False) -> list[tuple[str, str]]:
    """Byte-level BPE merges from a vocabulary listed in merge order (see the module doc).

    With `mark_unreachable`, multi-character tokens that no merge produces are marked
    USER_DEFINED in `types` (they can only be added tokens).
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    known = {t for t, typ in zip(tokens, types, strict=True) if typ == NORMAL}
    for i, t in enumerate(tokens):
        if types[i] != NORMAL or len(t) < 2:
            continue
        parts = list(t)
        while len(parts) > 2:
            best = None
            for k in range(len(parts) - 1):
                r = ranks.get((parts[k], parts[k + 1]))
                if r is not None and (best is None or r < best[0]):
                    best = (r, k)
            if best is None:
                break
            k = best[1]
            parts[k:k + 2] = [parts[k] + parts[k + 1]]
        if len(parts) == 2 and parts[0] in known and parts[1] in known and tuple(parts) not in ranks:
            ranks[(parts[0], parts[1])] = len(merges)
            merges.append((parts[0], parts[1]))
        elif mark_unreachable:
            types[i] = USER_DEFINED
    return merges
