"""Q4_K / Q6_K weights in dair.ops against the gguf package and a numpy copy of llama.cpp.

The gguf package only dequantizes K-quants, so weights are either encoded by
dair.model.qtypes' plain quantizer or are random bytes (with fp16 scales kept
finite, which reach every bit of the packed 6-bit scales); the float reference
is always gguf.quants.dequantize of those bytes.

Error bounds:
- act_q8=False: float32 summation error, 1e-4 * (|x| @ |W|.T) + 1e-6.
- act_q8=True: x becomes Q8_K, per 256 values q = round(x * 127 / amax) with an
  unrounded float scale, so each x moves by at most amax / 254:
  |y - y_ref| <= sum over super-blocks (amax_b / 254) * sum_b |w| + 2^-20 (|x| @ |W|.T) + float error.
  Separately, y must equal a numpy copy of llama.cpp's quantize_row_q8_K_ref +
  vec_dot_q{4,6}_K_q8_K (integer sums exact, float64 accumulation) to 1e-4 relative.
"""

import os

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from support.numpy_reference import NumpyLlama
from support.tiny_models import write_tiny_gguf

from dair.model import qtypes
from dair.ops import threads
from dair.ops.matmul import BLOCK_LAYOUTS, KERNELS, Weight, get_kernels, matmul_many, set_kernels, simd_name

KQ = ["Q4_K", "Q6_K"]


@pytest.fixture
def rng():
    return np.random.default_rng(4321)


@pytest.fixture(params=KERNELS)
def kernels(request):
    old = set_kernels(request.param)
    yield request.param
    set_kernels(old)


def random_blocks(rng, qtype, rows, cols):
    """Random bytes with each fp16 scale's exponent held below 15 (|d| < 1, finite)."""
    bb = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1]
    raw = rng.integers(0, 256, (rows, cols // 256, bb), dtype=np.uint8)
    hi_bytes = [1, 3] if qtype == "Q4_K" else [209]  # high byte of d (and dmin)
    raw[..., hi_bytes] &= 0xBB  # sign kept, exponent <= 0b01110
    return raw.reshape(-1)


def make_weight(rng, qtype, rows, cols, random_bytes=False):
    if random_bytes:
        raw = random_blocks(rng, qtype, rows, cols)
    else:
        w = (rng.standard_normal((rows, cols)) * 0.5).astype(np.float32)
        w[:, :32] += 0.3  # an off-centre sub-block, so Q4_K's mins matter
        raw = qtypes.quantize(qtype, w)
    wd = dequantize(raw.reshape(rows, -1), GGMLQuantizationType[qtype]).astype(np.float32).reshape(rows, cols)
    raw.flags.writeable = False  # as the model map is
    return Weight(raw, qtype, rows, cols), raw, wd


def float_bound(x, wd):
    return 1e-4 * (np.abs(x).astype(np.float64) @ np.abs(wd).T.astype(np.float64)) + 1e-6


def q8k_bound(x, wd):
    n, cols = x.shape
    xb = np.abs(x).reshape(n, cols // 256, 256).max(axis=2)
    wb = np.abs(wd).reshape(wd.shape[0], cols // 256, 256).sum(axis=2)
    return (xb / 254.0) @ wb.T + 2.0**-20 * (np.abs(x) @ np.abs(wd).T) + float_bound(x, wd)


def quantize_q8_k(x):
    """quantize_row_q8_K_ref: (q int64 (n, nb, 256), d float32 (n, nb))."""
    n, cols = x.shape
    xb = x.reshape(n, cols // 256, 256).astype(np.float32)
    idx = np.abs(xb).argmax(axis=2)  # first of equal magnitudes, as the C loop's strict >
    mx = np.take_along_axis(xb, idx[..., None], axis=2)[..., 0]
    with np.errstate(divide="ignore"):
        iscale = np.where(mx == 0, np.float32(0), np.float32(-127.0) / mx).astype(np.float32)
    q = np.minimum(np.rint(xb * iscale[..., None]), 127).astype(np.int64)
    with np.errstate(divide="ignore"):
        d = np.where(mx == 0, np.float32(0), np.float32(1.0) / iscale).astype(np.float32)
    return q, d


def emulate_q8k_matmul(x, raw, qtype, rows, cols):
    """vec_dot_q4_K_q8_K / vec_dot_q6_K_q8_K: integer sums per super-block, then the scales."""
    q, dx = quantize_q8_k(x)  # (n, nb, 256), (n, nb)
    nb = cols // 256
    blocks = raw.reshape(rows * nb, -1)
    if qtype == "Q4_K":
        dw = blocks[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float64).reshape(rows, nb)
        dmin = blocks[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float64).reshape(rows, nb)
        sc, m = (a.reshape(rows, nb, 8).astype(np.int64) for a in qtypes.q4_k_scales(blocks[:, 4:16]))
        nib = qtypes.q4_k_nibbles(blocks[:, 16:]).astype(np.int64).reshape(rows, nb, 8, 32)
        qs = q.reshape(q.shape[0], nb, 8, 32)
        sumi = np.einsum("rbj,rbjl,nbjl->nrb", sc, nib, qs)
        summ = np.einsum("rbj,nbj->nrb", m, qs.sum(axis=3))
        return (dw[None] * dx[:, None, :] * sumi - dmin[None] * dx[:, None, :] * summ).sum(axis=2)
    dw = blocks[:, 208:210].copy().view(np.float16)[:, 0].astype(np.float64).reshape(rows, nb)
    sc = blocks[:, 192:208].view(np.int8).astype(np.int64).reshape(rows, nb, 16)
    q6 = qtypes.q6_k_values(blocks[:, :128], blocks[:, 128:192]).astype(np.int64).reshape(rows, nb, 16, 16) - 32
    sumi = np.einsum("rbk,rbkl,nbkl->nrb", sc, q6, q.reshape(q.shape[0], nb, 16, 16))
    return (dw[None] * dx[:, None, :] * sumi).sum(axis=2)


def test_layouts_agree_with_gguf():
    for qt in KQ:
        want = GGML_QUANT_SIZES[GGMLQuantizationType[qt]]
        assert BLOCK_LAYOUTS[qt] == want
        assert (qtypes.QTYPES[qt].block_values, qtypes.QTYPES[qt].block_bytes) == want
        assert qtypes.QTYPES[qt].ggml_id == int(GGMLQuantizationType[qt])


@pytest.mark.parametrize("qtype", KQ)
def test_numpy_dequantizer_matches_gguf(rng, qtype):
    for random_bytes in (False, True):
        _, raw, wd = make_weight(rng, qtype, 5, 512, random_bytes)
        np.testing.assert_array_equal(qtypes.dequantize(qtype, raw, (5, 512)), wd)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    err = np.abs(qtypes.dequantize(qtype, qtypes.quantize(qtype, x), x.shape) - x).max()
    assert err < (0.25 if qtype == "Q4_K" else 0.1) * np.abs(x).max()


@pytest.mark.parametrize("qtype", KQ)
@pytest.mark.parametrize("rows,cols,random_bytes", [(1, 256, False), (37, 512, False), (13, 768, True)])
def test_matmul_both_paths(rng, qtype, rows, cols, random_bytes, kernels):
    w, raw, wd = make_weight(rng, qtype, rows, cols, random_bytes)
    assert (w.rows, w.cols, w.qtype, w.nbytes) == (rows, cols, qtype, raw.nbytes)
    for n in (1, 3, 17):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        x[0, :256] = 0.0  # an all-zero super-block (d = 0)
        ref = x.astype(np.float64) @ wd.T.astype(np.float64)
        y = w.matmul(x, act_q8=False)
        assert y.shape == (n, rows) and y.dtype == np.float32
        assert np.all(np.abs(y - ref) <= float_bound(x, wd)), np.abs(y - ref).max()
        y = w.matmul(x)
        assert np.all(np.abs(y - ref) <= q8k_bound(x, wd)), np.abs(y - ref).max()
        emu = emulate_q8k_matmul(x, raw, qtype, rows, cols)
        scale = np.abs(x) @ np.abs(wd).T + 1e-6
        assert np.all(np.abs(y - emu) <= 1e-4 * scale), np.abs(y - emu).max()


@pytest.mark.parametrize("qtype", KQ)
def test_kernel_families_and_threads_agree(rng, qtype):
    w, _, wd = make_weight(rng, qtype, 1539, 512, random_bytes=True)  # parallel, rows not a multiple of 4
    x = rng.standard_normal((5, 512)).astype(np.float32)
    scale = np.abs(x) @ np.abs(wd).T + 1e-6  # random bytes cancel a lot: relative to the terms' size
    old_k, old_t = get_kernels(), threads.get_num_threads()
    try:
        for act_q8 in (True, False):
            results = []
            for k in KERNELS:
                set_kernels(k)
                for nt in (1, 2):
                    threads.set_num_threads(nt)
                    y = w.matmul(x, act_q8=act_q8)
                    np.testing.assert_array_equal(w.matmul(x[:1].copy(), act_q8=act_q8), y[:1])
                    results.append(y)
            for r in results[1:]:
                assert np.all(np.abs(r - results[0]) <= 1e-5 * scale)
    finally:
        set_kernels(old_k)
        threads.set_num_threads(old_t)


@pytest.mark.parametrize("qtype", KQ)
def test_matmul_many_k_quants(rng, qtype):
    """K-quant groups as one job (activations quantized once to Q8_K, the wide AVX-512 layout
    included): the separate products bit for bit, on every family and thread count."""
    ws = [make_weight(rng, qtype, rows, 512)[0] for rows in (300, 64)]
    x = rng.standard_normal((3, 512)).astype(np.float32)
    old_k, old_t = get_kernels(), threads.get_num_threads()
    try:
        for k in KERNELS:
            set_kernels(k)
            for nt in (1, 2):
                threads.set_num_threads(nt)
                for a, b in zip(matmul_many(ws, x), [w.matmul(x) for w in ws], strict=True):
                    np.testing.assert_array_equal(a, b)
    finally:
        set_kernels(old_k)
        threads.set_num_threads(old_t)


def test_every_family_has_k_quant_kernels():
    """The "image" family (AVX-512 VNNI builds) runs K-quants on kernels of its own, so the
    family loops above and below compare three distinct implementations there."""
    assert KERNELS[-1] == "scalar"
    if simd_name() == "avx512vnni" and not os.environ.get("DAIR_KERNELS"):  # no cap on the families
        assert KERNELS[:2] == ("avx512", "avx2")


@pytest.mark.parametrize("qtype", KQ)
@pytest.mark.parametrize("rows", [1, 6, 37])
def test_families_exact_at_rounding_ties(rng, qtype, rows):
    """x with max |x| = 254 makes the Q8_K scale -1/2, so odd integers land on .5 ties: every
    family must round them half to even as llama.cpp does, and sum the same integers."""
    cols = 768
    w, raw, wd = make_weight(rng, qtype, rows, cols, random_bytes=True)
    x = rng.integers(-254, 255, (17, cols)).astype(np.float32)
    x[:, ::256] = 254.0  # the first maximum of each super-block, positive
    x[1, 256] = -254.0  # or negative: the scale's sign follows it
    x[2, 512:] = 0.0
    emu = emulate_q8k_matmul(x, raw, qtype, rows, cols)
    scale = np.abs(x) @ np.abs(wd).T + 1e-6
    old = get_kernels()
    try:
        for k in KERNELS:
            set_kernels(k)
            for n in (1, 3, 17):
                y = w.matmul(x[:n].copy())
                assert np.all(np.abs(y - emu[:n]) <= 2e-6 * scale[:n]), (k, n, np.abs(y - emu[:n]).max())
                if n > 1:  # an activation row's result does not depend on its neighbours
                    np.testing.assert_array_equal(w.matmul(x[n - 1:n].copy()), y[n - 1:n])
    finally:
        set_kernels(old)


@pytest.mark.parametrize("qtype", KQ)
def test_get_rows(rng, qtype):
    w, _, wd = make_weight(rng, qtype, 50, 512, random_bytes=True)
    ids = np.array([0, 49, 7, 7, 23], np.int32)
    np.testing.assert_array_equal(w.get_rows(ids), wd[ids])
    many = rng.integers(0, 50, 300).astype(np.int32)
    np.testing.assert_array_equal(w.get_rows(many), wd[many])


@pytest.mark.parametrize("qtype", KQ)
def test_cols_must_be_whole_super_blocks(qtype):
    with pytest.raises(ValueError, match="cols divisible by 256"):
        Weight(np.zeros(144 * 4, np.uint8), qtype, 4, 128)


@pytest.mark.parametrize("qtype", KQ)
def test_tiny_llama_end_to_end(tmp_path, qtype):
    """A whole forward pass over K-quant matrices equals numpy on gguf's dequantized weights."""
    from dair.engine.forward import RangeEngine
    from dair.model import open_model

    path = write_tiny_gguf(tmp_path / "k.gguf", qtype=qtype, dim=256, hidden_dim=512, n_heads=4,
                           n_kv_heads=2, head_dim=64, vocab_size=64)
    mf = open_model(str(path))
    eng = RangeEngine(mf, 0, mf.config.n_layers - 1, act_q8=False, kv_f16=False)
    ids = [3, 17, 42, 5, 9]
    eng.open_session("s")
    got = eng.head(eng.run_layers(eng.embed(np.array(ids, np.int32)), [("s", np.arange(len(ids), dtype=np.int32))]))
    want = NumpyLlama(str(path)).logits(ids)
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())
    # and the 8-bit path stays close
    eng8 = RangeEngine(mf, 0, mf.config.n_layers - 1, act_q8=True)
    eng8.open_session("s")
    got8 = eng8.head(eng8.run_layers(eng8.embed(np.array(ids, np.int32)),
                                     [("s", np.arange(len(ids), dtype=np.int32))]))
    assert np.abs(got8 - want).max() < 0.05 * np.abs(want).max()
    eng.close()
    eng8.close()
    mf.close()
