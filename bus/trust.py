"""What the bus accepts from a stage: only the work it gave that stage, once, at bounded cost.

A stage is trusted for its role and nothing more: an activation or a result is accepted only
from the stage the bus sent that step to (its connection), for that step, once. These checks
run before any of a message's entries has an effect, and cost one dictionary look-up per
entry; a message carrying more entries than the stage was given is refused whole, and a peer
that keeps sending refused work has its messages dropped unread for a while (RefusalBudget).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dair.bus.protocol import Step

# Entries a stage may return beyond the steps it holds right now: the steps of a batch it was
# computing when a cancel or a failover made them stale. An honest stage's batch is at most
# [stage] max_batch segments plus the last message it took in; anything far beyond is made up.
STALE_SLACK = 64
# A peer's budget of refused messages and entries: it may spend this many at once, and earns
# REFUSAL_RATE back per second. Beyond it, its messages are dropped before they are decoded, so
# that a flood costs the bus next to nothing; a malformed-input test sending thousands of
# messages (each answered) stays well inside it.
REFUSAL_BURST = 4096.0
REFUSAL_RATE = 1024.0


class Refused(Exception):
    """A stage's message that is not the work it was given (`msg` says why)."""


class RefusalBudget:
    """Per-peer token buckets of refusals (peer = ROUTER identity)."""

    def __init__(self, burst: float = REFUSAL_BURST, rate: float = REFUSAL_RATE) -> None:
        self.burst = burst
        self.rate = rate
        self._level: dict[bytes, tuple[float, float]] = {}  # ident -> (tokens left, when)

    def _now_level(self, ident: bytes, now: float) -> float:
        level, t = self._level.get(ident, (self.burst, now))
        return min(self.burst, level + (now - t) * self.rate)

    def charge(self, ident: bytes, n: float, now: float) -> None:
        self._level[ident] = (self._now_level(ident, now) - n, now)

    def exhausted(self, ident: bytes, now: float) -> bool:
        return ident in self._level and self._now_level(ident, now) <= 0.0

    def prune(self, now: float) -> None:
        """Forget peers whose bucket is full again (the dict stays as small as the offenders)."""
        for ident in [i for i in self._level if self._now_level(i, now) >= self.burst]:
            del self._level[ident]


@dataclass
class Check:
    """Entries of one stage message: the ones to act on, and how many were stale."""
    accepted: list[tuple[Any, Any]]  # (session, entry)
    stale: int


def _sid_step(e: Any) -> tuple[Any, Any]:
    """(session id, step id) of an entry: an act's Step, or a tokens result (a map)."""
    if isinstance(e, Step):
        return e.sid, e.step_id
    return e.get("sid"), e.get("q")


def check_entries(sessions: dict[str, Any], ident: bytes, held: int, entries: list[Any], what: str) -> Check:
    """Entries (an act's Steps or a tokens message's results) of a message from the stage `ident`,
    which holds `held` steps. Raises Refused when the message is not that stage's work: more
    entries than it was given, or an entry for a step in flight at another stage or not sent yet
    (made up, or another session's). Stale entries (steps no longer in flight) are counted, not
    acted on."""
    if len(entries) > held + STALE_SLACK:
        raise Refused(f"{what} with {len(entries)} entries, this stage holds {held} steps")
    accepted, stale, steps = [], 0, set()
    for e in entries:
        sid, q = _sid_step(e)
        s = sessions.get(sid)
        if s is None or not isinstance(q, int) or q not in s.qs:
            stale += 1
            continue
        if s.qs[q] != ident:
            raise Refused(f"{what} for step {q} of session {sid}, which this stage was not given")
        accepted.append((s, e))
        steps.add(q)
    if len(steps) != len(accepted):
        raise Refused(f"{what} with the same step twice")
    return Check(accepted, stale)
