"""Rotary position frequencies and magnitude: llama3.1, linear and YaRN long-context scaling.

Every scaling dair runs keeps the angle of pair i linear in the position (pos * f_i), so the
whole of it folds into the per-pair frequencies the kernel takes; YaRN also multiplies cos and
sin by a magnitude (`magnitude`), which the kernel applies to the rotated dims only, as ggml does.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

# YaRN's ramp corners when the file does not give them (llama.cpp's defaults).
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0


def _yarn_corr_dims(rope_dim: int, orig_ctx: int, base: float, beta_fast: float, beta_slow: float) -> tuple[float, float]:
    """Pair-index range over which YaRN blends from extrapolation (below) to interpolation (above):
    the dims that turn beta_fast resp. beta_slow times over the original context."""
    def dim(n_rot: float) -> float:
        return rope_dim * math.log(orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(base))
    return max(0.0, math.floor(dim(beta_fast))), min(rope_dim - 1.0, math.ceil(dim(beta_slow)))


def inv_freq(rope_dim: int, theta: float, scaling: dict[str, Any] | None = None,
             freq_factors: np.ndarray | None = None) -> np.ndarray:
    """Per-pair angular frequencies (float32, rope_dim // 2): pair i turns by pos * result[i].

    `freq_factors` (llama3 GGUFs' rope_freqs.weight) divide the base frequencies before any
    scaling, as ggml's rope does with its third operand.
    """
    freqs = theta ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    if freq_factors is not None:
        freqs = freqs / np.asarray(freq_factors, dtype=np.float64)
    kind = scaling.get("type") if scaling else None
    if kind == "llama3" and "low_freq_factor" in scaling:
        # llama3.1 (distributed-llama files): long wavelengths slowed by `factor`, short ones
        # kept, a smooth ramp between. GGUFs carry the same factors precomputed as freq_factors.
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        orig = float(scaling["original_context_length"])
        wavelen = 2 * math.pi / freqs
        smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
        scaled = np.where(wavelen > orig / low, freqs / factor, freqs)
        mid = (wavelen <= orig / low) & (wavelen >= orig / high)
        freqs = np.where(mid, (1 - smooth) * freqs / factor + smooth * freqs, scaled)
    elif kind == "linear":
        freqs = freqs / float(scaling["factor"])
    elif kind == "yarn":
        # Interpolated angle = extrapolated / factor; pair i takes a mix of the two, all
        # extrapolation below the ramp, all interpolation above it. Both are pos * constant.
        scale = 1.0 / float(scaling["factor"])
        ext = float(scaling.get("ext_factor", 1.0))
        low, high = _yarn_corr_dims(rope_dim, int(scaling["original_context_length"]), theta,
                                    float(scaling.get("beta_fast", YARN_BETA_FAST)),
                                    float(scaling.get("beta_slow", YARN_BETA_SLOW)))
        pair = np.arange(rope_dim // 2, dtype=np.float64)
        mix = (1.0 - np.clip((pair - low) / max(0.001, high - low), 0.0, 1.0)) * ext
        freqs = freqs * (scale * (1.0 - mix) + mix)
    return freqs.astype(np.float32)


def magnitude(scaling: dict[str, Any] | None, sliding: bool = False) -> float:
    """What cos and sin are multiplied by: the file's attn_factor, times YaRN's 1 + 0.1 ln(factor)
    (so q.k over the rotated dims grows by its square, the temperature YaRN was trained with).
    Sliding-window layers (gemma3) rotate unscaled but, as in llama.cpp, keep the attn_factor."""
    if not scaling:
        return 1.0
    m = float(scaling.get("attn_factor", 1.0))
    if sliding:
        return m
    factor = float(scaling.get("factor", 1.0))
    if scaling.get("type") == "yarn" and float(scaling.get("ext_factor", 1.0)) != 0.0 and factor > 1.0:
        m *= 1.0 + 0.1 * math.log(factor)
    return m
