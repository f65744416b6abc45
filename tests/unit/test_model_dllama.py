"""distributed-llama .m/.t: converter round trip against the GGUF, reader errors."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.tiny_models import write_tiny_gguf
from test_tokenizer_spm import _vocab

from dair.errors import DairError, ModelFormatError
from dair.model import open_model
from dair.model.convert import convert_gguf_to_dllama
from dair.tokenizer import load_tokenizer
from dair.tokenizer.dllama_t import TRAILER, read_t

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="module")
def smol_m(default_model, tmp_path_factory):
    m, t = convert_gguf_to_dllama(default_model, tmp_path_factory.mktemp("dllama") / "smol.m", "f32")
    return m


def test_round_trip_f32_every_tensor(default_model, smol_m):
    with open_model(default_model) as g, open_model(smol_m) as m:
        assert m.format == "dllama" and m.config.tied_embeddings is False
        gc, mc = g.config.to_dict(), m.config.to_dict()
        gc.pop("tied_embeddings"), mc.pop("tied_embeddings")
        assert gc == mc
        assert set(m.tensors) == set(g.tensors)
        for name, t in m.tensors.items():
            assert t.qtype == "F32"
            np.testing.assert_array_equal(t.dequantize(), g.tensors[name].dequantize(), err_msg=name)


def test_dllama_layers_are_contiguous(smol_m):
    with open_model(smol_m) as m:
        ranges = [m.layer_byte_range(i) for i in range(m.config.n_layers)]
        assert ranges[0][0] == m.embedding.offset + m.embedding.nbytes
        for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
            assert end == start
        assert not m.embedding.raw.flags.writeable
        assert len(m.fingerprint) == 64


def test_tokenizer_from_m_and_t_matches_llama_cpp(default_model, smol_m):
    cases = json.loads((DATA / "SmolLM2-135M-Instruct.Q4_1.tokenize.json").read_text())["cases"]
    g = load_tokenizer(default_model)
    with open_model(smol_m) as m:
        tok = load_tokenizer(m)
    assert tok.vocab.merges == g.vocab.merges  # rebuilt from the vocabulary order alone
    assert tok.vocab.tokens == g.vocab.tokens and tok.vocab.token_types == g.vocab.token_types
    assert tok.eos_ids == g.eos_ids and tok.bos_id == g.bos_id and tok.add_bos == g.add_bos
    assert tok.chat_template == g.chat_template
    for c in cases:
        assert tok.encode(c["text"]) == c["ids"]
        assert tok.decode(c["ids"]) == c["text"]


def test_foreign_t_without_trailer(smol_m, tmp_path):
    """A .t as dllama's own converter would leave it: no dair trailer, heuristics only."""
    data = smol_m.with_suffix(".t").read_bytes()
    cut = tmp_path / "plain.t"
    cut.write_bytes(data[:data.rindex(TRAILER)])
    tok = load_tokenizer(cut)
    assert tok.kind == "gpt2" and tok.vocab.pre == "smollm"
    cases = json.loads((DATA / "SmolLM2-135M-Instruct.Q4_1.tokenize.json").read_text())["cases"]
    for c in cases:
        assert tok.encode(c["text"]) == c["ids"]


@pytest.mark.parametrize("qtype,wt", [("Q4_0", "q40"), ("Q8_0", "q80"), ("F16", "f16"), ("F32", "f32")])
def test_same_type_is_copied_byte_for_byte(tmp_path, qtype, wt):
    src = write_tiny_gguf(tmp_path / "a.gguf", qtype=qtype)
    m, _ = convert_gguf_to_dllama(src, tmp_path / "a.m", wt)
    with open_model(src) as g, open_model(m) as d:
        for name, t in d.tensors.items():
            if t.qtype == qtype:
                assert t.raw.tobytes() == g.tensors[name].raw.tobytes(), name
            np.testing.assert_array_equal(t.dequantize(), g.tensors[name].dequantize())


def test_q4_1_to_q40_is_a_close_requantization(tmp_path):
    src = write_tiny_gguf(tmp_path / "a.gguf", qtype="Q4_1")
    m, _ = convert_gguf_to_dllama(src, tmp_path / "a.m", "q40")
    with open_model(src) as g, open_model(m) as d:
        t = d.tensors["blk.0.ffn_up.weight"]
        assert t.qtype == "Q4_0"
        ref = g.tensors["blk.0.ffn_up.weight"].dequantize()
        assert np.abs(t.dequantize() - ref).max() < 0.1 * np.abs(ref).max()


def test_spm_tokenizer_survives_conversion(tmp_path):
    tokens, types, scores = _vocab()
    src = write_tiny_gguf(tmp_path / "s.gguf", vocab_size=len(tokens), tokenizer={
        "model": "llama", "tokens": tokens, "token_type": types, "scores": scores, "bos": 1, "eos": 2,
        "add_bos": True})
    m, t = convert_gguf_to_dllama(src, tmp_path / "s.m", "f32")
    a, b = load_tokenizer(src), load_tokenizer(t)
    assert b.kind == "llama" and b.add_bos
    for text in ["hello world", "héllo wörld", "the world and hello", ""]:
        assert b.encode(text) == a.encode(text)
        assert b.decode(b.encode(text), skip_special=True) == text


def test_convert_cli(tmp_path, capsys):
    from dair.cli import main

    tokens, types, scores = _vocab()
    src = write_tiny_gguf(tmp_path / "a.gguf", qtype="Q8_0", vocab_size=len(tokens), tokenizer={
        "model": "llama", "tokens": tokens, "token_type": types, "scores": scores, "bos": 1, "eos": 2})
    assert main(["model", "convert", str(src), str(tmp_path / "o.m"), "--type", "q80"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / "o.m"), str(tmp_path / "o.t")]
    assert main(["model", "info", str(tmp_path / "o.m"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "dllama" and info["layer_tensor_types"]["attn_q"] == "Q8_0"


def test_m_without_t_has_no_tokenizer(tiny_m):
    assert not tiny_m.with_suffix(".t").exists()  # the tiny GGUF has no tokenizer: no .t written
    with open_model(tiny_m) as m, pytest.raises(DairError, match="no tokenizer next to it"):
        load_tokenizer(m)


def test_convert_refuses_dllama_input(smol_m, tmp_path):
    with pytest.raises(DairError, match="reads GGUF"):
        convert_gguf_to_dllama(smol_m, tmp_path / "x.m", "f32")


# -- errors ----------------------------------------------------------------------------------------

@pytest.fixture
def tiny_m(tmp_path):
    m, _ = convert_gguf_to_dllama(write_tiny_gguf(tmp_path / "a.gguf", qtype="Q4_0"), tmp_path / "a.m", "q40")
    return m


def _err(path) -> str:
    with pytest.raises(ModelFormatError) as ei:
        open_model(path)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def _set_key(path: Path, key: int, new_key: int | None = None, value: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    (header_size,) = struct.unpack_from("<i", data, 4)
    for off in range(8, header_size, 8):
        k, v = struct.unpack_from("<ii", data, off)
        if k == key:
            struct.pack_into("<ii", data, off, key if new_key is None else new_key, v if value is None else value)
            path.write_bytes(bytes(data))
            return
    raise AssertionError(f"key {key} not in header")


def test_unknown_header_key(tiny_m):
    _set_key(tiny_m, 8, new_key=99)
    assert "unknown header key 99" in _err(tiny_m)


def test_unsupported_arch(tiny_m):
    _set_key(tiny_m, 1, value=0xABCD01)
    assert "architecture QWEN3 is not supported" in _err(tiny_m)


def test_bad_weight_type(tiny_m):
    _set_key(tiny_m, 13, value=7)
    assert "weights_float_type 7" in _err(tiny_m)


def test_truncated_m(tiny_m):
    tiny_m.write_bytes(tiny_m.read_bytes()[:-10])
    assert "truncated: output.weight" in _err(tiny_m)
    tiny_m.write_bytes(tiny_m.read_bytes()[:20])
    assert "truncated" in _err(tiny_m)


def test_trailing_bytes_m(tiny_m):
    tiny_m.write_bytes(tiny_m.read_bytes() + b"\0" * 64)
    assert "64 bytes after the last tensor" in _err(tiny_m)


def test_old_magic(tmp_path):
    p = tmp_path / "old.m"
    p.write_bytes(struct.pack("<i", 0xABCD00) + b"\0" * 64)
    assert "bad magic" in _err(p) or "old" in _err(p)


def test_t_unknown_key_and_truncation(tmp_path):
    src = write_tiny_gguf(tmp_path / "s.gguf", vocab_size=len(_vocab()[0]), tokenizer={
        "model": "llama", "tokens": _vocab()[0], "token_type": _vocab()[1], "scores": _vocab()[2], "bos": 1,
        "eos": 2})
    _, t = convert_gguf_to_dllama(src, tmp_path / "s.m", "f32")
    good = t.read_bytes()
    t.write_bytes(good[:-len(good) // 2])
    with pytest.raises(ModelFormatError, match="truncated"):
        read_t(t)
    data = bytearray(good)
    struct.pack_into("<i", data, 8, 42)  # first key id
    t.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="unknown header key 42") as ei:
        read_t(t)
    assert str(t) in str(ei.value)


def test_cli_info_bad_m_one_line(tiny_m):
    _set_key(tiny_m, 8, new_key=77)
    r = subprocess.run([sys.executable, "-m", "dair", "model", "info", str(tiny_m)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown header key 77" in lines[0] and str(tiny_m) in lines[0]
