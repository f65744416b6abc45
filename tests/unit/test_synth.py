"""Synthetic models (dair.model.synth): a valid GGUF that every part of dair reads and runs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dair.cli import main
from dair.engine.forward import RangeEngine
from dair.errors import DairError
from dair.model import open_model
from dair.model.synth import SHAPES, synth_vocab, write_synth


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synth(tmp_path_factory.mktemp("synth") / "tiny.gguf", "tiny", "q4_0", seed=1)


def test_cli_writes_a_file_that_info_reads(tmp_path, capsys):
    out = tmp_path / "t8.gguf"
    assert main(["model", "synth", "--shape", "tiny", "--type", "q8_0", "--layers", "3", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert main(["model", "info", "--json", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    s = SHAPES["tiny"]
    assert (info["n_layers"], info["dim"], info["hidden_dim"], info["n_heads"], info["n_kv_heads"]) == (
        3, s.dim, s.hidden_dim, s.n_heads, s.n_kv_heads)
    assert info["vocab_size"] == s.vocab_size and info["layer_tensor_types"]["ffn_down"] == "Q8_0"
    assert info["tokenizer"]["kind"] == "gpt2"


def test_engine_runs_it_with_finite_outputs(tiny):
    mf = open_model(tiny)
    c = mf.config
    assert (c.n_layers, c.dim, c.vocab_size) == (4, 256, 512)
    eng = RangeEngine(mf, 0, c.n_layers - 1)
    eng.open_session("s")
    ids = np.arange(0, 500, 37, dtype=np.int32)
    x = eng.run_layers(eng.embed(ids), [("s", np.arange(ids.size, dtype=np.int32))])
    logits = eng.head(x)
    assert np.isfinite(x).all() and np.isfinite(logits).all()
    # unit-scale activations: the residual stream grows like sqrt(layers), no blow-up
    assert float(np.sqrt((x ** 2).mean())) < 10 and 0.3 < float(logits.std()) < 3


def test_real_width_layers_stay_finite(tmp_path):
    # 7B widths (dim 4096, FFN 11008), two layers: the scales hold at real size too.
    mf = open_model(write_synth(tmp_path / "w.gguf", "llama-7b", "q4_0", n_layers=2))
    eng = RangeEngine(mf, 0, 1)
    eng.open_session("s")
    x = eng.run_layers(eng.embed(np.array([1, 2, 3], np.int32)), [("s", np.arange(3, dtype=np.int32))])
    assert np.isfinite(eng.head(x)).all() and float(np.sqrt((x ** 2).mean())) < 10


def test_tokenizer_round_trips(tiny):
    from dair.tokenizer import load_tokenizer

    tok = load_tokenizer(open_model(tiny))
    text = "hello, synthetic world"
    assert tok.decode(tok.encode(text)) == text


def test_vocab_and_errors(tmp_path):
    tokens, types, merges = synth_vocab(300)
    assert len(tokens) == len(types) == 300 and len(merges) == 300 - 257 and len(set(tokens)) == 300
    with pytest.raises(DairError, match="unknown shape"):
        write_synth(tmp_path / "x.gguf", "llama-99b")
    with pytest.raises(DairError, match="q4_0, q8_0 or f16"):
        write_synth(tmp_path / "x.gguf", "tiny", "q5_0")
