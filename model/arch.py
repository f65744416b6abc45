"""The model families dair runs, as data: which tensors a layer has and how they combine.

Every family is the llama block (pre-norm attention, then a pre-norm gated FFN, each added to
the residual stream) with a few switches; the switches are resolved here once per file, from
`general.architecture` and the metadata, into a ModelConfig, and the forward pass reads them
(engine/forward.py). Each switch is what llama.cpp does for the architecture (src/models/*.cpp
and llama-model.cpp's hyper-parameter loading):

- rotary style: llama rotates adjacent pairs (2i, 2i+1) ("norm"); qwen2/qwen3/gemma3 rotate the
  two halves of each head (i, i + rope_dim/2) ("neox").
- q/k/v biases (qwen2), per-head RMSNorm of q and k before rotary (qwen3, qwen3moe, gemma3).
- FFN: dense gated, or a mixture of experts (softmax router, top-k, the chosen weights
  renormalised to sum 1 for llama/Mixtral and qwen3moe); gate activation SiLU, or GELU with
  the tanh approximation (gemma3).
- gemma3: embedding scaled by sqrt(dim), RMSNorm of the attention and FFN outputs before the
  residual add, q scaled by 1/sqrt(head_dim) (1/sqrt(dim/heads) for the 27B), and 5 of every 6
  layers attend to a sliding window with their own rotary base (10000).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# The tensor-name table, the one place it is written: LayerWeights field -> GGUF tensor name
# inside block i ("blk.{i}." + name).
LAYER_TENSORS: dict[str, str] = {
    "attn_norm": "attn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "bq": "attn_q.bias",
    "bk": "attn_k.bias",
    "bv": "attn_v.bias",
    "q_norm": "attn_q_norm.weight",
    "k_norm": "attn_k_norm.weight",
    "wo": "attn_output.weight",
    "attn_post_norm": "post_attention_norm.weight",
    "ffn_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
    "router": "ffn_gate_inp.weight",
    "gate_exps": "ffn_gate_exps.weight",
    "up_exps": "ffn_up_exps.weight",
    "down_exps": "ffn_down_exps.weight",
    "ffn_post_norm": "post_ffw_norm.weight",
}
LAYER_FIELDS = {name: field for field, name in LAYER_TENSORS.items()}
GLOBAL_TENSORS = ("token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight")

ATTN = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm")
DENSE_FFN = ("w_gate", "w_up", "w_down")
MOE_FFN = ("router", "gate_exps", "up_exps", "down_exps")
VECTORS = frozenset({"attn_norm", "bq", "bk", "bv", "q_norm", "k_norm", "attn_post_norm", "ffn_norm",
                     "ffn_post_norm"})
EXPERTS = frozenset({"gate_exps", "up_exps", "down_exps"})


@dataclass(frozen=True)
class Family:
    """What sets an architecture apart from llama's block."""

    name: str
    rope_style: str = "norm"  # "norm": adjacent pairs; "neox": the two halves of each head
    extra: tuple[str, ...] = ()  # layer tensors beyond ATTN + the FFN's
    moe: bool = False  # experts allowed (llama: when expert_count > 0; qwen3moe: always)
    moe_norm_weights: bool = True  # renormalise the top-k router weights to sum 1
    ffn_act: str = "silu"  # "silu" | "gelu_tanh"
    embed_scale: bool = False  # multiply embeddings by sqrt(dim)
    swa_pattern: int = 0  # every n-th layer (n-1, 2n-1, ...) is global, the others sliding; 0 = none
    swa_rope_base: float = 0.0  # rotary base of the sliding layers


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", moe=True),
    Family("mistral", moe=True),
    Family("qwen2", rope_style="neox", extra=("bq", "bk", "bv")),
    Family("qwen3", rope_style="neox", extra=("q_norm", "k_norm")),
    Family("qwen3moe", rope_style="neox", extra=("q_norm", "k_norm"), moe=True),
    Family("gemma3", rope_style="neox", extra=("q_norm", "k_norm", "attn_post_norm", "ffn_post_norm"),
           ffn_act="gelu_tanh", embed_scale=True, swa_pattern=6, swa_rope_base=10000.0),
)}

# llama.cpp picks Gemma 3's attention scale by model size; the 27B (62 layers) is the odd one.
_GEMMA3_27B_LAYERS = 62


def layer_fields(cfg: Any) -> tuple[str, ...]:
    """The LayerWeights fields every layer of a model of this config must have."""
    fam = FAMILIES[cfg.arch]
    return ATTN + fam.extra + (MOE_FFN if cfg.n_experts else DENSE_FFN)


def resolve(arch: str, meta: dict[str, Any], dim: int, n_heads: int, head_dim: int,
            n_layers: int) -> dict[str, Any]:
    """The ModelConfig fields that depend on the family, from GGUF metadata (keys `arch.*`)."""
    fam = FAMILIES[arch]
    a = arch
    n_exp = int(meta.get(f"{a}.expert_count", 0) or 0)
    out: dict[str, Any] = {
        "rope_style": fam.rope_style,
        "ffn_act": fam.ffn_act,
        "n_experts": n_exp,
        "n_experts_used": int(meta.get(f"{a}.expert_used_count", 0) or 0) if n_exp else 0,
        "expert_hidden_dim": 0,
        "moe_norm_weights": fam.moe_norm_weights,
        "expert_weights_scale": float(meta.get(f"{a}.expert_weights_scale", 0.0) or 0.0),
        "embed_scale": math.sqrt(dim) if fam.embed_scale else 1.0,
        "attn_scale": 0.0,  # 1/sqrt(head_dim)
        "sliding_window": 0,
        "swa_pattern": 0,
        "rope_theta_swa": 0.0,
    }
    if n_exp:
        ff = int(meta.get(f"{a}.feed_forward_length", 0) or 0)
        used = out["n_experts_used"] or 1
        # llama.cpp: expert_feed_forward_length when given; qwen3moe otherwise n_ff / used, llama n_ff.
        default = ff // used if arch == "qwen3moe" else ff
        out["expert_hidden_dim"] = int(meta.get(f"{a}.expert_feed_forward_length", 0) or default)
    if arch == "gemma3":
        if n_layers == _GEMMA3_27B_LAYERS:
            out["attn_scale"] = 1.0 / math.sqrt(dim // n_heads)
        window = int(meta.get(f"{a}.attention.sliding_window", 0) or 0)
        if window > 0:
            out.update(sliding_window=window, swa_pattern=fam.swa_pattern, rope_theta_swa=fam.swa_rope_base)
    return out


def is_sliding(cfg: Any, layer: int) -> bool:
    """Whether layer attends to a sliding window (llama.cpp's set_swa_pattern: the last layer of
    every group of swa_pattern is global)."""
    p = cfg.swa_pattern
    return bool(cfg.sliding_window) and p > 0 and layer % p < p - 1
