"""dair.ops kernels against plain numpy on random inputs.

Weight blocks are made and read by the `gguf` package (gguf.quants), so the
kernels are checked against an implementation of the GGUF layouts that is not
dair's own.

Error bounds:
- float paths (act_q8=False, F32/F16): |y - y_ref| <= 1e-4 * (|x| @ |W|.T) + 1e-6, i.e. float32
  summation error relative to the magnitude of the terms.
- act_q8=True: x is rounded to 8-bit blocks with scale d = amax/127 (per 32 values, stored as fp16), so
  each x value moves by at most d/2 and d itself by a relative 2^-11. Hence
  |y - y_ref| <= sum over blocks of (amax_b / 254) * sum_b |w| + 2^-10 * (|x| @ |W|.T) + float error.
  Separately, the result must equal a numpy emulation of llama.cpp's activation quantization to 1e-5.
"""

import mmap

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from dair.ops import threads
from dair.ops.activation import add_inplace, gelu_tanh_mul, silu_mul
from dair.ops.attention import attention
from dair.ops.matmul import (
    BLOCK_LAYOUTS,
    KERNELS,
    Weight,
    get_kernels,
    matmul_many,
    set_kernels,
    set_simd,
    set_worker_prefetch,
    simd_name,
)
from dair.ops.norm import rmsnorm
from dair.ops.rope import rope_inplace
from dair.ops.wire import dequantize_into, dequantize_q8_0, quantize_q8_0

QTYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"]
QUANTIZED = ["Q8_0", "Q4_0", "Q4_1"]


def make_weight(rng, qtype, rows, cols):
    """Random weight in GGUF encoding: (Weight, raw bytes, dequantized float32 matrix via gguf)."""
    w = (rng.standard_normal((rows, cols)) * 0.5).astype(np.float32)
    w[:, : min(cols, 32)] += 0.3  # an off-centre block, so Q4_1's m matters
    gt = GGMLQuantizationType[qtype]
    raw = np.ascontiguousarray(quantize(w, gt)).view(np.uint8).reshape(-1)
    wd = dequantize(raw.reshape(rows, -1), gt).astype(np.float32).reshape(rows, cols)
    raw.flags.writeable = False  # as the model map is
    return Weight(raw, qtype, rows, cols), raw, wd


def float_bound(x, wd):
    return 1e-4 * (np.abs(x).astype(np.float64) @ np.abs(wd).T.astype(np.float64)) + 1e-6


def q8_bound(x, wd):
    n, cols = x.shape
    xb = np.abs(x).reshape(n, cols // 32, 32).max(axis=2)  # amax per block, (n, nb)
    wb = np.abs(wd).reshape(wd.shape[0], cols // 32, 32).sum(axis=2)  # (rows, nb)
    return (xb / 254.0) @ wb.T + 2.0**-10 * (np.abs(x) @ np.abs(wd).T) + float_bound(x, wd)


def llama_q8(x, qtype):
    """llama.cpp's runtime activation quantization in numpy: ints q, fp16-rounded d, and s per block."""
    n, cols = x.shape
    xb = x.reshape(n, cols // 32, 32).astype(np.float32)
    amax = np.abs(xb).max(axis=2)
    with np.errstate(divide="ignore"):
        iscale = np.where(amax == 0, np.float32(0), np.float32(127) / amax).astype(np.float32)
    q = np.rint(xb * iscale[..., None]).astype(np.int32)  # round half to even, as _mm256_round_ps
    d = (amax / np.float32(127)).astype(np.float32)
    dr = d.astype(np.float16).astype(np.float32)
    s = (d * q.sum(axis=2)).astype(np.float16).astype(np.float32)
    return q, dr, s


def emulate_q8_matmul(x, raw, qtype, rows, cols):
    """y = x @ W.T the way llama.cpp's vec_dot_{q8_0,q4_0,q4_1}_q8 compute it, in float64."""
    q, dx, sx = llama_q8(x, qtype)
    nb = cols // 32
    bsize = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1]
    blocks = raw.reshape(rows, nb, bsize)
    dw = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    if qtype == "Q8_0":
        wq = blocks[..., 2:].view(np.int8).astype(np.int64)
    else:
        off = 4 if qtype == "Q4_1" else 2
        qs = blocks[..., off:]
        wq = np.concatenate([qs & 15, qs >> 4], axis=2).astype(np.int64)
        if qtype == "Q4_0":
            wq -= 8
    sumi = np.einsum("rbj,nbj->nrb", wq, q.astype(np.int64))  # (n, rows, nb)
    y = (sumi * dw[None] * dx[:, None, :]).sum(axis=2)
    if qtype == "Q4_1":
        mw = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        y += (mw[None] * sx[:, None, :]).sum(axis=2)
    return y


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=KERNELS)
def kernels(request):
    """Every quantized-kernel family of this build: "avx512" (AVX-512 VNNI), "avx2" (AVX2, no AVX-512 instruction), "scalar"."""
    old = set_kernels(request.param)
    yield request.param
    set_kernels(old)


def test_block_layouts_agree_with_gguf():
    for qt in QTYPES:
        assert BLOCK_LAYOUTS[qt] == GGML_QUANT_SIZES[GGMLQuantizationType[qt]], qt


def test_simd_name_and_kernels():
    assert simd_name() in ("avx512vnni", "avx2", "neon+dotprod", "neon", "scalar")
    assert get_kernels() == KERNELS[0] and KERNELS[-1] == "scalar"
    with pytest.raises(ValueError, match="kernels"):
        set_kernels("gpu")
    assert set_simd(False) is (KERNELS[0] != "scalar")
    assert get_kernels() == "scalar"
    assert set_simd(True) is False
    assert get_kernels() == KERNELS[0]


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 32), (37, 96), (70, 160)])
def test_matmul_float_path(rng, qtype, rows, cols, kernels):
    w, raw, wd = make_weight(rng, qtype, rows, cols)
    assert (w.rows, w.cols, w.qtype, w.nbytes) == (rows, cols, qtype, raw.nbytes)
    for n in (1, 3, 17):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        ref = x.astype(np.float64) @ wd.T.astype(np.float64)
        y = w.matmul(x, act_q8=False)
        assert y.shape == (n, rows) and y.dtype == np.float32
        assert np.all(np.abs(y - ref) <= float_bound(x, wd))
        if qtype in ("F32", "F16"):  # act_q8 is ignored for float weights
            np.testing.assert_array_equal(w.matmul(x), y)


@pytest.mark.parametrize("qtype", QUANTIZED)
@pytest.mark.parametrize("rows,cols", [(1, 32), (37, 96), (70, 160), (9, 576)])
def test_matmul_q8_path(rng, qtype, rows, cols, kernels):
    w, raw, wd = make_weight(rng, qtype, rows, cols)
    for n in (1, 3, 17):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        x[0, :32] = 0.0  # an all-zero block (d = 0)
        y = w.matmul(x)
        ref = x.astype(np.float64) @ wd.T.astype(np.float64)
        assert np.all(np.abs(y - ref) <= q8_bound(x, wd)), np.abs(y - ref).max()
        emu = emulate_q8_matmul(x, raw, qtype, rows, cols)
        scale = np.abs(x) @ np.abs(wd).T + 1e-6
        assert np.all(np.abs(y - emu) <= 1e-5 * scale), np.abs(y - emu).max()


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("cols", [64, 224, 576, 1536])
def test_matmul_kernel_families_agree(rng, qtype, cols):
    """Every family computes the same integer block sums; only float summation order differs."""
    w, _, _ = make_weight(rng, qtype, 45, cols)
    x = rng.standard_normal((6, cols)).astype(np.float32)
    old = get_kernels()
    try:
        for act_q8 in (True, False):
            results = []
            for k in KERNELS:
                set_kernels(k)
                results.append(w.matmul(x, act_q8=act_q8))
                np.testing.assert_array_equal(w.matmul(x[:1], act_q8=act_q8), w.matmul(x, act_q8=act_q8)[:1])
            for r in results[1:]:
                np.testing.assert_allclose(r, results[0], rtol=1e-5, atol=1e-4)
    finally:
        set_kernels(old)


@pytest.mark.parametrize("qtype", QTYPES)
def test_matmul_threads_agree(rng, qtype):
    w, _, _ = make_weight(rng, qtype, 1539, 256)  # big enough to run parallel, rows not a multiple of 4
    x = rng.standard_normal((5, 256)).astype(np.float32)
    x1 = x[:1].copy()
    old = threads.get_num_threads()
    try:
        results = []
        for nt in (1, 2):
            threads.set_num_threads(nt)
            results.append((w.matmul(x), w.matmul(x1), w.matmul(x, act_q8=False)))
    finally:
        threads.set_num_threads(old)
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("qtype", QTYPES)
def test_matmul_many_is_the_separate_products(rng, qtype):
    """q/k/v (or gate/up) as one job over activations quantized once: the products of the matrices
    one by one, bit for bit, on every kernel family and thread count; mixed types fall back."""
    ws = [make_weight(rng, qtype, rows, 256)[0] for rows in (576, 192, 200)]
    other = make_weight(rng, "Q8_0" if qtype != "Q8_0" else "Q4_0", 64, 256)[0]
    old, old_k = threads.get_num_threads(), get_kernels()
    try:
        for n in (1, 5):
            x = rng.standard_normal((n, 256)).astype(np.float32)
            for k in KERNELS:
                set_kernels(k)
                for nt in (1, 2, 1, 2):  # workers stay across counts: switching back gives the same
                    threads.set_num_threads(nt)
                    for group in (ws, ws[:2], [ws[0], other], ws[:1]):
                        want = [w.matmul(x) for w in group]
                        for a, b in zip(matmul_many(group, x), want, strict=True):
                            np.testing.assert_array_equal(a, b)
                    for a, b in zip(matmul_many(ws, x, act_q8=False), [w.matmul(x, act_q8=False) for w in ws],
                                    strict=True):
                        np.testing.assert_array_equal(a, b)
    finally:
        threads.set_num_threads(old)
        set_kernels(old_k)
    assert matmul_many([], x) == []
    with pytest.raises(ValueError, match="expected shape"):
        matmul_many(ws, np.zeros((1, 128), np.float32))


def test_pool_runs_every_chunk_once(rng):
    """Jobs of 2..200 chunks split in per-thread ranges: every output row written exactly once
    (a row skipped or written by two chunks would differ from the one-thread result), with the
    pool parked between jobs as an idle stage does, and counters that add up."""
    old = threads.get_num_threads()
    x = rng.standard_normal((3, 256)).astype(np.float32)
    try:
        for rows in (16, 33, 100, 1024, 3200):
            w, _, _ = make_weight(rng, "Q8_0", rows, 256)
            threads.set_num_threads(1)
            want = w.matmul(x)
            threads.set_num_threads(2)
            for i in range(50):
                np.testing.assert_array_equal(w.matmul(x), want)
                if i % 7 == 0:
                    threads.park()
    finally:
        threads.set_num_threads(old)
    st, summary = threads.pool_stats(), threads.pool_summary()
    assert st["jobs"] >= st["serial_jobs"] and st["chunks"] >= st["worker_chunks"] >= 0
    assert st["solo_periods"] == st["solo_stalled"] + st["solo_absent"]
    assert 0.0 <= summary["worker_share"] <= 1.0 and 0.0 <= summary["solo_share"] <= 1.0
    choice = threads.pool_choice()
    assert choice["threads"] == old and 1 <= choice["using"] <= old
    assert choice["why"] in ("", "stalled", "absent")


def _resident_kb(addr):
    """Resident kB of the mapping starting at addr (/proc/self/smaps)."""
    lines = open("/proc/self/smaps").read().split("\n")
    for i, line in enumerate(lines):
        head = line.split(" ")[0]
        if "-" in head and int(head.split("-")[0], 16) == addr:
            return next(int(m.split()[1]) for m in lines[i:i + 30] if m.startswith("Rss:"))
    raise AssertionError(f"no mapping at {addr:#x}")


def test_worker_read_ahead_changes_nothing_and_outlives_its_matrices(rng):
    """With two threads each product asks the idle worker to read the next matrices (a group:
    all of them) into the caches. Results are those of one thread, with it on or off; a matrix
    freed after it was named as next is only hinted at, never loaded: nothing faults, and pages
    the process released stay released."""
    x = rng.standard_normal((1, 576)).astype(np.float32)
    a, _, _ = make_weight(rng, "Q4_1", 576, 576)
    old, old_cap = threads.get_num_threads(), set_worker_prefetch(1 << 20)
    try:
        for _round in range(3):
            g = [make_weight(rng, "Q4_1", 1536, 576)[0] for _ in range(2)]
            c, _, _ = make_weight(rng, "Q8_0", 4096, 1536)  # 6.7 MB: its own mapping, freed below
            threads.set_num_threads(1)
            want = [a.matmul(x), *matmul_many(g, x)]
            want.append(c.matmul(want[1]))
            threads.set_num_threads(2)
            for i in range(40):
                set_worker_prefetch(0 if i % 5 == 4 else 1 << 20)
                got = [a.matmul(x), *matmul_many(g, x)]
                got.append(c.matmul(got[1]))
                for y, z in zip(got, want, strict=True):
                    np.testing.assert_array_equal(y, z)
            del g, c  # `a` still names them as its next matrices
            for _ in range(20):
                np.testing.assert_array_equal(a.matmul(x), want[0])
        # A next matrix whose pages the process has released (as the streaming mode releases a
        # layer): the worker, awake between the products of `big` (split over both threads),
        # must not bring them back. Loads would (measured: 816 kB of its mapping resident again
        # after 300 products); prefetch hints leave it at 0.
        big, _, _ = make_weight(rng, "Q4_1", 8192, 576)
        raw = make_weight(rng, "Q8_0", 4096, 576)[1]
        mm = mmap.mmap(-1, 8 << 20)
        view = np.frombuffer(mm, np.uint8, count=raw.nbytes)
        view[:] = raw
        b = Weight(view, "Q8_0", 4096, 576)
        threads.set_num_threads(2)
        for _ in range(3):
            big.matmul(x)
            b.matmul(x)
        mm.madvise(mmap.MADV_DONTNEED)
        for _ in range(300):
            big.matmul(x)
        assert _resident_kb(view.ctypes.data) == 0
        del b, view
    finally:
        threads.set_num_threads(old)
        set_worker_prefetch(old_cap)
    with pytest.raises(ValueError, match="nbytes"):
        set_worker_prefetch(-1)


def test_pool_concurrent_callers(rng):
    """Kernels called from several Python threads at once (the pool serves one caller at a time,
    the others run their chunks themselves) give the single-threaded results."""
    import threading

    w, _, _ = make_weight(rng, "Q4_1", 1024, 576)
    xs = [rng.standard_normal((n, 576)).astype(np.float32) for n in (1, 7, 1, 33)]
    old = threads.get_num_threads()
    try:
        threads.set_num_threads(1)
        want = [w.matmul(x) for x in xs]
        threads.set_num_threads(2)
        got = [[None] * len(xs) for _ in range(4)]

        def run(t):
            for _ in range(20):
                for i, x in enumerate(xs):
                    got[t][i] = w.matmul(x)

        ts = [threading.Thread(target=run, args=(t,)) for t in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        threads.set_num_threads(old)
    for g in got:
        for a, b in zip(g, want, strict=True):
            np.testing.assert_array_equal(a, b)
    stats = threads.pool_stats()
    assert stats["jobs"] >= stats["serial_jobs"] and stats["chunks"] >= stats["worker_chunks"]


def test_pool_survives_fork(rng):
    """A forked child (multiprocessing's default on Linux) computes and resizes its pool."""
    import os

    w, _, _ = make_weight(rng, "Q4_1", 1024, 576)
    x = rng.standard_normal((3, 576)).astype(np.float32)
    old = threads.get_num_threads()
    threads.set_num_threads(2)
    want = w.matmul(x)  # workers running
    pid = os.fork()
    if pid == 0:  # child: exit status says whether it agrees
        ok = False
        try:
            ok = np.array_equal(w.matmul(x), want)
            threads.set_num_threads(1)
            threads.set_num_threads(2)
            ok = ok and np.array_equal(w.matmul(x), want)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    threads.set_num_threads(old)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_matmul_out_argument(rng):
    w, _, wd = make_weight(rng, "Q4_1", 20, 64)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    out = np.full((3, 20), np.nan, np.float32)
    assert w.matmul(x, out=out) is out
    np.testing.assert_array_equal(out, w.matmul(x))
    with pytest.raises(ValueError, match="out"):
        w.matmul(x, out=np.empty((3, 21), np.float32))
    with pytest.raises(ValueError, match="out"):
        w.matmul(x, out=np.empty((3, 20), np.float64))
    big = np.zeros((3, 64), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        w.matmul(big, out=big.reshape(-1)[:60].reshape(3, 20))


def test_matmul_rejects_bad_x(rng):
    w, _, _ = make_weight(rng, "Q8_0", 8, 64)
    with pytest.raises(ValueError, match="shape"):
        w.matmul(np.zeros((2, 63), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        w.matmul(np.zeros((2, 64), np.float64))
    with pytest.raises(ValueError, match="contiguous"):
        w.matmul(np.zeros((64, 2), np.float32).T)
    with pytest.raises(ValueError, match="dimensions"):
        w.matmul(np.zeros(64, np.float32))
    with pytest.raises(ValueError, match="numpy array"):
        w.matmul([[0.0] * 64])
    with pytest.raises(ValueError, match="at least one row"):
        w.matmul(np.zeros((0, 64), np.float32))


def test_weight_rejects_bad_raw(rng):
    _, raw, _ = make_weight(rng, "Q4_1", 8, 64)
    with pytest.raises(ValueError, match="bytes"):
        Weight(raw[:-1], "Q4_1", 8, 64)
    with pytest.raises(ValueError, match="bytes"):
        Weight(raw, "Q4_1", 9, 64)
    with pytest.raises(ValueError, match="divisible"):
        Weight(raw, "Q4_1", 8, 48)
    with pytest.raises(ValueError, match="qtype"):
        Weight(raw, "IQ2_XXS", 8, 64)
    with pytest.raises(ValueError, match="uint8"):
        Weight(raw.view(np.int8), "Q4_1", 8, 64)
    with pytest.raises(ValueError, match="contiguous"):
        Weight(np.zeros(2 * raw.nbytes, np.uint8)[::2], "Q4_1", 8, 64)
    with pytest.raises(ValueError, match=">= 1"):
        Weight(raw, "Q4_1", 0, 64)


@pytest.mark.parametrize("qtype", QTYPES)
def test_get_rows(rng, qtype):
    w, _, wd = make_weight(rng, qtype, 50, 96)
    ids = np.array([0, 49, 7, 7, 23], np.int32)
    np.testing.assert_array_equal(w.get_rows(ids), wd[ids])
    many = rng.integers(0, 50, 300).astype(np.int32)  # enough to go parallel
    np.testing.assert_array_equal(w.get_rows(many), wd[many])
    out = np.empty((5, 96), np.float32)
    assert w.get_rows(ids, out=out) is out
    with pytest.raises(ValueError, match="id 50"):
        w.get_rows(np.array([1, 50], np.int32))
    with pytest.raises(ValueError, match="id -1"):
        w.get_rows(np.array([-1], np.int32))
    with pytest.raises(ValueError, match="dtype"):
        w.get_rows(np.array([1], np.int64))
    with pytest.raises(ValueError, match="out"):
        w.get_rows(ids, out=np.empty((5, 95), np.float32))


def test_weight_never_writes_raw(rng):
    w, raw, _ = make_weight(rng, "Q4_0", 16, 64)
    before = raw.copy()
    w.matmul(rng.standard_normal((4, 64)).astype(np.float32))
    w.get_rows(np.arange(16, dtype=np.int32))
    np.testing.assert_array_equal(raw, before)


def test_rmsnorm(rng):
    for n, d in [(1, 576), (3, 17), (17, 64), (200, 576)]:
        x = rng.standard_normal((n, d)).astype(np.float32)
        w = rng.standard_normal(d).astype(np.float32)
        x64 = x.astype(np.float64)
        ref = x64 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + 1e-5) * w
        np.testing.assert_allclose(rmsnorm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-5)
        xi = x.copy()
        assert rmsnorm(xi, w, 1e-5, out=xi) is xi
        np.testing.assert_allclose(xi, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="w"):
        rmsnorm(x, w[:-1], 1e-5)
    with pytest.raises(ValueError, match="dtype"):
        rmsnorm(x.astype(np.float64), w, 1e-5)
    with pytest.raises(ValueError, match="out"):
        rmsnorm(x, w, 1e-5, out=np.empty((n, d + 1), np.float32))


def rope_ref(x, pos, inv_freq):
    y = x.astype(np.float64).copy()
    half = inv_freq.shape[0]
    th = pos[:, None].astype(np.float64) * inv_freq[None, :].astype(np.float64)  # (n, half)
    c, s = np.cos(th)[:, None, :], np.sin(th)[:, None, :]
    a, b = y[..., 0 : 2 * half : 2].copy(), y[..., 1 : 2 * half : 2].copy()
    y[..., 0 : 2 * half : 2] = a * c - b * s
    y[..., 1 : 2 * half : 2] = a * s + b * c
    return y


@pytest.mark.parametrize(
    "n,heads,hd,rope_dim", [(1, 9, 64, 64), (3, 3, 64, 32), (17, 2, 6, 4), (150, 9, 64, 64)]
)
def test_rope(rng, n, heads, hd, rope_dim):
    x = rng.standard_normal((n, heads, hd)).astype(np.float32)
    pos = rng.integers(0, 2000, n).astype(np.int32)
    inv_freq = (10000.0 ** (-np.arange(0, rope_dim, 2) / rope_dim)).astype(np.float32)
    ref = rope_ref(x, pos, inv_freq)
    y = x.copy()
    assert rope_inplace(y, pos, inv_freq) is y
    # float32 angles: pos * inv_freq carries a relative error ~6e-8, i.e. ~1e-4 rad at pos 2000
    np.testing.assert_allclose(y, ref, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(y[..., rope_dim:], x[..., rope_dim:])
    with pytest.raises(ValueError, match="positions"):
        rope_inplace(y, pos[:-1], inv_freq) if n > 1 else rope_inplace(y, np.zeros(2, np.int32), inv_freq)
    with pytest.raises(ValueError, match="inv_freq"):
        rope_inplace(y, pos, np.zeros(hd // 2 + 1, np.float32))
    with pytest.raises(ValueError, match="writable"):
        ro = x.copy()
        ro.flags.writeable = False
        rope_inplace(ro, pos, inv_freq)


def attention_ref(q, k, v, pos, scale):
    """softmax(q.k * scale) v in float64; with an f16 cache q and the normalised probabilities
    are rounded to f16 first, as llama.cpp's CPU attention does (tests/unit/test_attention.py)."""
    n, H, hd = q.shape
    KV = k.shape[1]
    g = H // KV
    r16 = k.dtype == np.float16
    out = np.zeros((n, H, hd), np.float64)
    k64, v64 = k.astype(np.float64), v.astype(np.float64)
    q64 = (q.astype(np.float16) if r16 else q).astype(np.float64)
    for i in range(n):
        for h in range(H):
            kk = k64[: pos[i] + 1, h // g]
            s = kk @ q64[i, h] * scale
            p = np.exp(s - s.max())
            p /= p.sum()
            if r16:
                p = p.astype(np.float16).astype(np.float64)
            out[i, h] = p @ v64[: pos[i] + 1, h // g]
    return out


@pytest.mark.parametrize("cache_dtype", [np.float32, np.float16])
@pytest.mark.parametrize(
    "n,H,KV,hd,start",
    [
        (1, 9, 3, 64, 0),
        (1, 9, 3, 64, 40),
        (5, 4, 2, 20, 3),
        (17, 3, 1, 8, 0),
        (3, 16, 2, 128, 37),
        (2, 4, 4, 32, 70),
    ],
)
def test_attention(rng, cache_dtype, n, H, KV, hd, start):
    cap = start + n + 4
    q = rng.standard_normal((n, H, hd)).astype(np.float32)
    k = rng.standard_normal((cap, KV, hd)).astype(cache_dtype)
    v = rng.standard_normal((cap, KV, hd)).astype(cache_dtype)
    pos = np.arange(start, start + n, dtype=np.int32)
    ref = attention_ref(q, k, v, pos, 1 / np.sqrt(hd))
    np.testing.assert_allclose(attention(q, k, v, pos), ref, rtol=1e-4, atol=1e-5)
    out = np.empty_like(q)
    assert attention(q, k, v, pos, out=out, scale=0.3) is out
    np.testing.assert_allclose(out, attention_ref(q, k, v, pos, 0.3), rtol=1e-4, atol=1e-5)


def test_attention_threads_agree(rng):
    q = rng.standard_normal((64, 9, 64)).astype(np.float32)
    k = rng.standard_normal((100, 3, 64)).astype(np.float32)
    v = rng.standard_normal((100, 3, 64)).astype(np.float32)
    pos = np.arange(10, 74, dtype=np.int32)
    old = threads.get_num_threads()
    try:
        threads.set_num_threads(1)
        a = attention(q, k, v, pos)
        threads.set_num_threads(2)
        b = attention(q, k, v, pos)
    finally:
        threads.set_num_threads(old)
    np.testing.assert_array_equal(a, b)


def test_attention_rejects_bad_input(rng):
    q = np.zeros((2, 4, 8), np.float32)
    k = np.zeros((5, 2, 8), np.float32)
    pos = np.array([3, 4], np.int32)
    with pytest.raises(ValueError, match="positions"):
        attention(q, k, k.copy(), np.array([3, 5], np.int32))
    with pytest.raises(ValueError, match="positions"):
        attention(q, k, k.copy(), np.array([-1, 0], np.int32))
    with pytest.raises(ValueError, match="multiple"):
        attention(np.zeros((2, 3, 8), np.float32), k, k.copy(), pos)
    with pytest.raises(ValueError, match="head_dim"):
        attention(q, np.zeros((5, 2, 4), np.float32), np.zeros((5, 2, 4), np.float32), pos)
    with pytest.raises(ValueError, match="v_cache"):
        attention(q, k, np.zeros((4, 2, 8), np.float32), pos)
    with pytest.raises(ValueError, match="dtype"):
        attention(q, k, k.astype(np.float16), pos)
    with pytest.raises(ValueError, match="dtype"):
        attention(q, k.astype(np.float64), k.astype(np.float64), pos)


def test_silu_mul_and_add(rng):
    for n, h in [(1, 1536), (3, 17), (64, 1536)]:
        g = rng.standard_normal((n, h)).astype(np.float32) * 4
        u = rng.standard_normal((n, h)).astype(np.float32)
        g64 = g.astype(np.float64)
        ref = g64 / (1 + np.exp(-g64)) * u
        gi = g.copy()
        assert silu_mul(gi, u) is gi
        np.testing.assert_allclose(gi, ref, rtol=1e-5, atol=1e-6)
        x = g.copy()
        assert add_inplace(x, u) is x
        np.testing.assert_array_equal(x, g + u)
    g = np.array([[-1000, -100, -90, -20, -1e-30, 0, 1e-30, 20, 90, 100, 1000, 3e38, -3e38]], np.float32)
    u = np.full_like(g, 0.5)
    with np.errstate(over="ignore"):
        g64 = g.astype(np.float64)
        ref = g64 / (1 + np.exp(-g64)) * 0.5
    np.testing.assert_allclose(silu_mul(g.copy(), u), ref, rtol=1e-5, atol=1e-30)
    with pytest.raises(ValueError, match="up"):
        silu_mul(g, u[:, :-1].copy())
    with pytest.raises(ValueError, match="y"):
        add_inplace(g, u[:-1].copy())


def test_gelu_tanh_mul(rng):
    """gelu(g) * u by llama.cpp's tanh formula, 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))),
    in float64 here; odd sizes (vector tails) and the extremes, where 1 + tanh cancels."""
    def ref(g, u):
        g64 = g.astype(np.float64)
        z = np.sqrt(2 / np.pi) * (g64 + 0.044715 * g64 ** 3)
        return 0.5 * g64 * (1 + np.tanh(z)) * u
    for n, h in [(1, 2048), (3, 17), (5, 640), (64, 2048)]:
        g = rng.standard_normal((n, h)).astype(np.float32) * 3
        u = rng.standard_normal((n, h)).astype(np.float32)
        gi = g.copy()
        assert gelu_tanh_mul(gi, u) is gi
        np.testing.assert_allclose(gi, ref(g, u), rtol=2e-5, atol=1e-6)
    g = np.array([[-1000, -100, -12, -5, -1e-30, 0, 1e-30, 5, 12, 100, 1000, 3e38, -3e38]], np.float32)
    u = np.full_like(g, 0.5)
    with np.errstate(over="ignore", invalid="ignore"):
        want = ref(g, u)
    want[0, -2] = 1.5e38  # 0.5 g for the largest g (g^3 overflows in float64 too: tanh(inf) = 1)
    want[0, -1] = 0.0
    np.testing.assert_allclose(gelu_tanh_mul(g.copy(), u), want, rtol=1e-5, atol=1e-30)
    with pytest.raises(ValueError, match="up"):
        gelu_tanh_mul(g, u[:, :-1].copy())


@pytest.mark.parametrize("n,d", [(1, 32), (3, 576), (17, 96)])
def test_wire_q8_0_matches_gguf(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32) * 3
    x[0, :32] = 0.0
    x[-1, -32:] = 0.5  # every value on a rounding tie after scaling
    buf = quantize_q8_0(x)
    assert buf.dtype == np.uint8 and buf.shape == (n * (d // 32) * 34,)
    ref = np.ascontiguousarray(quantize(x, GGMLQuantizationType.Q8_0)).view(np.uint8).reshape(-1)
    np.testing.assert_array_equal(buf, ref)
    deq = dequantize(ref.reshape(n, -1), GGMLQuantizationType.Q8_0).astype(np.float32)
    np.testing.assert_array_equal(dequantize_q8_0(buf, n, d), deq)
    np.testing.assert_array_equal(dequantize_q8_0(buf.tobytes(), n, d), deq)
    out = np.empty((n, d), np.float32)
    assert dequantize_into(buf, out) is out
    np.testing.assert_array_equal(out, deq)


def test_wire_rejects_bad_input():
    with pytest.raises(ValueError, match="32"):
        quantize_q8_0(np.zeros((2, 40), np.float32))
    with pytest.raises(ValueError, match="bytes"):
        dequantize_q8_0(np.zeros(67, np.uint8), 1, 64)
    with pytest.raises(ValueError, match="32"):
        dequantize_q8_0(np.zeros(68, np.uint8), 1, 63)
    with pytest.raises(ValueError, match="dtype"):
        quantize_q8_0(np.zeros((1, 32), np.float64))
