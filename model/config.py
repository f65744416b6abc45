"""The model hyper-parameters every part of dair needs, whatever the file format."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# The rope.scaling.type values of a GGUF that dair computes (as llama.cpp does); others are refused.
ROPE_SCALING_TYPES = ("none", "linear", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # a key of dair.model.arch.FAMILIES: llama, mistral, qwen2, qwen3, qwen3moe, gemma3
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
    # None, or {"type": "none"|"linear"|"yarn"|"llama3", "factor": ..., and as the type has them:
    # "attn_factor", "original_context_length", "ext_factor", "beta_fast", "beta_slow" (yarn),
    # "low_freq_factor", "high_freq_factor" (llama3 of .m files)}; llama3 GGUFs carry their
    # per-pair factors as the tensor named in "freq_factors_tensor". dair.engine.rope applies it.
    rope_scaling: dict[str, Any] | None = field(default=None)
    # What the family changes in the llama block (resolved once by dair.model.arch.resolve).
    rope_style: str = "norm"  # "norm": rotate adjacent pairs; "neox": rotate the halves of a head
    ffn_act: str = "silu"  # gate activation: "silu" | "gelu_tanh"
    n_experts: int = 0  # mixture of experts when > 0
    n_experts_used: int = 0  # experts each token is routed to
    expert_hidden_dim: int = 0  # FFN width of one expert
    moe_norm_weights: bool = True  # the chosen experts' router weights renormalised to sum 1
    expert_weights_scale: float = 0.0  # then multiplied by this, when not 0
    embed_scale: float = 1.0  # embeddings multiplied by this (gemma: sqrt(dim))
    attn_scale: float = 0.0  # q.k multiplier; 0 = 1/sqrt(head_dim)
    sliding_window: int = 0  # keys visible to a sliding layer (its own position included); 0 = none
    swa_pattern: int = 0  # of every swa_pattern layers the last is global, the others sliding
    rope_theta_swa: float = 0.0  # rotary base of the sliding layers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
