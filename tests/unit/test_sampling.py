"""Sampling: greedy, filters, penalties, and draws that depend only on (seed, position)."""
from __future__ import annotations

import numpy as np
import pytest

from dair.engine.sampling import SamplingParams, sample_token, top_logits
from dair.errors import DairError

rng = np.random.default_rng(7)
LOGITS = rng.normal(size=1000).astype(np.float32) * 3


def test_greedy_is_argmax():
    assert sample_token(LOGITS, SamplingParams(temperature=0), [], 0) == int(LOGITS.argmax())


def test_top_k_one_is_greedy_at_any_temperature():
    p = SamplingParams(temperature=1.5, top_k=1, seed=3)
    assert all(sample_token(LOGITS, p, [], pos) == int(LOGITS.argmax()) for pos in range(20))


def test_draws_are_a_function_of_seed_and_position():
    p = SamplingParams(temperature=1.0, seed=11)
    a = [sample_token(LOGITS, p, [], pos) for pos in range(50)]
    b = [sample_token(LOGITS, p, [], pos) for pos in range(50)]
    c = [sample_token(LOGITS, SamplingParams(temperature=1.0, seed=12), [], pos) for pos in range(50)]
    assert a == b and a != c
    # order of calls does not matter: position 30 alone gives the same token
    assert sample_token(LOGITS, p, [], 30) == a[30]


def test_temperature_one_follows_softmax():
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    p = SamplingParams(temperature=1.0, seed=1)
    counts = np.bincount([sample_token(logits, p, [], pos) for pos in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


def test_top_p_and_min_p_cut_the_tail():
    logits = np.log(np.array([0.6, 0.25, 0.1, 0.05], np.float32))
    seen_p = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.8, seed=2), [], i) for i in range(500)}
    assert seen_p == {0, 1}
    seen_m = {sample_token(logits, SamplingParams(temperature=1.0, min_p=0.3, seed=2), [], i) for i in range(500)}
    assert seen_m == {0, 1}


def test_repeat_penalty_pushes_recent_tokens_down():
    logits = np.array([2.0, 1.9, -1.0], np.float32)
    assert sample_token(logits, SamplingParams(repeat_penalty=1.5), [0], 0) == 1
    assert sample_token(logits, SamplingParams(repeat_penalty=1.5, repeat_last_n=1), [0, 2], 0) == 0


def test_invalid_settings_are_refused():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"min_p": 1.5}, {"top_k": -2}, {"nonsense": 1},
                {"temperature": float("nan")}, {"repeat_penalty": float("inf")}, {"top_p": float("nan")}):
        with pytest.raises(DairError):
            SamplingParams.from_dict(bad)


def test_top_logits_and_logprobs():
    logits = np.stack([LOGITS, LOGITS[::-1]])
    top, lp = top_logits(logits, 3, np.array([5, 7]))
    assert [t[0] for t in top[0]] == list(np.argsort(-LOGITS)[:3])
    ls = LOGITS.astype(np.float64)
    want = ls[5] - np.log(np.exp(ls - ls.max()).sum()) - ls.max()
    assert abs(lp[0] - want) < 1e-4
