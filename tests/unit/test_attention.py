"""Attention kernels (ops/attn.h) against a plain-numpy float64 softmax(QK^T)V, every path this
build has (AVX-512, AVX2, plain C), every cache type (f32, f16, Q8_0 blocks made and read by the
`gguf` package), at long lengths (several key tiles and decode spans) and odd sizes; each row the
same bit for bit alone or in any batch; the rotated Q8_0 cache of engine/kvcache.py.

Bound: the cache's own values are the reference's inputs (Q8_0 dequantized by gguf), so the only
error is float32 arithmetic: |out - ref| <= 1e-4 * |ref| + 2e-5. With an f16 cache the reference
rounds as llama.cpp's CPU attention does (ggml converts the f32 operand of a product with an f16
one to f16): q before the dots, the normalised probabilities before they weight the values.
"""
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from dair.ops import threads
from dair.ops.attention import (
    ISAS,
    attention,
    get_isa,
    q8_0_row_bytes,
    rotate,
    rotation_block,
    set_isa,
    store_rotated_q8_0,
)

KINDS = ["f32", "f16", "q8_0"]


@pytest.fixture
def rng():
    return np.random.default_rng(1616)


@pytest.fixture(params=ISAS)
def isa(request):
    old = set_isa(request.param)
    yield request.param
    set_isa(old)


def make_cache(rng, kind, cap, KV, hd):
    """(cache array for the kernel, float64 values the reference sees)."""
    x = rng.standard_normal((cap, KV, hd)).astype(np.float32)
    if kind == "f32":
        return x, x.astype(np.float64)
    if kind == "f16":
        h = x.astype(np.float16)
        return h, h.astype(np.float64)
    raw = np.ascontiguousarray(quantize(x.reshape(-1, hd), GGMLQuantizationType.Q8_0)).view(np.uint8)
    vals = dequantize(raw, GGMLQuantizationType.Q8_0).reshape(cap, KV, hd)
    return raw.reshape(cap, KV, q8_0_row_bytes(hd)), vals.astype(np.float64)


def reference(q, k, v, pos, scale, window=0, round16=False):
    n, H, hd = q.shape
    if round16:
        q = q.astype(np.float16)
    G = H // k.shape[1]
    out = np.zeros((n, H, hd))
    t = np.arange(k.shape[0])[None, :]
    hidden = t > pos[:, None]
    if window:
        hidden |= t <= pos[:, None] - window
    for h in range(H):
        s = q[:, h].astype(np.float64) @ k[:, h // G].T * scale
        s[hidden] = -np.inf
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        if round16:
            p = p.astype(np.float16).astype(np.float64)
        out[:, h] = p @ v[:, h // G]
    return out


def assert_close(out, ref, kind, vref, what=""):
    """float32 arithmetic's bound; with an f16 cache, a probability within float32 error of an
    f16 rounding boundary may round the other way than the reference's: one f16 ulp of it (at
    most 2^-11) times a value, in a few (row, head) outputs only."""
    if kind == "f16":
        near = np.isclose(out, ref, rtol=1e-4, atol=2e-5)
        assert near.mean() > 0.98, f"{what}: {np.count_nonzero(~near)} of {near.size} elements off"
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2.0**-11 * np.abs(vref).max(), err_msg=what)
    else:
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5, err_msg=what)


def check(rng, kind, H, KV, hd, pos, scale=None, window=0):
    pos = np.asarray(pos, np.int32)
    cap = int(pos.max()) + 3
    q = rng.standard_normal((pos.size, H, hd)).astype(np.float32) * 2  # peaky softmaxes too
    kc, kref = make_cache(rng, kind, cap, KV, hd)
    vc, vref = make_cache(rng, kind, cap, KV, hd)
    out = attention(q, kc, vc, pos, scale=scale, window=window)
    ref = reference(q, kref, vref, pos, 1 / np.sqrt(hd) if scale is None else scale, window, kind == "f16")
    assert_close(out, ref, kind, vref, f"{get_isa()} {kind}")
    return q, kc, vc, pos


# Decode: one or a few query rows (a task per row and span of 256 keys, the spans merged at the end).
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("H,KV,hd,pos", [
    (9, 3, 64, [0]),
    (9, 3, 64, [4099]),             # 17 spans, the last one partial
    (16, 2, 128, [255, 256]),       # a span boundary
    (8, 8, 32, [10, 600, 300]),     # rows of different lengths: some have empty spans
    (7, 1, 64, [1030]),             # a group of 7 heads on one kv head
])
def test_decode(rng, isa, kind, H, KV, hd, pos):
    check(rng, kind, H, KV, hd, pos)


# Prefill: many query rows, 8 to a task, each tile of keys converted once for all of them.
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("H,KV,hd,start,n", [
    (9, 3, 64, 1750, 300),          # 2,050 keys: 33 tiles, the causal edge inside tiles
    (9, 3, 64, 0, 129),             # from position 0: the mask everywhere on the diagonal
    (16, 2, 128, 300, 37),
    (7, 1, 32, 63, 5),              # 5 rows: fewer than one prefill task holds
    (4, 2, 20, 3, 65),              # head_dim not a multiple of the vector width
    (3, 1, 8, 0, 17),
])
def test_prefill(rng, isa, kind, H, KV, hd, start, n):
    if kind == "q8_0" and hd % 32:
        pytest.skip("Q8_0 blocks need head_dim % 32 == 0")
    check(rng, kind, H, KV, hd, np.arange(start, start + n))


# Sliding window (gemma3's local layers): a row sees its last `window` positions only.
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("H,KV,hd,start,n,window", [
    (4, 1, 64, 0, 700, 512),        # rows before and past the window, in one batch
    (4, 1, 64, 1500, 40, 512),      # all past it: the first span of each row is partial
    (9, 3, 64, 2000, 1, 300),       # decode: a window that is not a multiple of the span
    (8, 4, 32, 250, 20, 1),         # a window of one: the row's own key only
])
def test_window(rng, isa, kind, H, KV, hd, start, n, window):
    check(rng, kind, H, KV, hd, np.arange(start, start + n), window=window)


def test_scale_and_out(rng, isa):
    q, kc, vc, pos = check(rng, "f16", 9, 3, 64, np.arange(40, 80), scale=0.3)
    out = np.empty_like(q)
    assert attention(q, kc, vc, pos, out=out, scale=0.3) is out
    np.testing.assert_array_equal(out, attention(q, kc, vc, pos, scale=0.3))


@pytest.mark.parametrize("n", [1, 200])
def test_threads_agree(rng, isa, n):
    """The work split does not depend on the thread count, so results are bit-identical."""
    pos = np.arange(2100 - n, 2100, dtype=np.int32)
    q = rng.standard_normal((n, 9, 64)).astype(np.float32)
    kc, _ = make_cache(rng, "f16", 2100, 3, 64)
    vc, _ = make_cache(rng, "f16", 2100, 3, 64)
    old = threads.get_num_threads()
    try:
        threads.set_num_threads(1)
        a = attention(q, kc, vc, pos)
        threads.set_num_threads(2)
        b = attention(q, kc, vc, pos)
    finally:
        threads.set_num_threads(old)
    np.testing.assert_array_equal(a, b)


def test_f16_cache_rounds_as_llama_cpp(rng, isa):
    """The f16 path's results are llama.cpp's rounding, not float32's: against the unrounded
    reference half the elements are off, against the rounded one almost none."""
    pos = np.arange(1750, 2050, dtype=np.int32)
    q = rng.standard_normal((pos.size, 9, 64)).astype(np.float32) * 2
    kc, kref = make_cache(rng, "f16", 2050, 3, 64)
    vc, vref = make_cache(rng, "f16", 2050, 3, 64)
    out = attention(q, kc, vc, pos)

    def off(round16: bool) -> float:
        ref = reference(q, kref, vref, pos, 1 / 8, 0, round16)
        return float((~np.isclose(out, ref, rtol=1e-4, atol=2e-5)).mean())

    assert off(True) < 0.002 and off(False) > 0.2, (off(True), off(False))


def test_rejects_bad_cache():
    q = np.zeros((2, 4, 64), np.float32)
    pos = np.array([3, 4], np.int32)
    with pytest.raises(ValueError, match="Q8_0 bytes per head"):
        attention(q, np.zeros((5, 2, 64), np.uint8), np.zeros((5, 2, 64), np.uint8), pos)
    with pytest.raises(ValueError, match="divisible by 32"):
        attention(np.zeros((2, 4, 20), np.float32), np.zeros((5, 2, 20), np.uint8),
                  np.zeros((5, 2, 20), np.uint8), pos)
    with pytest.raises(ValueError, match="dtype"):
        attention(q, np.zeros((5, 2, 64), np.int8), np.zeros((5, 2, 64), np.int8), pos)
    with pytest.raises(ValueError, match="not available"):
        set_isa("neon" if "neon" not in ISAS else "sse")
    with pytest.raises(ValueError, match="window"):
        attention(q, np.zeros((5, 2, 64), np.float32), np.zeros((5, 2, 64), np.float32), pos, window=-1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("H,KV,hd,start,n,window", [
    (9, 3, 64, 1800, 300, 0),       # the default model's shape, across span boundaries
    (9, 3, 64, 0, 1100, 0),         # from position 0: rows reach 1 to 5 spans
    (7, 1, 96, 250, 45, 0),         # odd group, head_dim not a power of two, a span edge inside
    (4, 2, 32, 3990, 130, 0),       # 17 spans
    (4, 1, 64, 400, 300, 512),      # sliding window: rows before and past it
    (8, 2, 128, 500, 77, 0),        # the larger head sizes' kernels
    (4, 1, 256, 300, 40, 0),
])
def test_a_row_is_the_same_alone_or_in_a_batch(rng, isa, kind, H, KV, hd, start, n, window):
    """Bit for bit: replaying a session's history in one prefill (failover, bus restart) must give
    the logits its decode steps gave, or greedy tokens part after a replay. Each row is also
    checked against the float64 reference, so agreement is not agreement in error."""
    pos = np.arange(start, start + n, dtype=np.int32)
    q = rng.standard_normal((n, H, hd)).astype(np.float32) * 2
    kc, kref = make_cache(rng, kind, start + n, KV, hd)
    vc, vref = make_cache(rng, kind, start + n, KV, hd)
    batch = attention(q, kc, vc, pos, window=window)
    assert_close(batch, reference(q, kref, vref, pos, 1 / np.sqrt(hd), window, kind == "f16"), kind, vref)
    for chunk in (1, 7, 8, 9, 256):
        parts = [attention(q[i:i + chunk], kc, vc, pos[i:i + chunk], window=window) for i in range(0, n, chunk)]
        np.testing.assert_array_equal(np.concatenate(parts), batch, err_msg=f"{isa} {kind} chunks of {chunk}")
    # rows in any order, and a row's batch sharing nothing else with it
    order = rng.permutation(n)
    np.testing.assert_array_equal(attention(q[order], kc, vc, pos[order], window=window), batch[order])


@pytest.mark.parametrize("cap,expect", [("avx2", "avx2"), ("scalar", "c")])
def test_dair_kernels_caps_the_attention_path(cap, expect):
    """DAIR_KERNELS must cap attention too, or an 'AVX2-only' run still computes attention with AVX-512."""
    import os
    import subprocess
    import sys

    if expect not in ISAS:
        pytest.skip(f"this build has no {expect} attention path")
    code = "from dair.ops.attention import ISAS, get_isa; print(get_isa(), 'avx512' in ISAS)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "DAIR_KERNELS": cap},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [expect, "False"]


@pytest.mark.parametrize("arch", ["-march=x86-64", "-march=native"])
def test_round16_equals_numpy(tmp_path, arch):
    """The f32 -> f16 rounding, portable (x86-64: no F16C) and this host's (F16C, f16 subnormals by
    arithmetic), compiled as the build compiles (fast-math), against numpy's float16 (ties to
    even) over every finite f16, the ties between them and their neighbours, and overflow."""
    import os
    import shutil
    import subprocess
    import sysconfig
    from pathlib import Path

    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    if os.uname().machine not in ("x86_64", "AMD64") or shutil.which(cc[0]) is None:
        pytest.skip("needs an x86 C compiler")
    ops = Path(__file__).resolve().parent.parent.parent / "ops"
    src = tmp_path / "r16.c"
    src.write_text('#include <stdio.h>\n#include "attn.h"\nint main(void) { float x;\n'
                   '  while (fread(&x, 4, 1, stdin) == 1) { float y = dair_attn_round16(x); fwrite(&y, 4, 1, stdout); }\n'
                   '  return 0; }\n')
    exe = tmp_path / "r16"
    subprocess.run([*cc, arch, "-O3", "-ffast-math", "-fno-finite-math-only", "-Wno-unused-function",
                    f"-I{ops}", str(src), "-o", str(exe), "-lm", "-lpthread"], check=True)
    rng = np.random.default_rng(7)
    mags = np.exp(rng.uniform(np.log(1e-9), np.log(1e5), 200_000)).astype(np.float32)
    h = np.arange(0, 0x7c00, dtype=np.uint16).view(np.float16).astype(np.float32)  # every finite f16
    mid = ((h[:-1].astype(np.float64) + h[1:]) / 2).astype(np.float32)  # the ties between them
    x = np.concatenate([mags, -mags[:1000], h, mid, np.nextafter(mid, 0), np.nextafter(mid, 1),
                        np.float32([2.0**-25, 2.0**-24, 65504, 65519, 65520, 1e30, 0.0])]).astype(np.float32)
    out = np.frombuffer(subprocess.run([str(exe)], input=x.tobytes(), capture_output=True, check=True).stdout,
                        np.float32)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    bad = np.nonzero(out.view(np.uint32) != want.view(np.uint32))[0]
    assert bad.size == 0, [(float(x[i]), float(out[i]), float(want[i])) for i in bad[:5]]


DOTS_T_C = r"""
#include <stdio.h>
#include "attn.h"
/* dair_attn_dotsT on a transposed tile against dair_attn_dots on the row-major one, bit for bit:
 * random keys and queries, every tile length, ranges starting inside a vector, two queries
 * with different ranges; prints the number of differing scores */
static unsigned st = 1;
static float rnd(void) { st = st * 1103515245u + 12345u; return (float)((int)((st >> 8) & 0xffff) - 32768) / 8192.0f; }
int main(int argc, char **argv) {
    const int hd = atoi(argv[1]);
    float *kt = aligned_alloc(64, sizeof(float) * 64 * hd), *kT = aligned_alloc(64, sizeof(float) * 64 * hd);
    float *q0 = malloc(sizeof(float) * hd), *q1 = malloc(sizeof(float) * hd), want[64], got[2][64];
    long bad = 0;
    for (int trial = 0; trial < 256; trial++) {
        const int nt = 1 + trial % 64;
        for (int i = 0; i < 64 * hd; i++) kt[i] = rnd();
        for (int i = 0; i < hd; i++) { q0[i] = rnd(); q1[i] = rnd(); }
        dair_attn_transpose(kt, nt, hd, kT, DAIR_ATTN_AVX512);
        int x[2] = {trial % 7 < nt ? trial % 7 : 0, 0}, y[2] = {nt, nt > 3 ? nt - 3 : nt};
        const float *qp[2] = {q0, q1};
        float *sp[2] = {got[0], got[1]};
        dair_attn_dotsT(qp, kT, hd, 0.125f, sp, x, y, 1 + trial % 2, DAIR_ATTN_AVX512);
        for (int r = 0; r < 1 + trial % 2; r++) {
            dair_attn_dots(qp[r], kt + (size_t)x[r] * hd, y[r] - x[r], hd, 0.125f, want, DAIR_ATTN_AVX512);
            for (int t = x[r]; t < y[r]; t++)
                bad += memcmp(&want[t - x[r]], &got[r][t], 4) != 0;
        }
    }
    printf("%ld\n", bad);
    return 0;
}
"""


@pytest.mark.parametrize("hd", [64, 128, 256, 16, 48, 96])
def test_transposed_tile_scores_are_the_per_key_scores(tmp_path, hd):
    """The prefill scores from a transposed key tile (vertical adds in dair_reduce16x16's tree
    order) are the bits of the per-key kernel the decode path shares, compiled as the build
    compiles (fast-math, which must not reassociate that tree)."""
    import os
    import shutil
    import subprocess
    import sysconfig
    from pathlib import Path

    if "avx512" not in ISAS:
        pytest.skip("needs the AVX-512 family")
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    if shutil.which(cc[0]) is None:
        pytest.skip("needs a C compiler")
    ops = Path(__file__).resolve().parent.parent.parent / "ops"
    src, exe = tmp_path / "dots.c", tmp_path / "dots"
    src.write_text(DOTS_T_C)
    subprocess.run([*cc, "-march=native", "-O3", "-ffast-math", "-fno-finite-math-only", "-Wno-unused-function",
                    f"-I{ops}", str(src), "-o", str(exe), "-lm", "-lpthread"], check=True)
    assert subprocess.run([str(exe), str(hd)], capture_output=True, text=True, check=True).stdout.strip() == "0"


def sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


@pytest.mark.parametrize("hd", [64, 128, 96, 32])
def test_rotate_is_the_orthonormal_hadamard_per_block(rng, hd):
    """The Q8_0 cache stores keys and values rotated (engine/kvcache.py): rotate must be the
    block-diagonal Sylvester-Hadamard matrix, so that q.k and the rotated-back output are kept."""
    blk = rotation_block(hd)
    assert blk == {64: 64, 128: 128, 96: 32, 32: 32}[hd]
    x = rng.standard_normal((5, 3, hd)).astype(np.float32)
    want = (x.reshape(-1, hd // blk, blk).astype(np.float64) @ sylvester(blk)).reshape(x.shape)
    y = rotate(x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rotate(y), x, rtol=1e-5, atol=1e-5)  # its own inverse
    out = x.copy()
    assert rotate(out, out=out) is out
    np.testing.assert_array_equal(out, y)
    with pytest.raises(ValueError, match="C-contiguous"):
        rotate(x[:, :, ::2])


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_rotated_cache(rng, isa, kind):
    """The Q8_0 cache of engine/kvcache.py: K and V stored as Q8_0 blocks of rotate(k), rotate(v)
    (quantized as llama.cpp's reference, checked by gguf's dequantizer); attention(rotated=True)
    must give softmax(q.k) v of the values the cache holds, rotated back (Sylvester's matrix)."""
    n, H, KV, hd, start = 40, 9, 3, 64, 700
    pos = np.arange(start, start + n, dtype=np.int32)
    q = rng.standard_normal((n, H, hd)).astype(np.float32) * 2
    k = rng.standard_normal((start + n, KV, hd)).astype(np.float32)
    v = rng.standard_normal((start + n, KV, hd)).astype(np.float32)
    h = sylvester(hd)
    if kind == "f32":
        kc, vc = rotate(k), rotate(v)
        kref, vref = k.astype(np.float64), v.astype(np.float64)
    else:
        kc = np.empty((start + n, KV, q8_0_row_bytes(hd)), np.uint8)
        vc = np.empty_like(kc)
        assert store_rotated_q8_0(k, kc) is kc and store_rotated_q8_0(v, vc) is vc
        # the held values, rotated back: what the model sees
        kref, vref = (dequantize(c.reshape(-1, q8_0_row_bytes(hd)), GGMLQuantizationType.Q8_0).reshape(k.shape)
                      .astype(np.float64) @ h for c in (kc, vc))
        assert np.abs(kref - k).max() < 0.05  # and they are k and v to within 8-bit rounding
    out = attention(q, kc, vc, pos, rotated=True)
    np.testing.assert_allclose(out, reference(q, kref, vref, pos, 1 / np.sqrt(hd)), rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_store_in_the_call_is_the_separate_store(rng, kind):
    """attention(..., k_new=, v_new=) writes this step's keys and values at their positions as the
    cache holds them (f32 as is, f16 rounded to nearest even as numpy's astype, Q8_0 rotated as
    store_rotated_q8_0) and then attends: the same cache bytes and the same output bits as the
    store done first in numpy; the other rows untouched."""
    n, H, KV, hd, start, cap = 5, 9, 3, 64, 300, 320
    pos = np.arange(start, start + n, dtype=np.int32)
    q = rng.standard_normal((n, H, hd)).astype(np.float32)
    k = rng.standard_normal((n, KV, hd)).astype(np.float32) * 3
    v = rng.standard_normal((n, KV, hd)).astype(np.float32) * 3
    k[0, 0, :4] = [7e-6, -3e-8, 65519.0, 1e-30]  # f16: subnormal, underflow, the largest finite, zero
    kc, _ = make_cache(rng, kind, cap, KV, hd)
    vc, _ = make_cache(rng, kind, cap, KV, hd)
    kc2, vc2 = kc.copy(), vc.copy()
    rotated = kind == "q8_0"
    for src, dst in ((k, kc), (v, vc)):
        if rotated:
            store_rotated_q8_0(src, dst[start:start + n])
        else:
            dst[start:start + n] = src
    want = attention(q, kc, vc, pos, rotated=rotated)
    got = attention(q, kc2, vc2, pos, rotated=rotated, k_new=k, v_new=v)
    np.testing.assert_array_equal(kc2, kc)
    np.testing.assert_array_equal(vc2, vc)
    np.testing.assert_array_equal(got, want)
    if rotated:  # and what it stored is k and v, by gguf's dequantizer and Sylvester's matrix
        for c, x in ((kc2, k), (vc2, v)):
            rows = c[start:start + n].reshape(-1, q8_0_row_bytes(hd))
            held = dequantize(rows, GGMLQuantizationType.Q8_0).reshape(x.shape).astype(np.float64) @ sylvester(hd)
            assert np.abs(held - x).max() < 0.02 * np.abs(x).max()


def test_store_in_the_call_refuses_bad_input(rng):
    n, H, KV, hd = 2, 4, 2, 64
    pos = np.arange(10, 10 + n, dtype=np.int32)
    q = rng.standard_normal((n, H, hd)).astype(np.float32)
    kc = np.zeros((16, KV, hd), np.float16)
    vc = np.zeros_like(kc)
    k = rng.standard_normal((n, KV, hd)).astype(np.float32)
    with pytest.raises(ValueError, match="together"):
        attention(q, kc, vc, pos, k_new=k)
    with pytest.raises(ValueError, match="k_new: expected shape"):
        attention(q, kc, vc, pos, k_new=k[:1], v_new=k[:1])
    with pytest.raises(ValueError, match="v_new: expected shape"):
        attention(q, kc, vc, pos, k_new=k, v_new=k[:, :1].copy())
    with pytest.raises(ValueError, match="dtype"):
        attention(q, kc, vc, pos, k_new=k.astype(np.float16), v_new=k)
    q8 = np.zeros((16, KV, q8_0_row_bytes(hd)), np.uint8)
    with pytest.raises(ValueError, match="rotated"):
        attention(q, q8, q8.copy(), pos, k_new=k, v_new=k)
    kc.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        attention(q, kc, vc, pos, k_new=k, v_new=k)
    assert not vc.any()  # nothing was written by a refused call
