"""A weight row's product with an activation row does not depend on the batch it came in.

Decode multiplies one activation row at a time, prefill many; the kernels for the two (one row,
four rows sharing a weight unpack, a panel of 8 weight rows) must do the same float operations
per row, so that a prompt's last row gives bit for bit the logits a decode step would. Checked
for every family this CPU runs, at row counts that leave partial 4- and 8-row groups, and with
the products split over two threads.
"""

import numpy as np
import pytest

from dair.ops import threads
from dair.ops.matmul import BLOCK_LAYOUTS, KERNELS, Weight, _set_avx512_op, set_kernels

# Byte offsets of each type's fp16 scales within its block.
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2],
              "Q6_K": [208]}


@pytest.fixture(params=KERNELS)
def kernels(request):
    old = set_kernels(request.param)
    yield request.param
    set_kernels(old)


def random_weight(rng: np.random.Generator, qtype: str, rows: int, cols: int) -> Weight:
    """Random code bytes, with fp16 scales drawn from a small range so that products stay finite."""
    bv, bb = BLOCK_LAYOUTS[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // bv, bb), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scales = rng.uniform(-0.01, 0.01, size=(rows, cols // bv, 1)).astype(np.float16)
        raw[..., off:off + 2] = scales.view(np.uint8)
    return Weight(np.ascontiguousarray(raw).reshape(-1), qtype, rows, cols)


@pytest.mark.parametrize("qtype", sorted(F16_FIELDS))
@pytest.mark.parametrize("rows", [5, 45, 333])
@pytest.mark.parametrize("blocks", [3, 13])  # 13: kernels that take 4 blocks at a time, and a tail
def test_rows_do_not_depend_on_the_batch(qtype, rows, blocks, kernels):
    rng = np.random.default_rng(rows)
    cols = blocks * BLOCK_LAYOUTS[qtype][0]
    w = random_weight(rng, qtype, rows, cols)
    x = rng.standard_normal((9, cols)).astype(np.float32)
    x[2] *= 1000.0  # rows of very different scales in one batch
    old = threads.get_num_threads()
    try:
        for t in (1, 2):
            threads.set_num_threads(t)
            batch = w.matmul(x)
            assert np.all(np.isfinite(batch))
            for i in range(x.shape[0]):
                np.testing.assert_array_equal(w.matmul(x[i:i + 1])[0], batch[i], err_msg=f"row {i}, {t} threads")
            np.testing.assert_array_equal(w.matmul(x[3:8]), batch[3:8])  # a batch of 5: one group of 4 and 1
    finally:
        threads.set_num_threads(old)


@pytest.mark.skipif("avx512" not in KERNELS, reason="needs a CPU with the avx512 family")
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("rows,blocks", [(16, 1), (37, 3), (100, 18), (333, 13), (48, 50)])
def test_avx512_rows_are_the_avx2_rows_bit_for_bit(qtype, rows, blocks):
    """The avx512 family's 16-row kernels (ops/rows16_avx512.h) do rows8_avx2.h's float steps, so its
    table may pick either for decode or prefill without changing a bit: checked at odd block counts
    (the 4- and 2-block loops' tails), partial 16-row groups and more than 48 blocks (heap buffers)."""
    rng = np.random.default_rng(rows * blocks)
    cols = blocks * BLOCK_LAYOUTS[qtype][0]
    w = random_weight(rng, qtype, rows, cols)
    old = set_kernels("avx512")
    try:
        for n in (1, 2, 3, 9):  # up to 3 rows "decode", then "prefill" (rows16_avx512.h)
            x = rng.standard_normal((n, cols)).astype(np.float32)
            x[0] *= 300.0
            set_kernels("avx2")
            want = w.matmul(x)
            set_kernels("avx512")
            op = "decode" if n < 4 else "prefill"
            for use16 in (True, False):  # both kernels, whichever the table picks
                was = _set_avx512_op(qtype, op, use16)
                try:
                    got = w.matmul(x)
                finally:
                    _set_avx512_op(qtype, op, was)
                np.testing.assert_array_equal(got, want, err_msg=f"{qtype} {rows} x {cols}, n={n}, 16 rows: {use16}")
    finally:
        set_kernels(old)
