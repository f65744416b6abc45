"""`dair score` against llama.cpp on files of every weight type, on every kernel family.

tests/data/quant/llama.<TYPE>.gguf are one random-weight llama model quantized by llama.cpp to
each type, with llama.cpp's teacher-forced top-8 logits at every prompt position and its greedy
continuation with the top-5 at every step (llama.<TYPE>.ref.json; see tests/data/README.md).
Each file runs on every kernel family this CPU has (avx512, avx2, scalar), selected by set_kernels.
Criteria: llama.cpp's top-5 logits within 0.75 at every position, and the same top-1 wherever
llama.cpp's top-1 leads by more than 0.5.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dair.backend import LocalBackend
from dair.ops.matmul import KERNELS, kernel_table, set_kernels

DATA = Path(__file__).parent.parent / "data" / "quant"
FILES = sorted(p.name[len("llama."):-len(".gguf")] for p in DATA.glob("llama.*.gguf"))
LOGIT_TOL, LEAD = 0.75, 0.5


@pytest.fixture(params=KERNELS)
def kernels(request):
    old = set_kernels(request.param)
    yield request.param
    set_kernels(old)


@pytest.fixture(scope="module", params=FILES)
def case(request):
    ref = json.loads((DATA / f"llama.{request.param}.ref.json").read_text())
    backend = LocalBackend(DATA / f"llama.{request.param}.gguf", quiet=True)
    yield request.param, backend, ref
    backend.close()


def test_score_agrees_with_llama_cpp(case, kernels):
    name, backend, ref = case
    types = sorted({t.qtype for t in backend.model.tensors.values()})
    ran = {t: kernel_table(kernels)[t] for t in types}
    # The selected family itself serves every quantized type (no silent fall-back to another).
    assert all(fam in (kernels, "float") for fam in ran.values()), (name, kernels, ran)
    ids = ref["prompt_ids"] + ref["greedy_ids"]
    vocab = backend.model.config.vocab_size
    got = backend.score(ids, top_k=vocab)["positions"]
    n_prompt = len(ref["prompt_ids"])
    wanted = list(enumerate(ref["teacher_forced_top8"])) + [
        (n_prompt - 1 + step, top) for step, top in enumerate(ref["greedy_top5"])]
    worst = 0.0
    for pos, top in wanted:
        mine = dict((int(i), v) for i, v in got[pos]["top"])
        for tok, logit in top[:5]:
            worst = max(worst, abs(mine[tok] - logit))
            assert abs(mine[tok] - logit) < LOGIT_TOL, (name, kernels, ran, pos, tok, mine[tok], logit)
        if top[0][1] - top[1][1] > LEAD:
            assert int(got[pos]["top"][0][0]) == top[0][0], (name, kernels, ran, pos)
    print(f"{name} on {kernels} ({ran}): worst top-5 logit difference {worst:.3f}")
