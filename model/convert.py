"""GGUF → distributed-llama `.m` + `.t`.

Tensors whose GGUF type already is the target type are copied byte for byte; others are
dequantized to float32 and re-encoded (f32 is exact for every source type; q40 from Q4_1 is a
re-quantization and loses a little). Token ids are kept as they are: SmolLM2 keeps its special
tokens at ids 0-16, which dllama's own tokenizer mistakes for the regular vocabulary (see
formats-dllama.md), so dllama itself tokenizes such a conversion badly; dair reads it exactly.
"""
from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

from dair.errors import DairError
from dair.model import open_model, qtypes
from dair.model.arch import LAYER_FIELDS
from dair.model.base import ModelFile, Tensor
from dair.model.dllama_file import (
    _LAYER_ORDER,
    ARCH_LLAMA,
    FLOAT_TYPE_IDS,
    HIDDEN_ACT_SILU,
    KEY_IDS,
    MAGIC,
)

WEIGHT_TYPES = {"f32": "F32", "f16": "F16", "q40": "Q4_0", "q80": "Q8_0"}
_ROWS_PER_CHUNK = 4096  # re-encode big matrices in slices to bound memory


def _header(mf: ModelFile, weight_qtype: str) -> bytes:
    c = mf.config
    if c.rope_scaling:
        raise DairError(f"{mf.path}: rope scaling {c.rope_scaling.get('type')} cannot be expressed in a .m file")
    if c.rope_dim != c.head_dim:
        raise DairError(f"{mf.path}: partial rope (rope_dim {c.rope_dim} of head_dim {c.head_dim}) "
                        "cannot be expressed in a .m file")
    if float(c.rope_theta) != round(c.rope_theta):
        raise DairError(f"{mf.path}: rope theta {c.rope_theta} is not an integer, as a .m file needs")
    eps = min((5, 6), key=lambda k: abs(c.rms_eps - 10.0 ** -k))
    if abs(c.rms_eps - 10.0 ** -eps) > 1e-3 * 10.0 ** -eps:
        raise DairError(f"{mf.path}: rms epsilon {c.rms_eps:g} cannot be expressed in a .m file (1e-5 or 1e-6)")
    params = {
        "version": 0, "arch_type": ARCH_LLAMA, "dim": c.dim, "hidden_dim": c.hidden_dim,
        "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "n_experts": 0,
        "n_active_experts": 0, "vocab_size": c.vocab_size, "max_seq_len": c.context_length,
        "hidden_act": HIDDEN_ACT_SILU, "rope_theta": int(round(c.rope_theta)),
        "weights_float_type": FLOAT_TYPE_IDS[weight_qtype], "norm_epsilon": eps,
    }
    if c.head_dim != c.dim // c.n_heads:
        params["head_dim"] = c.head_dim
    body = b"".join(struct.pack("<ii", KEY_IDS[k], v) for k, v in params.items())
    return struct.pack("<ii", MAGIC, 8 + len(body)) + body


def _encode(t: Tensor, qtype: str) -> list[bytes]:
    if t.qtype == qtype:
        return [t.raw.tobytes()]
    rows = t.shape[0] if len(t.shape) == 2 else 1
    row_bytes = t.nbytes // rows
    out = []
    for r0 in range(0, rows, _ROWS_PER_CHUNK):
        r1 = min(rows, r0 + _ROWS_PER_CHUNK)
        chunk = t.raw[r0 * row_bytes:r1 * row_bytes]
        shape = (r1 - r0, t.shape[-1]) if len(t.shape) == 2 else t.shape
        values = qtypes.dequantize(t.qtype, chunk, shape)
        out.append(qtypes.quantize(qtype, values).tobytes())
    return out


def convert_gguf_to_dllama(src: str | Path, dst: str | Path, weight_type: str = "q40",
                           progress: bool = False) -> tuple[Path, Path | None]:
    """Write `dst` (.m) and its `.t` next to it; returns both paths (no .t for a GGUF
    without a tokenizer)."""
    if weight_type not in WEIGHT_TYPES:
        raise DairError(f"weight type {weight_type!r} is not one of {', '.join(WEIGHT_TYPES)}")
    wq = WEIGHT_TYPES[weight_type]
    dst = Path(dst)
    t_path = dst.with_suffix(".t")
    with open_model(src) as mf:
        if mf.format != "gguf":
            raise DairError(f"{src}: convert reads GGUF files; this one is {mf.format}")
        c = mf.config
        if c.arch not in ("llama", "mistral") or c.n_experts:
            raise DairError(f"{src}: convert writes dense llama models; this one is {c.arch}"
                            f"{' with experts' if c.n_experts else ''}")
        if c.dim % 32 or c.hidden_dim % 32 or (c.n_heads * c.head_dim) % 32:
            if wq in ("Q4_0", "Q8_0"):
                raise DairError(f"{src}: dimensions are not multiples of 32, use --type f32 or f16")
        plan: list[tuple[Tensor, str]] = [(mf.embedding, "F32")]
        for i in range(c.n_layers):
            lt = mf.layer_tensors(i)
            plan += [(lt[LAYER_FIELDS[short + ".weight"]], wq if weighted else "F32")
                     for short, _, weighted in _LAYER_ORDER]
        plan += [(mf.output_norm, "F32"), (mf.output, wq)]
        tmp = dst.with_name(dst.name + ".part")
        try:
            with open(tmp, "wb") as f:
                f.write(_header(mf, wq))
                for k, (t, qt) in enumerate(plan):
                    for chunk in _encode(t, qt):
                        f.write(chunk)
                    if progress and (k % 16 == 0 or k == len(plan) - 1):
                        print(f"\r  converting: {k + 1}/{len(plan)} tensors", end="", file=sys.stderr, flush=True)
                f.flush()
                os.fsync(f.fileno())
            if progress:
                print(file=sys.stderr)
            os.replace(tmp, dst)
        finally:
            if tmp.exists():
                tmp.unlink()
        if mf.get("tokenizer.ggml.model") is None:
            print(f"dair: {src} has no tokenizer; wrote no .t", file=sys.stderr)
            return dst, None
        from dair.tokenizer import load_tokenizer
        from dair.tokenizer.dllama_t import write_t

        tok = load_tokenizer(mf)
        write_t(t_path, tok.vocab, eos_ids=list(tok.eos_ids))
    return dst, t_path


__all__ = ["convert_gguf_to_dllama", "WEIGHT_TYPES"]
