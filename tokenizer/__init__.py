"""Tokenizers from model files: GPT-2 byte-level BPE and SentencePiece-style llama vocabularies.

`load_tokenizer(model)` accepts an open ModelFile or a path (GGUF, distributed-llama `.m`,
or its `.t`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dair.errors import DairError, ModelFormatError
from dair.tokenizer.chat import builtin_template
from dair.tokenizer.core import StreamDecoder, Tokenizer
from dair.tokenizer.text import CompletionText, prompt_ids
from dair.tokenizer.vocab import NORMAL, Vocab

__all__ = ["load_tokenizer", "load_vocab", "describe_tokenizer", "Tokenizer", "StreamDecoder", "Vocab",
           "vocab_from_gguf", "prompt_ids", "CompletionText"]


def vocab_from_gguf(mf: Any) -> Vocab:
    """The tokenizer.ggml.* metadata of an open GGUF model file."""
    kind = mf.get("tokenizer.ggml.model")
    if kind is None:
        raise ModelFormatError(mf.path, "no tokenizer in the file (tokenizer.ggml.model missing)")
    tokens = mf.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelFormatError(mf.path, "no tokenizer vocabulary (tokenizer.ggml.tokens missing)")
    types = mf.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    scores = mf.get("tokenizer.ggml.scores")
    merges = mf.get("tokenizer.ggml.merges")
    if len(types) != len(tokens) or (scores is not None and len(scores) != len(tokens)):
        raise ModelFormatError(mf.path, "tokenizer arrays (tokens, token_type, scores) differ in length")
    pairs = None
    if merges is not None:
        from dair.tokenizer.core import no_gc

        with no_gc():  # hundreds of thousands of tuples
            split = [m.partition(" ") for m in merges]
            bad = next((m for m, (_, sep, _) in zip(merges, split, strict=True) if not sep), None)
            if bad is not None:
                raise ModelFormatError(mf.path, f"malformed BPE merge {bad!r}")
            pairs = [(left, right) for left, _, right in split]
    if kind == "gpt2" and pairs is None:
        raise ModelFormatError(mf.path, "gpt2 tokenizer without tokenizer.ggml.merges")
    eot = [mf.get(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
    default_bos = kind == "llama"  # llama.cpp's default when the key is absent
    return Vocab(
        kind=str(kind),
        tokens=list(tokens),
        token_types=[int(t) for t in types] if not _all_of(types, int) else types,
        scores=[float(s) for s in scores] if scores is not None and not _all_of(scores, float) else scores,
        merges=pairs,
        bos_id=mf.get("tokenizer.ggml.bos_token_id"),
        eos_id=mf.get("tokenizer.ggml.eos_token_id"),
        eot_ids=[int(e) for e in eot if e is not None],
        add_bos=bool(mf.get("tokenizer.ggml.add_bos_token", default_bos)),
        add_space_prefix=bool(mf.get("tokenizer.ggml.add_space_prefix", kind == "llama")),
        pre=str(mf.get("tokenizer.ggml.pre", "default")),
        chat_template=mf.get("tokenizer.chat_template") or builtin_template(mf.get("general.architecture")),
        source=str(mf.path),
    )


def _all_of(values: list[Any], kind: type) -> bool:
    """All already of `kind` (what the GGUF reader gives): no per-element conversion needed.
    (The types are collected in C: a generator over 262k values costs tens of milliseconds.)"""
    return set(map(type, values)) <= {kind}


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_tokenizer(model: Any, background: bool = False) -> Tokenizer:
    """The tokenizer of a model: an open ModelFile, or a path to a GGUF, `.m` or `.t` file.
    `background`: the encoder is built in a thread, the first encode() waits for it."""
    return Tokenizer(load_vocab(model), background=background)


def describe_tokenizer(model: Any) -> dict[str, Any]:
    """What `Tokenizer.describe()` says, from the vocabulary alone (no encoder is built)."""
    from dair.tokenizer.core import describe_vocab

    return describe_vocab(load_vocab(model))


def load_vocab(model: Any) -> Vocab:
    """The vocabulary of an open ModelFile, or of a GGUF, `.m` or `.t` file by path."""
    if isinstance(model, (str, Path)):
        path = Path(model)
        if path.suffix == ".t":
            from dair.tokenizer.dllama_t import read_t

            return read_t(path)
        if _is_gguf(path):  # the text side needs the header only, not the tensors
            from dair.model.gguf_header import GGUFHeader

            return vocab_from_gguf(GGUFHeader(path))
        from dair.model import open_model

        with open_model(path) as mf:
            return load_vocab(mf)
    fmt = getattr(model, "format", None)
    if fmt == "gguf":
        return vocab_from_gguf(model)
    if fmt == "dllama":
        from dair.tokenizer.dllama_t import read_t

        t_path = Path(model.path).with_suffix(".t")
        if not t_path.is_file():
            raise DairError(f"{model.path}: no tokenizer next to it (expected {t_path})")
        return read_t(t_path)
    raise DairError(f"cannot load a tokenizer from {model!r}")
