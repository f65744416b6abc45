"""The model hyper-parameters every part of dair needs, whatever the file format."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" (also mistral-style models that use the llama tensor set)
    dim: int
    hidden_dim: int  # FFN width
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rope_dim: int  # rotated dimensions per head (== head_dim for llama)
    rms_eps: float
    tied_embeddings: bool
    # None, or {"type": "linear"|"yarn"|"llama3", "factor": ..., "original_context_length": ...,
    # "low_freq_factor": ..., "high_freq_factor": ...}; llama3 GGUFs carry the per-frequency
    # factors as the tensor named in "freq_factors_tensor" instead.
    rope_scaling: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
