"""Synthetic llama models of real shape: a valid GGUF with random weights, for measuring scale.

The layout, metadata and tensor types are those of a real model of the shape; the weights are
random blocks generated directly in their quantized form (random nibbles or int8 values under
fp16 scales), one tensor at a time, so a 4 GB file is written at disk speed without holding
the model in RAM. Scales give every matrix entries of standard deviation 1/sqrt(cols), so each
product keeps unit-scale activations and the residual stream grows only like sqrt(layers):
activations stay finite through all layers. The tokenizer is a byte-level BPE (256 byte tokens
plus merges that spell longer tokens) so that every part of dair accepts the file; it has no
linguistic quality.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dair.errors import DairError


@dataclass(frozen=True)
class Shape:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


SHAPES: dict[str, Shape] = {
    "tiny": Shape(256, 768, 4, 8, 4, 512, 2048, 10000.0),
    "tiny-v262k": Shape(256, 768, 2, 8, 4, 262144, 2048, 10000.0),  # Gemma 3's vocabulary size: opening it
    "llama-7b": Shape(4096, 11008, 32, 32, 32, 32000, 4096, 10000.0),  # Llama 2 7B
    "llama-8b": Shape(4096, 14336, 32, 32, 8, 128256, 8192, 500000.0),  # Llama 3 8B
    "llama-13b": Shape(5120, 13824, 40, 40, 40, 32000, 4096, 10000.0),  # Llama 2 13B
}

# Per quantized type: block values, block bytes, rms of the integer codes as dequantized
# (Q4_0: nibble - 8, uniform over -8..7; Q8_0: int8 uniform over -128..127).
_QUANT = {"Q4_0": (32, 18, 4.637), "Q8_0": (32, 34, 73.9)}


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (bytes_to_unicode)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def synth_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): id 0 is the control token <|endoftext|>, ids 1..256 the
    bytes, every further token the merge of an earlier token and one byte."""
    if vocab_size < 257 + 1:
        raise DairError(f"synthetic vocabulary needs at least 258 tokens, got {vocab_size}")
    byte_chars = _byte_chars()
    tokens = ["<|endoftext|>", *byte_chars]
    merges = []
    i = 0
    while len(tokens) < vocab_size:
        left, right = tokens[1 + i // 256], byte_chars[i % 256]
        merges.append(f"{left} {right}")
        tokens.append(left + right)
        i += 1
    types = [3] + [1] * (len(tokens) - 1)  # CONTROL, then NORMAL
    return tokens, types, merges


def _tensor_plan(s: Shape, qtype: str) -> list[tuple[str, tuple[int, ...], str, float]]:
    """(name, numpy shape, type, target std of the entries), in file order."""
    q_rows, kv_rows = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    plan = [("token_embd.weight", (s.vocab_size, s.dim), qtype, 1.0)]
    for i in range(s.n_layers):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (s.dim,), "F32", 0.0),
            (p + "attn_q.weight", (q_rows, s.dim), qtype, s.dim ** -0.5),
            (p + "attn_k.weight", (kv_rows, s.dim), qtype, s.dim ** -0.5),
            (p + "attn_v.weight", (kv_rows, s.dim), qtype, s.dim ** -0.5),
            (p + "attn_output.weight", (s.dim, q_rows), qtype, q_rows ** -0.5),
            (p + "ffn_norm.weight", (s.dim,), "F32", 0.0),
            (p + "ffn_gate.weight", (s.hidden_dim, s.dim), qtype, s.dim ** -0.5),
            (p + "ffn_up.weight", (s.hidden_dim, s.dim), qtype, s.dim ** -0.5),
            (p + "ffn_down.weight", (s.dim, s.hidden_dim), qtype, s.hidden_dim ** -0.5),
        ]
    plan += [("output_norm.weight", (s.dim,), "F32", 0.0),
             ("output.weight", (s.vocab_size, s.dim), qtype, s.dim ** -0.5)]
    return plan


def _quant_blocks(rng: np.random.Generator, qtype: str, shape: tuple[int, int], std: float) -> np.ndarray:
    """Random blocks of `qtype` whose dequantized entries have about `std` deviation."""
    bv, bb, code_rms = _QUANT[qtype]
    n_blocks = shape[0] * shape[1] // bv
    raw = rng.bit_generator.random_raw(-(-n_blocks * bb // 8)).view(np.uint8)[: n_blocks * bb]
    blocks = raw.reshape(n_blocks, bb)
    # Scales jittered by ±25% around the target, from the block's own random first byte, with
    # a random sign: uniform codes are not zero-mean (nibble - 8 averages -0.5), and a common
    # bias in every row would feed a growing common mode through the residual stream.
    b0 = blocks[:, 0].astype(np.float32)
    d = (std / code_rms) * (0.75 + b0 / 510.0) * (1.0 - 2.0 * (blocks[:, 1] & 1))
    blocks[:, :2] = d.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(shape[0], shape[1] // bv * bb)


def synth_tensors(s: Shape, qtype: str, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    rng = np.random.Generator(np.random.SFC64(seed))
    for name, shape, qt, std in _tensor_plan(s, qtype):
        if qt == "F32":
            yield name, np.ones(shape, np.float32)
        else:
            yield name, _quant_blocks(rng, qt, shape, std)  # type: ignore[arg-type]


def write_synth(path: str | Path, shape: str = "tiny", qtype: str = "Q4_0", n_layers: int | None = None,
                seed: int = 0, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a synthetic GGUF of a named shape; returns its path. `n_layers` overrides the
    shape's layer count (a 7B-wide model of 2 layers is a fast test of real widths)."""
    import gguf

    if shape not in SHAPES:
        raise DairError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")
    qtype = qtype.upper()
    if qtype not in _QUANT:
        raise DairError(f"synthetic weights of type {qtype!r}: expected q4_0 or q8_0")
    s = SHAPES[shape]
    if n_layers is not None:
        if n_layers < 1:
            raise DairError(f"--layers {n_layers}: a model needs at least one layer")
        s = Shape(**{**s.__dict__, "n_layers": n_layers})
    path = Path(path)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"dair synthetic {shape} {qtype}")
    w.add_block_count(s.n_layers)
    w.add_context_length(s.context_length)
    w.add_embedding_length(s.dim)
    w.add_feed_forward_length(s.hidden_dim)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_rope_freq_base(s.rope_theta)
    w.add_rope_dimension_count(s.head_dim)
    w.add_vocab_size(s.vocab_size)
    w.add_file_type({"Q4_0": 2, "Q8_0": 7}[qtype])
    tokens, types, merges = synth_vocab(s.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    plan = _tensor_plan(s, qtype)
    qt_enum = gguf.GGMLQuantizationType
    total = 0
    for name, shp, qt, _ in plan:
        if qt == "F32":
            nbytes = int(np.prod(shp)) * 4
            w.add_tensor_info(name, shp, np.dtype(np.float32), nbytes)
        else:
            bv, bb, _ = _QUANT[qt]
            byte_shape = (shp[0], shp[1] // bv * bb)
            nbytes = byte_shape[0] * byte_shape[1]
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qt_enum[qt])
        total += nbytes
    try:
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        done = 0
        for _name, arr in synth_tensors(s, qtype, seed):
            w.write_tensor_data(arr)
            done += arr.nbytes
            if progress:
                progress(done, total)
        w.close()
    except BaseException:
        w.close()
        path.unlink(missing_ok=True)
        raise
    return path


def synth_cli_progress() -> Callable[[int, int], None]:
    """A one-line progress report on stderr: bytes written, MB/s."""
    import sys

    t0 = time.perf_counter()
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] < 0.5 and done < total:
            return
        last[0] = now
        rate = done / 1e6 / max(now - t0, 1e-9)
        sys.stderr.write(f"\rwrote {done / 2**30:.2f} / {total / 2**30:.2f} GiB ({rate:.0f} MB/s)")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report
