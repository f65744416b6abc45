"""dair against llama.cpp's own outputs on the default model (tests/data, see its README).

The criteria are the reference data's: teacher-forced, the logits of llama.cpp's top-5 tokens
are within 1.25 at every step and the top-1 token is the same wherever llama.cpp's lead is
over 0.75; a greedy continuation may part from llama.cpp's only at a near-tie.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dair.engine.forward import RangeEngine
from dair.engine.sampling import SamplingParams

DATA = Path(__file__).parent.parent / "data"
REF = json.loads((DATA / "SmolLM2-135M-Instruct.Q4_1.ref.json").read_text())
PROMPTS = sorted(REF["prompts"])
LOGIT_TOL, LEAD = 1.25, 0.75


def teacher_forced(eng: RangeEngine, ids: list[int]) -> np.ndarray:
    eng.open_session("tf")
    try:
        x = eng.run_layers(eng.embed(np.array(ids, np.int32)), [("tf", np.arange(len(ids), dtype=np.int32))])
        return eng.head(x)
    finally:
        eng.close_session("tf")


@pytest.fixture(scope="module", params=[True, False], ids=["q8-activations", "f32-activations"])
def engine(request, model_file) -> RangeEngine:
    return RangeEngine(model_file, 0, model_file.config.n_layers - 1, act_q8=request.param)


def check_teacher_forced(logits: np.ndarray, case: dict) -> float:
    """Asserts the criteria; returns the worst logit difference seen."""
    n_prompt, worst = len(case["prompt_ids"]), 0.0
    for step, top5 in enumerate(case["top5"]):
        row = logits[n_prompt - 1 + step]
        for tok, ref_logit in top5:
            worst = max(worst, abs(float(row[tok]) - ref_logit))
            assert abs(row[tok] - ref_logit) < LOGIT_TOL, (step, tok, float(row[tok]), ref_logit)
        if top5[0][1] - top5[1][1] > LEAD:
            assert int(row.argmax()) == top5[0][0], f"step {step}: top-1 {int(row.argmax())} != {top5[0][0]}"
    return worst


@pytest.mark.parametrize("name", PROMPTS)
def test_teacher_forced_logits_agree_with_llama_cpp(engine, name):
    case = REF["prompts"][name]
    logits = teacher_forced(engine, case["prompt_ids"] + case["ids"])
    check_teacher_forced(logits, case)


# Cosine against llama.cpp's full logits vector: the float32 pass measures 0.9994; 8-bit activations
# 0.9971-0.9987 depending on rounding details (an ideal numpy simulation of llama.cpp's Q8_1 rounding
# measures 0.9988), though teacher-forced top-5 logits are as close as the float32 pass (mean error
# 0.13-0.16 vs 0.12-0.19). Bounds: 0.999 for float32, 0.995 for 8-bit activations.
@pytest.mark.parametrize("name", ["capital", "robot"])
def test_full_logits_vector_at_prompt_end(engine, name):
    case = REF["prompts"][name]
    want = np.load(DATA / f"SmolLM2-135M-Instruct.Q4_1.{name}.logits.npy")
    got = teacher_forced(engine, case["prompt_ids"])[-1]
    cos = float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))
    assert cos > (0.995 if engine.act_q8 else 0.999) and np.abs(got - want).max() < LOGIT_TOL, (cos, float(np.abs(got - want).max()))
    assert int(got.argmax()) == int(want.argmax())


@pytest.mark.parametrize("name", PROMPTS)
def test_greedy_continuation_parts_only_at_near_tie(local_backend, name):
    case = REF["prompts"][name]
    out = local_backend.generate(case["prompt_ids"], SamplingParams(temperature=0), len(case["ids"]),
                                 {REF["eos"]})["ids"]
    for step, (mine, theirs) in enumerate(zip(out, case["ids"], strict=False)):
        if mine != theirs:
            top = dict(case["top5"][step])
            assert mine in top and top[theirs] - top[mine] < LEAD, \
                f"step {step}: chose {mine}, llama.cpp {theirs} with top5 {case['top5'][step]}"
            return
    assert out == case["ids"][: len(out)]
