"""When to try the bus again: exponential backoff with a cap and jitter (the ZeroMQ guide's
Paranoid Pirate), shared by stages and clients. Pure state, no clock: callers sleep or wait."""
from __future__ import annotations

import random
from typing import Any

from dair.config import ReconnectConfig, section


class Backoff:
    """Delays of `initial_s`, then twice the last, at most `max_s`, each shortened by a random
    fraction of up to `jitter` (so peers that lost the bus together do not retry together, and
    no delay exceeds the cap). `reset()` once the bus answers again."""

    def __init__(self, initial_s: float, max_s: float, jitter: float, rng: random.Random | None = None) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError(f"backoff: need 0 < initial ({initial_s}) <= max ({max_s})")
        if not 0 <= jitter < 1:
            raise ValueError(f"backoff: jitter {jitter} must be in [0, 1)")
        self.initial_s, self.max_s, self.jitter = initial_s, max_s, jitter
        self.rng = rng or random.Random()
        self.attempts = 0

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | ReconnectConfig | None = None,
                    rng: random.Random | None = None) -> Backoff:
        """From config.toml's [reconnect] (a load_config dict, the typed view, or None: defaults)."""
        rc = cfg if isinstance(cfg, ReconnectConfig) else section(ReconnectConfig, cfg)
        return cls(rc.initial_ms / 1000.0, rc.max_ms / 1000.0, rc.jitter, rng)

    def ceiling(self, attempt: int) -> float:
        """The delay before retry number `attempt` (0-based) without jitter."""
        return min(self.max_s, self.initial_s * 2.0 ** min(attempt, 60))

    def next(self) -> float:
        """The delay before the next retry; each call counts one attempt."""
        d = self.ceiling(self.attempts) * (1.0 - self.jitter * self.rng.random())
        self.attempts += 1
        return d

    def reset(self) -> None:
        self.attempts = 0


def zmq_reconnect_options(cfg: dict[str, Any] | ReconnectConfig | None = None) -> dict[int, int]:
    """Socket options that give ZeroMQ's own TCP reconnects the same schedule: libzmq doubles
    RECONNECT_IVL up to RECONNECT_IVL_MAX and adds a random part of the base interval."""
    import zmq

    rc = cfg if isinstance(cfg, ReconnectConfig) else section(ReconnectConfig, cfg)
    return {zmq.RECONNECT_IVL: int(rc.initial_ms), zmq.RECONNECT_IVL_MAX: int(rc.max_ms)}
