"""bus/trust.py in process: which entries of a stage's message the bus acts on, and the budgets."""
from __future__ import annotations

import pytest

from dair.bus.registry import _pool
from dair.bus.sessions import Session
from dair.bus.trust import REFUSAL_BURST, STALE_SLACK, RefusalBudget, Refused, check_entries

A, B = b"stage-a", b"stage-b"


def _sessions() -> dict[str, Session]:
    s1 = Session(sid="s1", client=b"c", ephemeral=True, params={})
    s2 = Session(sid="s2", client=b"c", ephemeral=True, params={})
    s1.qs = {10: A, 11: None}  # 10 sent to A; 11 made, not sent yet
    s2.qs = {20: B}
    return {"s1": s1, "s2": s2}


def test_only_the_holder_of_a_step_may_answer_it():
    sessions = _sessions()
    c = check_entries(sessions, A, 1, [{"sid": "s1", "q": 10}], "tokens")
    assert [(s.sid, e["q"]) for s, e in c.accepted] == [("s1", 10)] and c.stale == 0
    for entry in ({"sid": "s2", "q": 20},  # another stage's step
                  {"sid": "s1", "q": 11}):  # not sent yet: the step an accepted result just made
        with pytest.raises(Refused):
            check_entries(sessions, A, 1, [{"sid": "s1", "q": 10}, entry], "tokens")
    # A step under another session's id is no step of that session: never acted on.
    c = check_entries(sessions, A, 1, [{"sid": "s2", "q": 10}], "tokens")
    assert not c.accepted and c.stale == 1


def test_stale_entries_are_counted_not_refused_and_duplicates_are():
    sessions = _sessions()
    c = check_entries(sessions, A, 1, [{"sid": "s1", "q": 9}, {"sid": "gone", "q": 3}, {"sid": "s1", "q": 10}],
                      "act")
    assert c.stale == 2 and len(c.accepted) == 1
    with pytest.raises(Refused, match="twice"):
        check_entries(sessions, A, 1, [{"sid": "s1", "q": 10}, {"sid": "s1", "q": 10}], "tokens")


def test_more_entries_than_the_stage_was_given_are_refused_whole():
    sessions = _sessions()
    ok = [{"sid": "nobody", "q": i} for i in range(1 + STALE_SLACK)]
    assert check_entries(sessions, A, 1, ok, "tokens").stale == len(ok)
    with pytest.raises(Refused, match="entries"):
        check_entries(sessions, A, 1, ok + [{"sid": "s1", "q": 10}], "tokens")


def test_refusal_budget_spends_and_refills():
    b = RefusalBudget(burst=10, rate=5)
    assert not b.exhausted(A, 0.0)
    b.charge(A, 10, 0.0)
    assert b.exhausted(A, 0.0) and not b.exhausted(B, 0.0)
    assert not b.exhausted(A, 0.1)  # half a refusal earned back
    b.charge(A, 100_000, 1.0)  # one huge message: long out
    assert b.exhausted(A, 100.0) and not b.exhausted(A, 20_002.0)
    b.prune(30_000.0)
    assert not b._level
    assert REFUSAL_BURST >= 2000  # the fuzz tests send 2000 malformed messages, each answered


def test_a_stages_pool_report_is_taken_field_by_field():
    """The kernel pool's choice a stage reports (dair status shows it): known fields of the right
    types and ranges only; anything else becomes a neutral value."""
    good = {"threads": 2, "using": 1, "parallel_share": 0.25, "why": "absent"}
    assert _pool(good) == good
    assert _pool(None) == {"threads": 0, "using": 0, "parallel_share": None, "why": ""}
    bad = {"threads": True, "using": -1, "parallel_share": 7.5, "why": "x" * 10**4, "extra": [1] * 100}
    assert _pool(bad) == {"threads": 0, "using": 0, "parallel_share": None, "why": ""}
    assert _pool({"threads": 10**9, "parallel_share": "0.5"}) == {"threads": 0, "using": 0,
                                                                   "parallel_share": None, "why": ""}
