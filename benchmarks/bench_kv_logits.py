"""How far the KV cache types move dair's logits over 2,000 teacher-forced tokens, beside how far
they move llama.cpp's (tests/data/SmolLM2-135M-Instruct.Q4_1.kv2000.ref.json, made by
tests/data/make_kv_ref.py): worst and mean absolute difference over llama.cpp's top five tokens
at every position, and the positions above 0.5. Run under DAIR_KERNELS=avx2 for the AVX2 family.

    python benchmarks/bench_kv_logits.py [--float-path]

--float-path also runs the float32 activation path (act_q8=False), where the cache's own error
shows without the 8-bit activations' amplification: f16 to Q8_0 and to f32 over dair f16's top
five, with the 99th and 99.9th percentiles of the per-position worst.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dair.engine.forward import RangeEngine
from dair.model import open_model
from dair.model.fetch import default_model_path
from dair.ops.matmul import kernel_table

REF = Path(__file__).resolve().parent.parent / "tests" / "data" / "SmolLM2-135M-Instruct.Q4_1.kv2000.ref.json"


def teacher_forced(eng: RangeEngine, ids: list[int], chunk: int = 256) -> np.ndarray:
    eng.open_session("tf")
    out = []
    for a in range(0, len(ids), chunk):
        part = np.asarray(ids[a:a + chunk], np.int32)
        x = eng.run_layers(eng.embed(part), [("tf", np.arange(a, a + part.size, dtype=np.int32))])
        out.append(eng.head(x))
    eng.close_session("tf")
    return np.concatenate(out)


def spread(a: np.ndarray, b: np.ndarray) -> str:
    d = np.abs(a - b)
    return f"worst {d.max():.3f}, mean {d.mean():.4f}, positions above 0.5: {int((d.max(1) > 0.5).sum())}"


def float_path(m, ids: list[int]) -> None:
    last = m.config.n_layers - 1
    lg = {kv: teacher_forced(RangeEngine(m, 0, last, kv_type=kv, act_q8=False), ids) for kv in ("f16", "q8_0", "f32")}
    top = np.argsort(-lg["f16"], axis=1)[:, :5]
    base = np.take_along_axis(lg["f16"], top, 1)
    for kv in ("q8_0", "f32"):
        d = np.abs(np.take_along_axis(lg[kv], top, 1) - base)
        worst = d.max(1)
        print(f"float path, dair f16 -> {kv} cache: {spread(np.take_along_axis(lg[kv], top, 1), base)}; "
              f"per-position worst p99 {np.quantile(worst, 0.99):.3f}, p99.9 {np.quantile(worst, 0.999):.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--float-path", action="store_true")
    args = ap.parse_args(argv)
    ref = json.loads(REF.read_text())
    top = np.asarray(ref["top5_ids"])
    llama = {k: np.asarray(ref[k]) for k in ("f16", "f16_flash", "q8_0_flash")}
    m = open_model(default_model_path())
    last = m.config.n_layers - 1
    dair = {kv: np.take_along_axis(teacher_forced(RangeEngine(m, 0, last, kv_type=kv), ref["ids"]), top, 1)
            for kv in ("f16", "q8_0")}
    print(f"{len(ref['ids'])} tokens, dair kernels: {kernel_table()['Q4_1']} family; over llama.cpp's top five:")
    print("llama.cpp f16 default vs f16 flash attention:", spread(llama["f16_flash"], llama["f16"]))
    print("llama.cpp f16 -> Q8_0 cache (flash both):     ", spread(llama["q8_0_flash"], llama["f16_flash"]))
    print("dair f16 -> Q8_0 cache:                       ", spread(dair["q8_0"], dair["f16"]))
    print("dair f16 vs llama.cpp f16:                    ", spread(dair["f16"], llama["f16"]))
    print("dair Q8_0 vs llama.cpp Q8_0:                  ", spread(dair["q8_0"], llama["q8_0_flash"]))
    if args.float_path:
        float_path(m, ref["ids"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
