"""Tokenizer from a model file's vocabulary, matching llama.cpp's ids.

Byte-level BPE vocabularies encode through HF `tokenizers` (a well-kept BPE), SentencePiece-style
ones through llama.cpp's own search (tokenizer/spm.py); decoding uses our own id → bytes
table, so that pieces of a multi-byte character are reassembled exactly and streamed output
never shows replacement characters for a half-received character.
"""
from __future__ import annotations

import codecs
import gc
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from dair.errors import DairError
from dair.tokenizer.vocab import (
    BYTE,
    CONTROL,
    END_OF_TURN,
    UNKNOWN,
    USER_DEFINED,
    Vocab,
    byte_to_unicode,
    unicode_to_byte,
)

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), applied one after the other, each
# splitting every fragment further; keyed by the GGUF's `tokenizer.ggml.pre`.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_REGEXES: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    **{k: [_GPT2] for k in ("gpt2", "mpt", "olmo", "jais", "trillion")},
    **{k: [r"\p{N}", _GPT2] for k in ("starcoder", "refact", "command-r", "smollm", "codeshell",
                                       "exaone", "minerva")},
    **{k: [_LLAMA3] for k in ("llama3", "llama-bpe", "llama-v3", "dbrx", "smaug-bpe", "falcon3",
                              "pixtral")},
    **{k: [_QWEN2] for k in ("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez", "hunyuan")},
}
# llama.cpp takes a whole pre-token that is already in the vocabulary without merging.
_IGNORE_MERGES = {"llama3", "llama-bpe", "llama-v3", "dbrx", "smaug-bpe", "falcon3", "pixtral"}


@contextmanager
def no_gc() -> Iterator[None]:
    """The cyclic garbage collector paused: building half a million tuples (merges) otherwise
    runs it hundreds of times over the growing heap, for nothing (a tuple of two str is no cycle)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _ids_of_types(vocab: Vocab, *types: int) -> list[int]:
    """Ids of the tokens of these types, in order (numpy: no Python loop over the vocabulary)."""
    import numpy as np

    return np.flatnonzero(np.isin(np.asarray(vocab.token_types, np.int64), types)).tolist()


def _check_supported(vocab: Vocab) -> None:
    if vocab.kind == "gpt2" and vocab.pre not in PRE_REGEXES:
        raise DairError(f"{vocab.source}: tokenizer pre-type {vocab.pre!r} is not supported")
    if vocab.kind not in ("gpt2", "llama"):
        raise DairError(f"{vocab.source}: tokenizer model {vocab.kind!r} is not supported "
                        "(dair reads gpt2 byte-level BPE and llama SentencePiece vocabularies)")


class _HFEncoder:
    """Text → ids through an HF `tokenizers` Tokenizer (byte-level BPE vocabularies)."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        # One encoder serves both parse_special modes (a second one costs its build again); the
        # lock keeps the mode switch and the encode together.
        self._lock = threading.Lock()

    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        with self._lock:
            self._tok.encode_special_tokens = not parse_special
            return self._tok.encode(text, add_special_tokens=False).ids


def _build_encoder(vocab: Vocab) -> Any:
    """An object with encode(text, parse_special) -> ids: dair's SPM search for "llama"
    vocabularies (llama.cpp's algorithm), HF `tokenizers`' BPE for "gpt2" ones."""
    _check_supported(vocab)
    if vocab.kind == "llama":
        from dair.tokenizer.spm import SpmTextEncoder

        return SpmTextEncoder(vocab)
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    # Duplicates are unreachable by encoding; the first id wins (built from the end, in C).
    n = len(vocab.tokens)
    token_ids = dict(zip(reversed(vocab.tokens), range(n - 1, -1, -1), strict=True))
    merges = vocab.merges if vocab.merges is not None else []
    model = models.BPE(vocab=token_ids, merges=list(merges), fuse_unk=False,
                       ignore_merges=vocab.pre in _IGNORE_MERGES)
    tok = Tokenizer(model)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_REGEXES[vocab.pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    # Control tokens are parsed only when asked (llama.cpp's parse_special); user-defined tokens
    # always are, as in llama.cpp.
    added = []
    for i in _ids_of_types(vocab, CONTROL, USER_DEFINED):
        t = vocab.token_types[i]
        if token_ids.get(vocab.tokens[i]) == i and vocab.tokens[i]:
            added.append(AddedToken(vocab.tokens[i], special=(t == CONTROL), normalized=False,
                                    lstrip=False, rstrip=False, single_word=False))
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])
    return _HFEncoder(tok)


def eos_ids(vocab: Vocab) -> tuple[int, ...]:
    """The ids that end a generation: eos, the metadata's end-of-turn ids, and the special
    tokens named like an end of turn."""
    out: list[int] = []
    if vocab.eos_id is not None:
        out.append(vocab.eos_id)
    out += vocab.eot_ids
    tokens = vocab.tokens
    index = {tokens[i]: i for i in _ids_of_types(vocab, CONTROL, USER_DEFINED, UNKNOWN)}
    out += [index[name] for name in END_OF_TURN if name in index]
    return tuple(dict.fromkeys(i for i in out if 0 <= i < len(vocab)))


def describe_vocab(v: Vocab) -> dict[str, Any]:
    bos = v.bos_id
    return {
        "kind": v.kind,
        "pre": v.pre if v.kind == "gpt2" else None,
        "vocab_size": len(v),
        "n_special": sum(1 for t in v.token_types if t in (CONTROL, USER_DEFINED)),
        "bos": [bos, v.tokens[bos]] if bos is not None else None,
        "add_bos": bool(v.add_bos and bos is not None),
        "eos": [[i, v.tokens[i]] for i in eos_ids(v)],
        "chat_template": bool(v.chat_template),
    }


class Tokenizer:
    """Text ↔ ids for one model, plus its special tokens and chat template."""

    def __init__(self, vocab: Vocab, background: bool = False) -> None:
        """`background`: build the encoder in a thread and return at once; the first encode()
        waits for it. For a process that has other waiting to do meanwhile (the bus, while its
        stages start): the build holds the GIL inside `tokenizers`, so it overlaps waiting, not
        Python work."""
        _check_supported(vocab)  # refused here, not later in the thread
        self.vocab = vocab
        self.kind = vocab.kind
        self.vocab_size = len(vocab)
        self._encoder_built: Any = None
        self._encoder_error: BaseException | None = None
        self._encoder_thread: threading.Thread | None = None
        self.bos_id: int | None = vocab.bos_id
        self.add_bos = bool(vocab.add_bos and vocab.bos_id is not None)
        self.eos_ids: tuple[int, ...] = eos_ids(vocab)
        self._pieces = self._piece_bytes()
        self.chat_template: str | None = vocab.chat_template
        # Last: the thread holds the GIL for most of its build, which would stall the rest here.
        if background:
            self._encoder_thread = threading.Thread(target=self._build, name="dair-tokenizer-build", daemon=True)
            self._encoder_thread.start()
        else:
            self._build()

    def _build(self) -> None:
        try:
            self._encoder_built = _build_encoder(self.vocab)
        except BaseException as e:  # re-raised by the encode() that waits for it
            self._encoder_error = e

    @property
    def _encoder(self) -> Any:
        if self._encoder_thread is not None:
            self._encoder_thread.join()
        if self._encoder_error is not None:
            raise self._encoder_error
        return self._encoder_built

    # -- special tokens ---------------------------------------------------------------------
    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    def token_text(self, i: int) -> str:
        return self.vocab.tokens[i]

    def is_special(self, i: int) -> bool:
        return self.vocab.is_special(i)

    def describe(self) -> dict[str, Any]:
        return describe_vocab(self.vocab)

    # -- encode -----------------------------------------------------------------------------
    def encode(self, text: str, parse_special: bool = True, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. `add_bos` None follows the model's metadata (add_bos_token)."""
        ids: list[int] = []
        if text:
            ids = self._encoder.encode(text, parse_special)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    # -- decode -----------------------------------------------------------------------------
    def _piece_bytes(self) -> list[bytes]:
        """Each token's bytes. Comprehensions over the whole vocabulary (str methods in C), then
        the few special tokens put right: a loop with a branch per token costs 2-3 times more."""
        v = self.vocab
        tokens = v.tokens
        if v.kind == "gpt2":
            # str.translate does the per-character work in C: stand-ins to the bytes they stand
            # for (as latin-1 characters), and a second table that deletes them all, to tell
            # tokens made only of stand-ins from the others (spelled as plain UTF-8).
            to_byte = {ord(c): b for c, b in unicode_to_byte().items()}
            strip = dict.fromkeys(to_byte)
            out = [t.encode("utf-8") if t.translate(strip) else t.translate(to_byte).encode("latin-1")
                   for t in tokens]
            for i in _ids_of_types(v, CONTROL, USER_DEFINED, UNKNOWN):
                out[i] = tokens[i].encode("utf-8")
            return out
        out = [t.replace("▁", " ").encode("utf-8") for t in tokens]
        for i in _ids_of_types(v, BYTE, UNKNOWN):
            t = tokens[i]
            if v.token_types[i] == UNKNOWN:
                out[i] = "▅".encode()  # what llama.cpp prints for <unk>
            elif len(t) == 6 and t.startswith("<0x"):
                out[i] = bytes([int(t[3:5], 16)])
        return out

    def token_bytes(self, i: int) -> bytes:
        return self._pieces[i]

    def _check(self, i: int) -> None:
        if not 0 <= i < self.vocab_size:
            raise DairError(f"token id {i} out of range 0..{self.vocab_size - 1}")

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        parts = []
        first = True
        for i in ids:
            i = int(i)
            self._check(i)
            if skip_special and self.vocab.token_types[i] == CONTROL:
                continue
            piece = self._pieces[i]
            if first and self.kind == "llama" and self.vocab.add_space_prefix and piece.startswith(b" "):
                piece = piece[1:]  # the space encode() prepended (llama.cpp strips it the same way)
            first = False
            parts.append(piece)
        return b"".join(parts)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    # -- chat ---------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        from dair.tokenizer.chat import render_chat

        v = self.vocab
        bos = v.tokens[self.bos_id] if self.bos_id is not None else ""
        eos = v.tokens[v.eos_id] if v.eos_id is not None else ""
        return render_chat(self.chat_template, messages, add_generation_prompt, bos, eos, v.source, **extra)


class StreamDecoder:
    """Feed generated ids one at a time; get back only text made of complete UTF-8 characters.

    A character split across tokens (emoji, CJK under byte-level BPE) is held back until its
    last byte arrives, so no replacement character ever appears mid-stream.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        t = self.tokenizer
        t._check(int(token_id))
        if self.skip_special and t.vocab.token_types[int(token_id)] == CONTROL:
            return ""
        return self._dec.decode(t.token_bytes(int(token_id)))

    def flush(self) -> str:
        """Whatever is held back (an incomplete character becomes U+FFFD)."""
        return self._dec.decode(b"", final=True)


__all__ = ["Tokenizer", "StreamDecoder", "byte_to_unicode"]
