"""distributed-llama `.m` model files (see formats-dllama.md), read through the same interface.

A `.m` has no tensor table: the layout follows from the header, in dllama's fixed order.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from dair.errors import ModelFormatError
from dair.model import qtypes
from dair.model.base import ModelFile, Tensor, read_only_map
from dair.model.config import ModelConfig

MAGIC = 0x0A00ABCD
OLD_MAGICS = (0xABCD00, 0xABCD01)

# key id -> name, as in distributed-llama's LlmHeaderKey.
HEADER_KEYS = {
    0: "version", 1: "arch_type", 2: "dim", 3: "hidden_dim", 4: "n_layers", 5: "n_heads",
    6: "n_kv_heads", 7: "n_experts", 8: "n_active_experts", 9: "vocab_size", 10: "max_seq_len",
    11: "hidden_act", 12: "rope_theta", 13: "weights_float_type", 14: "rope_scaling_factor",
    15: "rope_scaling_low_freq_factor", 16: "rope_scaling_high_freq_factor",
    17: "rope_scaling_orig_max_seq_len", 18: "rope_type", 19: "head_dim", 20: "norm_epsilon",
    21: "moe_hidden_dim",
}
KEY_IDS = {name: k for k, name in HEADER_KEYS.items()}
ARCH_LLAMA, ARCH_QWEN3, ARCH_QWEN3_MOE = 0xABCD00, 0xABCD01, 0xABCD02
ARCH_NAMES = {ARCH_LLAMA: "LLAMA", ARCH_QWEN3: "QWEN3", ARCH_QWEN3_MOE: "QWEN3_MOE"}
HIDDEN_ACT_SILU = 1
ROPE_LLAMA3_1 = 2
# weights_float_type -> our qtype name (Q40/Q80 share GGUF Q4_0/Q8_0 block layouts)
FLOAT_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q8_0"}
FLOAT_TYPE_IDS = {v: k for k, v in FLOAT_TYPES.items()}
# float32 values, as dllama (and GGUF) hold them
NORM_EPS = {5: float(np.float32(1e-5)), 6: float(np.float32(1e-6))}

# Per-layer tensors in file order: (GGUF short name, shape fn, stored in the weights type?)
_LAYER_ORDER = (
    ("attn_q", lambda c: (c.n_heads * c.head_dim, c.dim), True),
    ("attn_k", lambda c: (c.n_kv_heads * c.head_dim, c.dim), True),
    ("attn_v", lambda c: (c.n_kv_heads * c.head_dim, c.dim), True),
    ("attn_output", lambda c: (c.dim, c.n_heads * c.head_dim), True),
    ("ffn_gate", lambda c: (c.hidden_dim, c.dim), True),
    ("ffn_down", lambda c: (c.dim, c.hidden_dim), True),
    ("ffn_up", lambda c: (c.hidden_dim, c.dim), True),
    ("attn_norm", lambda c: (c.dim,), False),
    ("ffn_norm", lambda c: (c.dim,), False),
)


def read_header(path: Path, data: np.ndarray) -> tuple[dict[str, int], int]:
    """(named header values, header size = offset of the first tensor)."""
    if len(data) < 8:
        raise ModelFormatError(path, f"truncated: {len(data)} bytes, shorter than a .m header")
    magic, header_size = struct.unpack_from("<ii", data, 0)
    if magic in OLD_MAGICS:
        raise ModelFormatError(path, f"old distributed-llama model format (magic 0x{magic:X}): reconvert it")
    if magic != MAGIC:
        raise ModelFormatError(path, f"bad magic 0x{magic & 0xFFFFFFFF:08X}, not a distributed-llama .m file")
    if header_size < 8 or (header_size - 8) % 8:
        raise ModelFormatError(path, f"bad header size {header_size}")
    if header_size > len(data):
        raise ModelFormatError(path, f"truncated: header needs {header_size} bytes, file has {len(data)}")
    n_pairs = (header_size - 8) // 8
    values: dict[str, int] = {}
    for k in range(n_pairs):
        key, value = struct.unpack_from("<ii", data, 8 + 8 * k)
        name = HEADER_KEYS.get(key)
        if name is None:
            raise ModelFormatError(path, f"unknown header key {key} (value {value})")
        values[name] = value
    return values, header_size


class DllamaModel(ModelFile):
    format = "dllama"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._map = read_only_map(self.path)
        except ValueError:  # numpy refuses to map an empty file
            raise ModelFormatError(self.path, "empty file, not a model") from None
        except OSError as e:
            raise ModelFormatError(self.path, f"cannot map the file ({e.strerror})") from None
        self.header, self.header_size = read_header(self.path, self._map)
        self.metadata: dict[str, Any] = dict(self.header)
        self.config = self._config()
        self.tensors = self._layout()
        self._validate()
        self.fingerprint = self._compute_fingerprint(self._map[: self.header_size])

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def _need(self, name: str) -> int:
        if name not in self.header:
            raise ModelFormatError(self.path, f"missing header key {name} ({KEY_IDS[name]})")
        return self.header[name]

    def _config(self) -> ModelConfig:
        h = self.header
        arch = h.get("arch_type", ARCH_LLAMA)
        if arch != ARCH_LLAMA:
            name = ARCH_NAMES.get(arch, f"0x{arch:X}")
            raise ModelFormatError(self.path, f"architecture {name} is not supported (dair runs LLAMA)")
        if h.get("n_experts", 0):
            raise ModelFormatError(self.path, f"mixture-of-experts ({h['n_experts']} experts) is not supported")
        if h.get("hidden_act", HIDDEN_ACT_SILU) != HIDDEN_ACT_SILU:
            raise ModelFormatError(self.path, f"hidden_act {h['hidden_act']} is not supported (only silu, 1)")
        wt = self._need("weights_float_type")
        if wt not in FLOAT_TYPES:
            raise ModelFormatError(self.path, f"weights_float_type {wt} is not supported (0 F32, 1 F16, 2 Q40, 3 Q80)")
        self.weight_type = FLOAT_TYPES[wt]
        eps_code = h.get("norm_epsilon", 5)
        if eps_code not in NORM_EPS:
            raise ModelFormatError(self.path, f"norm_epsilon code {eps_code} is not supported (5 or 6)")
        dim, n_heads = self._need("dim"), self._need("n_heads")
        n_kv = h.get("n_kv_heads", n_heads)
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "vocab_size"):
            if self._need(name) <= 0:
                raise ModelFormatError(self.path, f"{name} is {h[name]}, must be positive")
        if n_kv <= 0 or n_heads % n_kv:
            raise ModelFormatError(self.path, f"{n_heads} heads / {n_kv} KV heads is not a valid grouping")
        head_dim = h.get("head_dim") or dim // n_heads
        scaling = None
        if h.get("rope_type") == ROPE_LLAMA3_1:
            scaling = {"type": "llama3", "factor": float(h.get("rope_scaling_factor", 1)),
                       "low_freq_factor": float(h.get("rope_scaling_low_freq_factor", 0)),
                       "high_freq_factor": float(h.get("rope_scaling_high_freq_factor", 0)),
                       "original_context_length": int(h.get("rope_scaling_orig_max_seq_len", 0))}
        return ModelConfig(
            arch="llama", dim=dim, hidden_dim=self._need("hidden_dim"), n_layers=self._need("n_layers"),
            n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, vocab_size=self._need("vocab_size"),
            context_length=h.get("max_seq_len", 2048), rope_theta=float(h.get("rope_theta", 10000)),
            rope_dim=head_dim, rms_eps=NORM_EPS[eps_code], tied_embeddings=False, rope_scaling=scaling,
        )

    def _layout(self) -> dict[str, Tensor]:
        c, wt = self.config, self.weight_type
        plan: list[tuple[str, str, tuple[int, ...]]] = [("token_embd.weight", "F32", (c.vocab_size, c.dim))]
        for i in range(c.n_layers):
            for short, shape_fn, weighted in _LAYER_ORDER:
                plan.append((f"blk.{i}.{short}.weight", wt if weighted else "F32", shape_fn(c)))
        plan.append(("output_norm.weight", "F32", (c.dim,)))
        plan.append(("output.weight", wt, (c.vocab_size, c.dim)))
        tensors: dict[str, Tensor] = {}
        offset, size = self.header_size, len(self._map)
        for name, qt, shape in plan:
            if shape[-1] % qtypes.QTYPES[qt].block_values:
                raise ModelFormatError(self.path, f"{name}: row of {shape[-1]} values is not a whole number "
                                       f"of {qt} blocks")
            nbytes = qtypes.tensor_nbytes(qt, int(np.prod(shape)))
            if offset + nbytes > size:
                raise ModelFormatError(self.path, f"truncated: {name} ends at byte {offset + nbytes} but the "
                                       f"file has {size} bytes")
            tensors[name] = Tensor(name, qt, shape, self._map[offset:offset + nbytes], offset, nbytes)
            offset += nbytes
        if offset != size:
            raise ModelFormatError(self.path, f"{size - offset} bytes after the last tensor: the header does not "
                                   "describe this file")
        return tensors
