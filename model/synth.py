"""Synthetic models of real shape: a valid GGUF with random weights, for measuring scale.

Every family of dair.model.arch can be written (qwen3 q/k norms, qwen2 biases, MoE experts,
gemma3 post-norms and sliding windows); norm weights are drawn near 1 and biases near 0 so
that a forward pass that skipped or misplaced one would show it.

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
from typing import Any

import numpy as np

from dair.errors import DairError
from dair.model.arch import LAYER_TENSORS, VECTORS, layer_fields


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
    arch: str = "llama"
    key_length: int = 0  # head_dim when it is not dim / n_heads (qwen3, gemma3)
    n_experts: int = 0
    n_experts_used: int = 0
    expert_hidden_dim: int = 0
    sliding_window: int = 0  # gemma3
    # Long-context rotary: (key under {arch}.rope.scaling., value) pairs written as they are
    # (str, int as uint32, float as float32), e.g. (("type", "yarn"), ("factor", 4.0)).
    rope_scaling: tuple[tuple[str, str | int | float], ...] = ()
    rope_freqs: bool = False  # a llama3-style rope_freqs.weight tensor (per-pair divisors)

    @property
    def head_dim(self) -> int:
        return self.key_length or self.dim // self.n_heads

    # What dair.model.arch.layer_fields reads off a config.
    @property
    def config_view(self) -> object:
        from types import SimpleNamespace

        return SimpleNamespace(arch=self.arch, n_experts=self.n_experts)


SHAPES: dict[str, Shape] = {
    "tiny": Shape(256, 768, 4, 8, 4, 512, 2048, 10000.0),
    "tiny-v262k": Shape(256, 768, 2, 8, 4, 262144, 2048, 10000.0),  # Gemma 3's vocabulary size: opening it
    "llama-7b": Shape(4096, 11008, 32, 32, 32, 32000, 4096, 10000.0),  # Llama 2 7B
    "llama-8b": Shape(4096, 14336, 32, 32, 8, 128256, 8192, 500000.0),  # Llama 3 8B
    "llama-13b": Shape(5120, 13824, 40, 40, 40, 32000, 4096, 10000.0),  # Llama 2 13B
    # Small ones of each family, for tests against the numpy reference.
    "tiny-qwen2": Shape(128, 256, 2, 4, 2, 512, 2048, 1e6, 1e-6, arch="qwen2"),
    "tiny-qwen3": Shape(128, 256, 2, 4, 2, 512, 2048, 1e6, 1e-6, arch="qwen3", key_length=64),
    "tiny-mixtral": Shape(128, 256, 2, 4, 2, 512, 2048, 1e4, 1e-5, n_experts=4, n_experts_used=2,
                          expert_hidden_dim=256),
    "tiny-qwen3moe": Shape(128, 256, 2, 4, 2, 512, 2048, 1e6, 1e-6, arch="qwen3moe", key_length=64,
                           n_experts=8, n_experts_used=2, expert_hidden_dim=128),
    "tiny-gemma3": Shape(128, 256, 6, 4, 1, 512, 2048, 1e6, 1e-6, arch="gemma3", key_length=64,
                         sliding_window=8),
    # Real shapes (random weights): Qwen3-30B-A3B, Gemma 3 27B.
    "qwen3-30b-a3b": Shape(2048, 6144, 48, 32, 4, 151936, 40960, 1e6, 1e-6, arch="qwen3moe", key_length=128,
                           n_experts=128, n_experts_used=8, expert_hidden_dim=768),
    "gemma3-27b": Shape(5376, 21504, 62, 32, 16, 262144, 131072, 1e6, 1e-6, arch="gemma3", key_length=128,
                        sliding_window=1024),
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
    """(name, numpy shape, type, target std of the entries; for F32 vectors: 1 for norm weights
    near 1, 0 for biases near 0), in file order."""
    q_rows, kv_rows, hd = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.head_dim
    e, eff = s.n_experts, s.expert_hidden_dim
    shapes = {
        "attn_norm": (s.dim,), "ffn_norm": (s.dim,), "attn_post_norm": (s.dim,), "ffn_post_norm": (s.dim,),
        "q_norm": (hd,), "k_norm": (hd,), "bq": (q_rows,), "bk": (kv_rows,), "bv": (kv_rows,),
        "wq": (q_rows, s.dim), "wk": (kv_rows, s.dim), "wv": (kv_rows, s.dim), "wo": (s.dim, q_rows),
        "w_gate": (s.hidden_dim, s.dim), "w_up": (s.hidden_dim, s.dim), "w_down": (s.dim, s.hidden_dim),
        "router": (e, s.dim), "gate_exps": (e, eff, s.dim), "up_exps": (e, eff, s.dim),
        "down_exps": (e, s.dim, eff),
    }
    fields = layer_fields(s.config_view)
    # gemma3 scales embeddings by sqrt(dim) and ties the output to them: rows of norm ~1 keep both sane.
    plan = [("token_embd.weight", (s.vocab_size, s.dim), qtype, s.dim ** -0.5 if s.arch == "gemma3" else 1.0)]
    for i in range(s.n_layers):
        for f in LAYER_TENSORS:  # the table's order: attention, then the FFN
            if f not in fields:
                continue
            shp = shapes[f]
            if f in VECTORS:
                plan.append((f"blk.{i}.{LAYER_TENSORS[f]}", shp, "F32", 0.0 if f.startswith("b") else 1.0))
            else:
                # The router in F32, as llama.cpp's quantizer leaves it.
                plan.append((f"blk.{i}.{LAYER_TENSORS[f]}", shp, "F32_MAT" if f == "router" else qtype,
                             shp[-1] ** -0.5))
    if s.rope_freqs:
        plan.append(("rope_freqs.weight", (hd // 2,), "ROPE_FREQS", 0.0))
    plan += [("output_norm.weight", (s.dim,), "F32", 1.0)]
    if s.arch != "gemma3":  # gemma3 ties the output to the embedding
        plan += [("output.weight", (s.vocab_size, s.dim), qtype, s.dim ** -0.5)]
    return plan


def _quant_blocks(rng: np.random.Generator, qtype: str, shape: tuple[int, int], std: float) -> np.ndarray:
    """Random blocks of `qtype` whose dequantized entries have about `std` deviation."""
    bv, bb, code_rms = _QUANT[qtype]
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    n_blocks = rows * cols // bv
    raw = rng.bit_generator.random_raw(-(-n_blocks * bb // 8)).view(np.uint8)[: n_blocks * bb]
    blocks = raw.reshape(n_blocks, bb)
    # Scales jittered by ±25% around the target, from the block's own random first byte, with
    # a random sign: uniform codes are not zero-mean (nibble - 8 averages -0.5), and a common
    # bias in every row would feed a growing common mode through the residual stream.
    b0 = blocks[:, 0].astype(np.float32)
    d = (std / code_rms) * (0.75 + b0 / 510.0) * (1.0 - 2.0 * (blocks[:, 1] & 1))
    blocks[:, :2] = d.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(*shape[:-1], cols // bv * bb)


def synth_tensors(s: Shape, qtype: str, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    rng = np.random.Generator(np.random.SFC64(seed))
    for name, shape, qt, std in _tensor_plan(s, qtype):
        if qt == "ROPE_FREQS":
            # llama3's shape: high frequencies kept (1), low ones slowed (8), a ramp between.
            ramp = np.clip(np.linspace(-0.5, 1.5, shape[0]), 0.0, 1.0)
            yield name, (1.0 + 7.0 * ramp).astype(np.float32)
        elif qt == "F32" and s.arch == "llama" and not s.n_experts:
            yield name, np.ones(shape, np.float32)  # the scale shapes, as they always were
        elif qt == "F32":
            yield name, (std + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif qt == "F32_MAT":
            yield name, (std * rng.standard_normal(shape)).astype(np.float32)
        elif qt == "F16":
            yield name, (std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
        else:
            yield name, _quant_blocks(rng, qt, shape, std)  # type: ignore[arg-type]


def write_synth(path: str | Path, shape: str | Shape = "tiny", qtype: str = "Q4_0", n_layers: int | None = None,
                seed: int = 0, progress: Callable[[int, int], None] | None = None,
                tokenizer: Callable[[Any], None] | None = None) -> Path:
    """Write a synthetic GGUF of a named shape; returns its path. `n_layers` overrides the
    shape's layer count (a 7B-wide model of 2 layers is a fast test of real widths).
    `tokenizer`, called with the gguf.GGUFWriter, writes the tokenizer metadata instead of the
    byte-level BPE (e.g. a real model's vocabulary, of the shape's vocab_size tokens)."""
    import gguf

    if not isinstance(shape, Shape) and shape not in SHAPES:
        raise DairError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")
    qtype = qtype.upper()
    if qtype not in _QUANT and qtype != "F16":
        raise DairError(f"synthetic weights of type {qtype!r}: expected q4_0, q8_0 or f16")
    s = shape if isinstance(shape, Shape) else SHAPES[shape]
    shape = f"{s.arch} {s.dim}" if isinstance(shape, Shape) else shape
    if n_layers is not None:
        if n_layers < 1:
            raise DairError(f"--layers {n_layers}: a model needs at least one layer")
        s = Shape(**{**s.__dict__, "n_layers": n_layers})
    path = Path(path)
    w = gguf.GGUFWriter(str(path), s.arch)
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
    if s.key_length:
        w.add_key_length(s.key_length)
        w.add_value_length(s.key_length)
    if s.n_experts:
        w.add_expert_count(s.n_experts)
        w.add_expert_used_count(s.n_experts_used)
        w.add_expert_feed_forward_length(s.expert_hidden_dim)
    if s.sliding_window:
        w.add_sliding_window(s.sliding_window)
    for key, value in s.rope_scaling:
        add = w.add_string if isinstance(value, str) else w.add_uint32 if isinstance(value, int) else w.add_float32
        add(f"{s.arch}.rope.scaling.{key}", value)
    w.add_file_type({"F16": 1, "Q4_0": 2, "Q8_0": 7}[qtype])
    if tokenizer is not None:
        tokenizer(w)
    else:
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
        if qt in ("F32", "F32_MAT", "ROPE_FREQS"):
            nbytes = int(np.prod(shp)) * 4
            w.add_tensor_info(name, shp, np.dtype(np.float32), nbytes)
        elif qt == "F16":
            nbytes = int(np.prod(shp)) * 2
            w.add_tensor_info(name, shp, np.dtype(np.float16), nbytes)
        else:
            bv, bb, _ = _QUANT[qt]
            byte_shape = (*shp[:-1], shp[-1] // bv * bb)
            nbytes = int(np.prod(byte_shape))
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
    """A one-line progress report on stderr: bytes written, MiB/s."""
    import sys

    from dair.units import format_bytes

    t0 = time.perf_counter()
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] < 0.5 and done < total:
            return
        last[0] = now
        rate = done / max(now - t0, 1e-9)
        sys.stderr.write(f"\rwrote {format_bytes(done, unit='GiB', digits=2)} / "
                         f"{format_bytes(total, unit='GiB', digits=2)} ({format_bytes(rate)}/s)")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report
