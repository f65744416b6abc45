"""Rotary position frequencies, including llama3.1's long-context scaling."""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def inv_freq(rope_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> np.ndarray:
    """Per-pair inverse frequencies (float32, rope_dim // 2) for the adjacent-pair rope of GGUF llama."""
    freqs = theta ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    if scaling and scaling.get("type") == "llama3":
        # llama3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        orig = float(scaling["original_context_length"])
        wavelen = 2 * math.pi / freqs
        smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
        scaled = np.where(wavelen > orig / low, freqs / factor, freqs)
        mid = (wavelen <= orig / low) & (wavelen >= orig / high)
        freqs = np.where(mid, (1 - smooth) * freqs / factor + smooth * freqs, scaled)
    elif scaling and scaling.get("type") == "linear":
        freqs = freqs / float(scaling["factor"])
    return freqs.astype(np.float32)
