"""Choosing the next token from logits.

Randomness is a function of (seed, position) only, so any node that samples a step (after a
failover, say) draws the same token as the node it replaced.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from dair.config import defaults
from dair.errors import DairError


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = 0

    @classmethod
    def from_config(cls, **overrides) -> SamplingParams:
        """config.toml's [sampling] defaults, with the non-None overrides applied."""
        cfg = {k: v for k, v in defaults("sampling").items() if k in {f.name for f in fields(cls)}}
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(cfg)

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        names = {f.name: f.type for f in fields(cls)}
        unknown = set(d) - set(names)
        if unknown:
            raise DairError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}")
        p = cls(**{k: (int(v) if k in ("top_k", "repeat_last_n", "seed") else float(v)) for k, v in d.items()})
        p.validate()
        return p

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise DairError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise DairError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise DairError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise DairError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.top_k < 0 or self.repeat_last_n < 0:
            raise DairError("top_k and repeat_last_n must be >= 0")
        if self.repeat_penalty <= 0:
            raise DairError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _penalize(logits: np.ndarray, params: SamplingParams, history: Sequence[int]) -> np.ndarray:
    if params.repeat_penalty == 1.0 or not history or params.repeat_last_n == 0:
        return logits
    recent = np.unique(np.asarray(history[-params.repeat_last_n:], dtype=np.int64))
    recent = recent[(recent >= 0) & (recent < logits.size)]
    out = logits.copy()
    vals = out[recent]
    # llama.cpp's convention: shrink positive logits, push negative ones further down.
    out[recent] = np.where(vals > 0, vals / params.repeat_penalty, vals * params.repeat_penalty)
    return out


def sample_token(logits: np.ndarray, params: SamplingParams, history: Sequence[int], position: int) -> int:
    """The next token id. Greedy when temperature is 0; else top-k, top-p, min-p, then a draw."""
    logits = _penalize(np.asarray(logits, dtype=np.float32).reshape(-1), params, history)
    if params.greedy:
        return int(np.argmax(logits))
    k = params.top_k if 0 < params.top_k < logits.size else logits.size
    cand = np.argpartition(-logits, k - 1)[:k] if k < logits.size else np.arange(logits.size)
    cand = cand[np.argsort(-logits[cand], kind="stable")]
    z = logits[cand].astype(np.float64) / params.temperature
    p = np.exp(z - z[0])
    p /= p.sum()
    keep = p.size
    if params.top_p < 1.0:
        keep = min(keep, int(np.searchsorted(np.cumsum(p), params.top_p) + 1))
    if params.min_p > 0:
        keep = min(keep, max(1, int(np.count_nonzero(p >= params.min_p * p[0]))))
    p = p[:keep] / p[:keep].sum()
    rng = np.random.default_rng([params.seed & 0xFFFFFFFFFFFFFFFF, position])
    return int(cand[min(int(np.searchsorted(np.cumsum(p), rng.random(), side="right")), keep - 1)])


def top_logits(logits: np.ndarray, k: int, targets: np.ndarray | None = None
               ) -> tuple[list[list[tuple[int, float]]], np.ndarray | None]:
    """Per row: the k highest [id, logit] pairs, and the log-probability of targets[row] if given."""
    logits = np.asarray(logits, dtype=np.float32)
    k = max(1, min(k, logits.shape[1]))
    idx = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(logits, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    idx, vals = np.take_along_axis(idx, order, 1), np.take_along_axis(vals, order, 1)
    top = [[(int(i), float(v)) for i, v in zip(r_i, r_v, strict=False)] for r_i, r_v in zip(idx, vals, strict=False)]
    logprobs = None
    if targets is not None:
        m = logits.max(axis=1, keepdims=True).astype(np.float64)
        lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True))).reshape(-1)
        logprobs = (logits[np.arange(len(targets)), targets] - lse).astype(np.float32)
    return top, logprobs


def token_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` and the k most likely ids with theirs, from raw logits
    (before repeat penalty and temperature: the model's own distribution, as `score` gives it)."""
    row = np.asarray(logits, dtype=np.float32).reshape(1, -1)
    top, lp = top_logits(row, k, np.array([token], dtype=np.int64))
    assert lp is not None
    lse = float(row[0, token]) - float(lp[0])
    return float(lp[0]), [(i, v - lse) for i, v in top[0]]
