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
from dair.tokenizer.vocab import NORMAL, Vocab

__all__ = ["load_tokenizer", "Tokenizer", "StreamDecoder", "Vocab", "vocab_from_gguf"]


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
        pairs = []
        for m in merges:
            left, sep, right = m.partition(" ")
            if not sep:
                raise ModelFormatError(mf.path, f"malformed BPE merge {m!r}")
            pairs.append((left, right))
    if kind == "gpt2" and pairs is None:
        raise ModelFormatError(mf.path, "gpt2 tokenizer without tokenizer.ggml.merges")
    eot = [mf.get(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
    default_bos = kind == "llama"  # llama.cpp's default when the key is absent
    return Vocab(
        kind=str(kind),
        tokens=list(tokens),
        token_types=[int(t) for t in types],
        scores=[float(s) for s in scores] if scores is not None else None,
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


def load_tokenizer(model: Any) -> Tokenizer:
    """The tokenizer of a model: an open ModelFile, or a path to a GGUF, `.m` or `.t` file."""
    if isinstance(model, (str, Path)):
        path = Path(model)
        if path.suffix == ".t":
            from dair.tokenizer.dllama_t import read_t

            return Tokenizer(read_t(path))
        from dair.model import open_model

        with open_model(path) as mf:
            return load_tokenizer(mf)
    fmt = getattr(model, "format", None)
    if fmt == "gguf":
        return Tokenizer(vocab_from_gguf(model))
    if fmt == "dllama":
        from dair.tokenizer.dllama_t import read_t

        t_path = Path(model.path).with_suffix(".t")
        if not t_path.is_file():
            raise DairError(f"{model.path}: no tokenizer next to it (expected {t_path})")
        return Tokenizer(read_t(t_path))
    raise DairError(f"cannot load a tokenizer from {model!r}")
