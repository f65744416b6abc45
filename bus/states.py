"""The states of a stage, in two vocabularies.

Liveness is what the bus decides by (readiness, failover, placement): a stage is loading its
range, ready to serve it, a standby without one, or dead. Display states refine READY for the
dashboard: a ready stage that computed since its last heartbeat is BUSY, one whose range streams
from disk is STREAMING. A stage reports its display state; the bus counts both as READY.
"""
from __future__ import annotations

# Liveness.
LOADING = "loading"
READY = "ready"
STANDBY = "standby"
DEAD = "dead"
LIVENESS = (LOADING, READY, STANDBY, DEAD)

# Display states of a ready stage.
BUSY = "busy"
STREAMING = "streaming"
DISPLAY = (BUSY, STREAMING)

# The states in which a stage serves its range.
LIVE = (READY, BUSY, STREAMING)
ALL = LIVENESS + DISPLAY


def liveness(state: str) -> str:
    """The liveness of a reported state: READY for BUSY and STREAMING, else the state itself."""
    return READY if state in DISPLAY else state


def is_live(state: str) -> bool:
    return state in LIVE
