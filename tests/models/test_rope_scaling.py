"""Long-context rotary scaling from a GGUF's rope.scaling.* (linear, YaRN) and llama3's
rope_freqs.weight, against tests/support/numpy_reference.py's float64 rendering of the maths.

Synthetic GGUFs carry the metadata; dair opens them as it would a real file. The rotation alone
is compared at positions far past the original context (where YaRN's interpolated pairs differ
most from plain rope), and a whole forward pass (prefill, then decode through the KV cache) is
compared past an original context of 16 tokens. Each comparison also checks that the same
reference without the scaling is far off, so a scaling dair ignored could not pass.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dair.engine.rope import inv_freq, magnitude
from dair.errors import ModelFormatError
from dair.model import open_model
from dair.model.synth import SHAPES, write_synth
from dair.ops.rope import rope_inplace

TINY = replace(SHAPES["tiny"], n_layers=2)  # head_dim 32, base 10000
YARN = (("type", "yarn"), ("factor", 8.0), ("original_context_length", 4096))
CASES = {
    "linear": replace(TINY, rope_scaling=(("type", "linear"), ("factor", 4.0))),
    # llama.cpp reads a factor with no type as linear (and so does the old rope.scale_linear key)
    "factor-only": replace(TINY, rope_scaling=(("factor", 2.0),)),
    "yarn": replace(TINY, rope_scaling=YARN),
    "yarn-tuned": replace(TINY, rope_scaling=(*YARN, ("attn_factor", 0.8), ("yarn_beta_fast", 16.0),
                                              ("yarn_beta_slow", 2.0))),
    "llama3-freqs": replace(TINY, rope_freqs=True),
    "qwen3-yarn": replace(SHAPES["tiny-qwen3"], rope_scaling=YARN),  # NEOX pairs, head_dim 64
    # Gemma 3 4B+ files: linear 8 on the global layers; the sliding ones keep base 1e4, unscaled
    # (attn_factor, which llama.cpp applies to every layer, added to see that it reaches both)
    "gemma3-linear": replace(SHAPES["tiny-gemma3"], rope_scaling=(("type", "linear"), ("factor", 8.0),
                                                                           ("attn_factor", 0.9))),
}
# Past the original context of 4096, up to the model's own (factor 8: 32k).
FAR = np.array([0, 1, 17, 4095, 4096, 9000, 20000, 32767], np.int32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rope")
    return lambda name, shape=None: write_synth(d / f"{name}.gguf", shape or CASES[name], "q8_0", seed=3)


def _dair_rotate(mf, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """dair's rotation of x[n, heads, hd] as its engine does it (file config -> kernel), in the
    reference's dim order (NEOX files rotate halves: the engine reorders to adjacent pairs)."""
    from dair.engine.forward import RangeEngine

    eng = RangeEngine(mf, 0, 0)
    got = eng._rotate(x.copy(), pos, False)  # in place
    return got if eng.rope_perm is None else got[:, :, np.argsort(eng.rope_perm)]


def _plain(ref) -> None:
    """The reference with every long-context scaling off."""
    ref.freq_scale, ref.ext_factor, ref.attn_factor = 1.0, 0.0, 1.0
    ref.freq_factors = np.ones_like(ref.freq_factors)


@pytest.mark.parametrize("name", list(CASES))
def test_rotation_matches_reference_past_the_original_context(name, files):
    from support.numpy_reference import NumpyModel

    path = files(name)
    mf = open_model(path)
    ref = NumpyModel(str(path))
    hd = mf.config.head_dim
    x = np.random.default_rng(0).standard_normal((FAR.size, 3, hd)).astype(np.float32)
    got = _dair_rotate(mf, x, FAR)
    want = ref.rope(x, FAR, ref.theta)
    # float32 angles: pos * f carries ~6e-8 relative error, ~2e-3 rad at 32767
    np.testing.assert_allclose(got, want, atol=5e-3 * float(np.abs(want).max()))
    _plain(ref)
    assert float(np.abs(got - ref.rope(x, FAR, ref.theta)).max()) > 0.2 * float(np.abs(want).max())


@pytest.mark.parametrize("name", ["linear", "yarn-tuned", "llama3-freqs", "qwen3-yarn", "gemma3-linear"])
def test_forward_matches_reference_past_the_original_context(name, files):
    """Prefill 12 tokens, decode to 28 through the KV cache, original context 16: logits within
    float32 noise of the reference (float32 activations, as tests/models/test_families.py)."""
    from support.numpy_reference import NumpyModel

    from dair.engine.forward import RangeEngine

    shape = CASES[name]
    scaling = tuple((k, 16 if k == "original_context_length" else v) for k, v in shape.rope_scaling)
    path = files(f"{name}-16", replace(shape, rope_scaling=scaling))
    ids = [int(t) for t in np.random.default_rng(1).integers(1, 512, 28)]
    ref = NumpyModel(str(path))
    want = ref.logits(ids)
    mf = open_model(path)
    eng = RangeEngine(mf, 0, mf.config.n_layers - 1, act_q8=False)
    eng.open_session("s")
    got = [eng.head(eng.run_layers(eng.embed(np.array(ids[:12], np.int32)), [("s", np.arange(12, dtype=np.int32))]))]
    for p in range(12, len(ids)):
        got.append(eng.head(eng.run_layers(eng.embed(np.array([ids[p]], np.int32)), [("s", np.array([p], np.int32))])))
    got = np.concatenate(got)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err < 2e-3, err
    _plain(ref)
    off = float(np.abs(got - ref.logits(ids)).max() / np.abs(want).max())
    assert off > 10 * max(err, 1e-3), (off, err)


def test_yarn_magnitude_and_frequencies_from_the_formula():
    # factor 8: cos and sin scaled by 1 + 0.1 ln 8 (times attn_factor); pairs past the ramp are
    # exactly base / 8, pairs before it exactly base (orig 4096, base 1e4, 32 dims: ramp 5..12).
    s = {"type": "yarn", "factor": 8.0, "original_context_length": 4096}
    assert magnitude(s) == pytest.approx(1 + 0.1 * np.log(8.0))
    assert magnitude({**s, "attn_factor": 0.5}) == pytest.approx(0.5 * (1 + 0.1 * np.log(8.0)))
    assert magnitude({"type": "linear", "factor": 8.0}) == 1.0
    base = inv_freq(32, 1e4)
    f = inv_freq(32, 1e4, s)
    np.testing.assert_allclose(f[:6], base[:6], rtol=1e-6)
    np.testing.assert_allclose(f[12:], base[12:] / 8, rtol=1e-6)
    assert ((f[6:12] < base[6:12]) & (f[6:12] > base[6:12] / 8)).all()


def test_kernel_magnitude_leaves_unrotated_dims_alone():
    # ggml scales only the rotated dims: a partial rope (16 of 32 dims) keeps the rest as they are.
    x = np.random.default_rng(2).standard_normal((4, 2, 32)).astype(np.float32)
    y = rope_inplace(x.copy(), np.zeros(4, np.int32), np.ones(8, np.float32), 1.5)
    np.testing.assert_allclose(y[..., :16], 1.5 * x[..., :16], rtol=1e-6)
    np.testing.assert_array_equal(y[..., 16:], x[..., 16:])


@pytest.mark.parametrize(("extra", "match"), [
    ((("type", "longrope"), ("factor", 4.0)), "rope scaling type 'longrope' is not supported"),
    ((("type", "yarn"), ("factor", 4.0), ("yarn_log_multiplier", 0.1)), "yarn_log_multiplier"),
    ((("type", "linear"), ("factor", -2.0)), "not a positive number"),
])
def test_unsupported_scaling_is_refused_by_name_at_open(extra, match, files, capsys):
    from dair.cli import main

    path = files(f"bad-{extra[0][1]}-{len(extra)}", replace(TINY, rope_scaling=extra))
    with pytest.raises(ModelFormatError, match=match) as e:
        open_model(path)
    assert str(path) in str(e.value)
    assert main(["model", "info", str(path)]) != 0
    err = capsys.readouterr().err.strip()
    assert match in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_stages_apply_the_scaling_as_one_process_does(files, cluster_config, tmp_path):
    """Each stage opens the file and rotates its own layers: through 2 stage processes (f32
    wire) the scores of a sequence past the original context are those of one process."""
    from support.cluster_fixtures import start_cluster, stop_cluster

    from dair.backend import LocalBackend
    from dair.bus.client import BusBackend

    shape = replace(CASES["yarn-tuned"], rope_scaling=tuple(
        (k, 16 if k == "original_context_length" else v) for k, v in CASES["yarn-tuned"].rope_scaling))
    path = files("yarn-cluster", shape)
    ids = [int(t) for t in np.random.default_rng(4).integers(1, 512, 40)]
    local = LocalBackend(path, quiet=True).score(ids, 512)["positions"]
    c = start_cluster(path, [(0, 0), (1, 1)], tmp_path, wire="f32", config=cluster_config)
    backend = BusBackend(c.addr, timeout=120)
    try:
        remote = backend.score(ids, 512)["positions"]
    finally:
        backend.close()
        stop_cluster(c)
    assert len(remote) == len(local)
    for p, (a, b) in enumerate(zip(local, remote, strict=True)):
        la, lb = dict(map(tuple, a["top"])), dict(map(tuple, b["top"]))
        gap = max(abs(la[t] - lb[t]) for t in la)
        assert gap < 1e-3, f"position {p}: {gap}"
