"""The memory ceiling `dair bench` prints: the read-bandwidth probe and the bytes a decode step reads."""
from __future__ import annotations

import math

import pytest

from dair.engine.bench import decode_weight_bytes
from dair.engine.forward import RangeEngine
from dair.ops.membw import read_bandwidth
from dair.ops.threads import get_num_threads, set_num_threads


@pytest.mark.parametrize("threads", [1, 2])
def test_read_bandwidth_is_a_rate_at_each_thread_count(threads):
    was = get_num_threads()
    set_num_threads(threads)
    try:
        bw = read_bandwidth(16 << 20, repeats=2)
    finally:
        set_num_threads(was)
    # 16 MiB read in well under a second and over a microsecond: a rate, not a time or a count
    assert math.isfinite(bw) and 16e6 < bw < 1e14


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
