"""Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, Q5_K, IQ4_XS and BF16 weights in dair.ops, on every kernel family.

References, both independent of dair's C code:
- the float values: gguf.quants.dequantize (the gguf package's numpy port of llama.cpp), which
  dair.model.qtypes' own dequantizer must match bit for bit;
- the 8-bit activation products: a numpy copy of llama.cpp's kernels, built from the block parts
  (qtypes.decompose, itself checked against gguf above): activations quantized as llama.cpp's
  quantize_row_q8_0 / q8_1 (blocks of 32) or quantize_row_q8_K_ref (blocks of 256), exact integer
  sums per sub-block, float64 scaling; dair must agree to 1e-5 relative.

Test ids name the kernel family each test ran ("avx512", "avx2", "scalar"); `kernel_table()` says
which kernel actually serves each type in that family (a family without a kernel for a type
falls back to the next one down, and the test says so in its assertion message).
"""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from dair.model import qtypes
from dair.ops import matmul, threads
from dair.ops.matmul import BLOCK_LAYOUTS, KERNELS, Weight, get_kernels, kernel_table, set_kernels

NEW = ["Q5_0", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K", "Q5_K", "IQ4_XS"]
FLOATS = ["BF16"]
# byte offsets of each type's fp16 fields (d, dmin/m) inside a block
F16_FIELDS = {"Q5_0": [0], "Q5_1": [0, 2], "IQ4_NL": [0], "Q2_K": [80, 82], "Q3_K": [108], "Q5_K": [0, 2],
              "IQ4_XS": [0]}
Q8_1 = {"Q5_1"}  # activations with llama.cpp's Q8_1 sum term


@pytest.fixture
def rng():
    return np.random.default_rng(2468)


@pytest.fixture(params=KERNELS)
def kernels(request):
    old = set_kernels(request.param)
    yield request.param
    set_kernels(old)


def block_values(qtype):
    return qtypes.QTYPES[qtype].block_values


def random_weight(rng, qtype, rows, cols):
    """Random bytes (every bit pattern of codes and packed scales), fp16 fields kept |d| < 1."""
    if qtype == "BF16":
        raw = qtypes.quantize("BF16", rng.standard_normal(rows * cols).astype(np.float32))
    else:
        bb = qtypes.QTYPES[qtype].block_bytes
        raw = rng.integers(0, 256, (rows, cols // block_values(qtype), bb), dtype=np.uint8)
        for off in F16_FIELDS[qtype]:
            raw[..., off + 1] &= 0xBB  # sign kept, exponent <= 0b01110
        raw = raw.reshape(-1)
    wd = dequantize(raw.reshape(rows, -1), GGMLQuantizationType[qtype]).astype(np.float32).reshape(rows, cols)
    raw.flags.writeable = False  # as the model map is
    return Weight(raw, qtype, rows, cols), raw, wd


def activations(rng, n, cols, ties):
    x = rng.standard_normal((n, cols)).astype(np.float32)
    if ties:
        # every value k + 0.5 and -127 first in each block of 32: llama.cpp's scale is then exactly 1
        # (127 / amax for Q8_0, -127 / max for Q8_K), so every value is a rounding tie
        x = (rng.integers(-100, 100, (n, cols)) + 0.5).astype(np.float32)
        x[:, ::32] = -127.0
    if n > 1:
        x[1, :256] = 0.0  # an all-zero block
    return x


def llama_q8_32(x):
    """quantize_row_q8_0 / q8_1 (runtime versions): q, fp16-rounded d, s = fp16(d * sum q)."""
    n, cols = x.shape
    xb = x.reshape(n, cols // 32, 32).astype(np.float32)
    amax = np.abs(xb).max(axis=2)
    with np.errstate(divide="ignore"):
        iscale = np.where(amax == 0, np.float32(0), np.float32(127) / amax).astype(np.float32)
    q = np.rint(xb * iscale[..., None]).astype(np.int64)  # half to even, as _mm256_round_ps
    d = (amax / np.float32(127)).astype(np.float32)
    s = (d * q.sum(axis=2)).astype(np.float16).astype(np.float64)
    return q, d.astype(np.float16).astype(np.float64), s


def llama_q8_k(x):
    """quantize_row_q8_K_ref: q (n, nb, 256), float d (n, nb)."""
    n, cols = x.shape
    xb = x.reshape(n, cols // 256, 256).astype(np.float32)
    idx = np.abs(xb).argmax(axis=2)
    mx = np.take_along_axis(xb, idx[..., None], axis=2)[..., 0]
    with np.errstate(divide="ignore"):
        iscale = np.where(mx == 0, np.float32(0), np.float32(-127.0) / mx).astype(np.float32)
        d = np.where(mx == 0, np.float32(0), np.float32(1.0) / iscale).astype(np.float32)
    q = np.minimum(np.rint(xb * iscale[..., None]), 127).astype(np.int64)
    return q, d.astype(np.float64)


def emulate(x, raw, qtype, rows, cols):
    """llama.cpp's y = x @ W.T for an 8-bit activation type, in float64 from exact integer sums."""
    bv = block_values(qtype)
    nb = cols // bv
    p = qtypes.decompose(qtype, raw.reshape(rows * nb, -1))
    S, L = p.codes.shape[1:]
    codes = p.codes.astype(np.int64).reshape(rows, nb, S, L)
    sc = p.sc.astype(np.int64).reshape(rows, nb, S)
    m = p.m.astype(np.int64).reshape(rows, nb, S)
    d = p.d.astype(np.float64).reshape(rows, nb)
    dmin = p.dmin.astype(np.float64).reshape(rows, nb)
    if bv == 32:
        q, dx, sx = llama_q8_32(x)
    else:
        q, dx = llama_q8_k(x)
    q = q.reshape(x.shape[0], nb, S, L)
    sumi = np.einsum("rbs,rbsl,nbsl->nrb", sc, codes, q)
    y = d[None] * dx[:, None, :] * sumi
    if qtype in Q8_1:
        y -= dmin[None] * sx[:, None, :]  # Q5_1: + m * s (dmin = -m, m-sum 1)
    elif bv == 256:
        y -= dmin[None] * dx[:, None, :] * np.einsum("rbs,nbs->nrb", m, q.sum(axis=3))
    return y.sum(axis=2)


def float_bound(x, wd):
    return 1e-4 * (np.abs(x).astype(np.float64) @ np.abs(wd).T.astype(np.float64)) + 1e-6


def test_layouts_agree_with_gguf():
    for qt in NEW + FLOATS:
        want = GGML_QUANT_SIZES[GGMLQuantizationType[qt]]
        assert BLOCK_LAYOUTS[qt] == want, qt
        assert (qtypes.QTYPES[qt].block_values, qtypes.QTYPES[qt].block_bytes) == want, qt
        assert qtypes.QTYPES[qt].ggml_id == int(GGMLQuantizationType[qt]), qt


@pytest.mark.parametrize("qtype", NEW + FLOATS)
def test_numpy_dequantizer_matches_gguf(rng, qtype):
    cols = 2 * 256
    _, raw, wd = random_weight(rng, qtype, 5, cols)
    np.testing.assert_array_equal(qtypes.dequantize(qtype, raw, (5, cols)), wd)


def test_bf16_quantizer_rounds_to_nearest_even():
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, np.inf], np.float32)  # ties go to even
    got = qtypes.dequantize("BF16", qtypes.quantize("BF16", x), x.shape)
    np.testing.assert_array_equal(got, [1.0, 1.0, 1.0 + 4 * 2**-8, -2.5, np.inf])


@pytest.mark.parametrize("qtype", NEW + FLOATS)
def test_get_rows(rng, qtype, kernels):
    w, _, wd = random_weight(rng, qtype, 21, 512)
    ids = np.array([20, 0, 7, 7], np.int32)
    np.testing.assert_array_equal(w.get_rows(ids), wd[ids])


@pytest.mark.parametrize("qtype", NEW + FLOATS)
@pytest.mark.parametrize("rows", [1, 37])
def test_matmul_float_path(rng, qtype, rows, kernels):
    cols = 3 * 256
    w, _, wd = random_weight(rng, qtype, rows, cols)
    for n in (1, 5):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        ref = x.astype(np.float64) @ wd.T.astype(np.float64)
        y = w.matmul(x, act_q8=False)
        assert np.all(np.abs(y - ref) <= float_bound(x, wd)), np.abs(y - ref).max()
        if qtype in FLOATS:  # float weights ignore act_q8
            np.testing.assert_array_equal(w.matmul(x), y)


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("qtype", NEW)
@pytest.mark.parametrize("rows,blocks", [(1, 1), (37, 3), (70, 5)])
def test_matmul_q8_path_is_llama_cpps(rng, qtype, rows, blocks, ties, kernels):
    cols = blocks * 256 if block_values(qtype) == 256 else blocks * 32 + (64 if blocks > 1 else 0)
    w, raw, wd = random_weight(rng, qtype, rows, cols)
    ran = kernel_table(kernels)[qtype]
    for n in (1, 3, 6):
        x = activations(rng, n, cols, ties)
        y = w.matmul(x)
        emu = emulate(x, raw, qtype, rows, cols)
        scale = np.abs(x) @ np.abs(wd).T + 1e-6
        err = np.abs(y - emu) / scale
        assert np.all(err <= 1e-5), f"{qtype} on the {ran} kernel (family {kernels}): rel err {err.max():.3g}"


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS"])
@pytest.mark.parametrize("blocks", [1, 2, 5])
def test_prefill_rows_are_the_decode_rows(rng, qtype, blocks, ties, kernels):
    """These types' prefill kernels (four activation rows per unpacked weight block) give each row
    exactly what the one-row decode kernel gives it, at odd block counts (the odd-block tail of the
    two-blocks-per-zmm loop) and on rounding ties; and both agree with llama.cpp's maths."""
    cols = blocks * block_values(qtype)
    w, raw, wd = random_weight(rng, qtype, 19, cols)
    x = activations(rng, 11, cols, ties)  # 4 + 4 rows through the prefill kernel, 3 through decode
    y = w.matmul(x)
    for i in range(len(x)):
        np.testing.assert_array_equal(y[i], w.matmul(x[i:i + 1])[0], err_msg=f"{qtype} {kernels} row {i}")
    err = np.abs(y - emulate(x, raw, qtype, 19, cols)) / (np.abs(x) @ np.abs(wd).T + 1e-6)
    assert np.all(err <= 1e-5), f"{qtype} on {kernel_table(kernels)[qtype]}: rel err {err.max():.3g}"


@pytest.mark.parametrize("qtype", NEW)
def test_threads_and_chunks_agree(rng, qtype):
    """Rows split in chunks over 2 threads give the 1-thread result exactly, in every family."""
    cols = 4 * 256
    w, _, _ = random_weight(rng, qtype, 333, cols)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    old_k, old_t = get_kernels(), threads.get_num_threads()
    try:
        for k in KERNELS:
            set_kernels(k)
            threads.set_num_threads(1)
            one = w.matmul(x)
            threads.set_num_threads(2)
            np.testing.assert_array_equal(w.matmul(x), one, err_msg=f"{qtype} {k}")
    finally:
        threads.set_num_threads(old_t)
        set_kernels(old_k)


def test_kernel_table():
    table = kernel_table()
    assert set(table) >= set(NEW + FLOATS + ["Q4_0", "Q4_K"])
    assert table["F32"] == table["BF16"] == "float"
    assert all(v in KERNELS + ("float",) for v in table.values())
    assert set(kernel_table("scalar").values()) <= {"scalar", "float"}
    # every new 8-bit type has a kernel of its own in every family
    for k in KERNELS:
        assert {t: kernel_table(k)[t] for t in NEW} == {t: k for t in NEW}
    with pytest.raises(ValueError, match="kernels"):
        kernel_table("gpu")


def test_kernel_ops():
    """Per type and operation the family whose code runs: that of kernel_table, except where the
    avx512 family's table (ops/rows16_avx512.h) runs an AVX2 kernel for one operation."""
    for k in KERNELS:
        table, ops = kernel_table(k), matmul.kernel_ops(k)
        assert set(ops) == set(table)
        for qt, fam in table.items():
            got = {ops[qt]["decode"], ops[qt]["prefill"]}
            if k == "avx512" and qt in ("Q8_0", "Q4_0", "Q4_1"):
                assert got <= {"avx512", "avx2"} and "avx512" in got, (qt, ops[qt])
            else:
                assert got == {fam}, (k, qt, ops[qt])
    with pytest.raises(ValueError, match="kernels"):
        matmul.kernel_ops("gpu")


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils) to read the build")
def test_only_avx512_kernels_hold_avx512_instructions():
    """The AVX2 and plain-C families must run on AVX2-only CPUs: no EVEX-encoded instruction
    (zmm, mask or ymm16-31 registers) outside the functions of the AVX-512 family."""
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", matmul.__file__], capture_output=True,
                         text=True, check=True).stdout
    evex = re.compile(r"zmm|%k[0-7]|[xy]mm(1[6-9]|2\d|3[01])\b")
    fn, found = None, set()
    for line in dis.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:", line)
        if m:
            fn = m.group(1)
        elif fn and evex.search(line):
            found.add(fn)
    allowed = re.compile(r"avx512|512|dair_img_|_wide")
    assert found and not {f for f in found if not allowed.search(f)}, sorted(found)


def test_families_follow_the_cpu():
    """AVX-512 kernels are offered exactly where the CPU has the instructions they use."""
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if not flags:
        pytest.skip("no /proc/cpuinfo flags")
    cap = os.environ.get("DAIR_KERNELS", "")  # a run capped at a family (see dair.ops.matmul)
    has512 = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512dq"} <= flags and cap not in ("avx2", "scalar")
    assert ("avx512" in KERNELS) == has512, (KERNELS, sorted(f for f in flags if f.startswith("avx")))
    assert ("avx2" in KERNELS) == ({"avx2", "fma", "f16c"} <= flags and cap != "scalar")


def test_kernels_can_be_capped_for_a_whole_run():
    code = ("from dair.ops.matmul import KERNELS, get_kernels, kernel_table; "
            "print(','.join(KERNELS), get_kernels(), kernel_table()['Q5_K'])")
    for cap in ("avx2", "scalar"):
        if cap not in KERNELS:
            continue
        env = dict(os.environ, DAIR_KERNELS=cap)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        fams = KERNELS[KERNELS.index(cap):]
        assert out.stdout.split() == [",".join(fams), cap, cap]
