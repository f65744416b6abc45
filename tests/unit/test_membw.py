"""The memory ceiling `dair bench` prints: the read-bandwidth probe and the bytes a decode step reads."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dair.engine.bench import decode_weight_bytes
from dair.engine.forward import RangeEngine
from dair.ops.membw import read_bandwidth, xor_words
from dair.ops.threads import get_num_threads, set_num_threads


@pytest.fixture(params=[1, 2])
def threads(request):
    was = get_num_threads()
    set_num_threads(request.param)
    yield request.param
    set_num_threads(was)


@pytest.mark.parametrize("n", [1, 7, 8, 63, 64, 1000, 4097, 1 << 17])
def test_the_probe_reads_every_word_once(threads, n):
    # The probe's read is an XOR of every word, so a chunk split that skipped a word, read one
    # twice (its XOR cancels) or stopped at the last whole line shows against numpy's own XOR.
    words = np.random.default_rng(n).integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    assert xor_words(words) == int(np.bitwise_xor.reduce(words))


def test_read_bandwidth_is_a_rate(threads):
    bw = read_bandwidth(16 << 20, repeats=2)
    assert math.isfinite(bw) and bw > 0


def test_xor_words_refuses_other_arrays():
    with pytest.raises(ValueError, match="uint64"):
        xor_words(np.zeros(8, np.float64))


@pytest.mark.parametrize("nbytes, repeats, what", [(1 << 19, 1, "at least 1 MiB"), (1 << 20, 0, "at least 1")])
def test_read_bandwidth_refuses_what_measures_nothing(nbytes, repeats, what):
    with pytest.raises(ValueError, match=what):
        read_bandwidth(nbytes, repeats)


def test_decode_reads_every_tensor_of_a_tied_model_once(model_file, default_model):
    # SmolLM2's output head is its token embedding, so a decode step reads the whole file's
    # tensors: counted here by the gguf package's own reader, not dair's.
    from gguf import GGUFReader

    on_disk = sum(int(t.n_bytes) for t in GGUFReader(str(default_model)).tensors)
    eng = RangeEngine(model_file, 0, model_file.config.n_layers - 1)
    assert decode_weight_bytes(eng) == on_disk
    # a range without the head reads only its layers
    part = RangeEngine(model_file, 0, 9)
    assert 0 < decode_weight_bytes(part) < on_disk / 2
