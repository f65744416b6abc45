"""GGUF reading: config, zero-copy views, dequantization, layer ranges, fingerprint, errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest
from support.tiny_models import TINY, write_tiny_gguf

from dair.errors import ModelFormatError
from dair.model import open_model, qtypes


@pytest.fixture(scope="module")
def smol(default_model):
    with open_model(default_model) as mf:
        yield mf


@pytest.fixture(scope="module")
def smol_reader(default_model):
    """The gguf package's own reading of the file: the independent reference."""
    return gguf.GGUFReader(default_model)


def test_default_model_config(smol):
    c = smol.config
    assert smol.format == "gguf"
    assert (c.arch, c.dim, c.hidden_dim, c.n_layers) == ("llama", 576, 1536, 30)
    assert (c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.context_length == 8192 and c.rope_theta == 100000.0 and c.rope_dim == 64
    assert c.rms_eps == pytest.approx(1e-5) and c.tied_embeddings and c.rope_scaling is None


def test_tied_output_is_embedding(smol):
    assert smol.output is smol.embedding
    assert smol.embedding.shape == (49152, 576) and smol.embedding.qtype == "Q8_0"
    assert smol.output_norm.shape == (576,) and smol.output_norm.qtype == "F32"


def test_views_are_zero_copy_and_read_only(smol):
    t = smol.tensors["blk.3.ffn_down.weight"]
    assert t.raw.dtype == np.uint8 and t.raw.size == t.nbytes
    assert not t.raw.flags.writeable
    assert np.shares_memory(t.raw, smol._map)
    with open(smol.path, "rb") as f:
        f.seek(t.offset)
        assert f.read(64) == t.raw[:64].tobytes()


def test_layer_tensors_shapes(smol):
    lt = smol.layer_tensors(7)
    assert set(lt) == {"attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down"}
    assert lt["wq"].name == "blk.7.attn_q.weight" and lt["wq"].shape == (576, 576)
    assert lt["wk"].shape == (192, 576) and lt["wv"].shape == (192, 576)
    assert lt["w_gate"].shape == (1536, 576) and lt["w_down"].shape == (576, 1536)
    assert lt["attn_norm"].shape == (576,)
    with pytest.raises(IndexError):
        smol.layer_tensors(30)


def test_layer_byte_ranges_cover_exactly_their_tensors(smol):
    ranges = []
    for i in range(smol.config.n_layers):
        start, end = smol.layer_byte_range(i)
        ts = smol.layer_tensors(i).values()
        assert start == min(t.offset for t in ts) and end == max(t.offset + t.nbytes for t in ts)
        assert end - start == sum(t.nbytes for t in ts) + sum(
            (-t.nbytes) % 32 for t in ts if t.offset + t.nbytes < end)  # contiguous up to alignment
        ranges.append((start, end))
    ranges.sort()  # files need not store layers in order (this one has blk.10 after blk.1)
    for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert start >= end
    assert ranges[-1][1] <= smol.path.stat().st_size


@pytest.mark.parametrize("name", ["token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight",
                                  "blk.5.ffn_norm.weight", "output_norm.weight"])
def test_dequantize_matches_gguf_package(smol, smol_reader, name):
    rt = next(t for t in smol_reader.tensors if t.name == name)
    ref = gguf.quants.dequantize(rt.data, rt.tensor_type).reshape(smol.tensors[name].shape)
    np.testing.assert_array_equal(smol.tensors[name].dequantize(), ref.astype(np.float32))


def test_fingerprint_is_stable_and_sensitive(tmp_path, smol):
    """The fingerprint is the header and tensor table; tensor bytes are the digests' (test_digests.py)."""
    from dair.model.digests import FileDigests

    p = write_tiny_gguf(tmp_path / "a.gguf")
    fp = open_model(p).fingerprint
    assert len(fp) == 64 and fp == open_model(p).fingerprint
    t = open_model(p).tensors["blk.1.attn_v.weight"]
    q = tmp_path / "b.gguf"
    shutil.copy(p, q)
    with open(q, "r+b") as f:  # flip a byte in the tensor's first block
        f.seek(t.offset + 5)
        b = f.read(1)
        f.seek(t.offset + 5)
        f.write(bytes([b[0] ^ 0xFF]))
    assert open_model(q).fingerprint == fp
    a_digests = FileDigests(open_model(p), cache=tmp_path / "c").for_range(1, 1)
    b_digests = FileDigests(open_model(q), cache=tmp_path / "c").for_range(1, 1)
    assert [n for n in a_digests if a_digests[n] != b_digests[n]] == ["blk.1.attn_v.weight"]
    # Another header (one more layer), same generator: another fingerprint.
    assert open_model(write_tiny_gguf(tmp_path / "c.gguf", n_layers=TINY["n_layers"] + 1)).fingerprint != fp
    assert smol.fingerprint != fp


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_tiny_models_of_every_type(tmp_path, qtype):
    mf = open_model(write_tiny_gguf(tmp_path / "m.gguf", qtype=qtype, tied=(qtype == "Q4_0")))
    assert mf.config.n_layers == TINY["n_layers"] and mf.config.tied_embeddings == (qtype == "Q4_0")
    reader = gguf.GGUFReader(mf.path)
    for rt in reader.tensors:
        t = mf.tensors[rt.name]
        assert t.qtype == (qtype if len(t.shape) == 2 else "F32")
        ref = gguf.quants.dequantize(rt.data, rt.tensor_type).reshape(t.shape)
        np.testing.assert_array_equal(t.dequantize(), ref)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantize_matches_gguf_package(qtype):
    x = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    x[1, :32] = 0.0  # an all-zero block (scale 0) must not divide by zero
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype]).reshape(-1)
    np.testing.assert_array_equal(qtypes.quantize(qtype, x), ref)
    y = qtypes.dequantize(qtype, qtypes.quantize(qtype, x), x.shape)
    assert np.abs(y - x).max() < (0.02 if qtype == "Q8_0" else 0.4)


# -- errors: one line, naming the file and the problem ----------------------------------------

def _err(path) -> str:
    with pytest.raises(ModelFormatError) as ei:
        open_model(path)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg
    return msg


@pytest.mark.parametrize("n", [0, 3, 200, 1785664, 50_000_000])
def test_truncated_default_model(tmp_path, default_model, n):
    p = tmp_path / "cut.gguf"
    with open(default_model, "rb") as f:
        p.write_bytes(f.read(n))
    msg = _err(p)
    assert ("truncated" in msg) if n > 4 else ("empty" in msg or "bad magic" in msg)


def test_truncated_by_one_byte(tmp_path):
    src = write_tiny_gguf(tmp_path / "a.gguf")
    p = tmp_path / "cut.gguf"
    p.write_bytes(src.read_bytes()[:-1])
    assert "truncated" in _err(p)


def test_bad_magic(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUX" + b"\0" * 100)
    assert "bad magic" in _err(p)


def test_corrupt_length_field(tmp_path, default_model):
    p = tmp_path / "bad.gguf"
    with open(default_model, "rb") as f:
        p.write_bytes(f.read(24) + b"\xff" * 100)
    assert "corrupt header" in _err(p)


def test_missing_file(tmp_path):
    assert "no such file" in _err(tmp_path / "nope.gguf")


@pytest.mark.parametrize("arch", ["phi3", "deepseek2", "gemma"])
def test_unsupported_architecture(tmp_path, arch):
    msg = _err(write_tiny_gguf(tmp_path / "q.gguf", arch=arch))
    assert repr(arch) in msg and "not supported" in msg


@pytest.mark.parametrize("gtype", ["IQ2_XXS", "IQ3_S", "TQ2_0"])
def test_unsupported_tensor_type(tmp_path, gtype):
    over = {"blk.1.ffn_down.weight": gguf.GGMLQuantizationType[gtype]}
    msg = _err(write_tiny_gguf(tmp_path / "k.gguf", override_type=over, hidden_dim=256))
    assert f"blk.1.ffn_down.weight has type {gtype}, not supported yet" in msg


def test_foreign_tensor_refused(tmp_path):
    extra = {"blk.0.attn_q_norm.weight": np.ones(16, dtype=np.float32)}
    assert "blk.0.attn_q_norm.weight" in _err(write_tiny_gguf(tmp_path / "x.gguf", extra_tensors=extra))


def test_missing_tensor_and_wrong_shape(tmp_path):
    # n_layers says 3 but the file holds 2 layers' tensors
    p = write_tiny_gguf(tmp_path / "m.gguf")
    raw = p.read_bytes()
    ours = raw.replace(b"llama.block_count\x04\x00\x00\x00\x02\x00\x00\x00",
                       b"llama.block_count\x04\x00\x00\x00\x03\x00\x00\x00")
    assert ours != raw
    p.write_bytes(ours)
    assert "missing tensor blk.2." in _err(p)


def test_cli_info_bad_file_one_line(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + b"\xff" * 10)
    r = subprocess.run([sys.executable, "-m", "dair", "model", "info", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(p) in lines[0] and "Traceback" not in r.stderr


def test_cli_info_json(default_model, capsys):
    from dair.cli import main

    assert main(["model", "info", str(default_model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "llama" and info["n_kv_heads"] == 3 and info["head_dim"] == 64
    assert info["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert info["tokenizer"]["eos"][0] == [2, "<|im_end|>"] and info["tokenizer"]["chat_template"]
    assert info["embedding_bytes"] == 30081024 and info["head_bytes"] == 0
    assert len(info["fingerprint"]) == 64
    # the kernel column follows the build's own dispatch table, per type present
    from dair.ops.matmul import KERNELS, kernel_table

    assert info["kernels"]["families"] == list(KERNELS)
    assert info["kernels"]["by_type"] == {qt: kernel_table()[qt] for qt in ("F32", "Q4_1", "Q8_0")}
    assert info["kernels"]["by_type"]["F32"] == "float"


def test_cli_info_text(default_model, capsys):
    from dair.cli import main

    assert main(["model", "info", str(default_model)]) == 0
    out = capsys.readouterr().out
    assert "9 query / 3 KV" in out and "tied to the embedding" in out and "fingerprint" in out
    assert "kernels       on this CPU" in out and "Q4_1 " in out


def test_cli_info_says_which_kernels_are_fast(default_model):
    """Per tensor type: a SIMD kernel of the family in use (fast), or plain C where SIMD runs the
    others; a DAIR_KERNELS cap is named. Every family this CPU runs, each in its own process."""
    from dair.ops.matmul import CPU_KERNELS, KERNELS

    for cap in KERNELS:
        env = {**os.environ, "DAIR_KERNELS": cap}
        cmd = [sys.executable, "-m", "dair", "model", "info", str(default_model)]
        info = json.loads(subprocess.run([*cmd, "--json"], env=env, capture_output=True, text=True,
                                         check=True).stdout)["kernels"]
        assert info["families"][0] == cap and info["cpu_families"] == list(CPU_KERNELS)
        assert info["fast"] == {"F32": True, "Q4_1": cap != "scalar", "Q8_0": cap != "scalar"}, cap
        text = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        line = next(ln for ln in text.splitlines() if ln.startswith("kernels"))
        assert ("capped at " + cap in line) == (cap != CPU_KERNELS[0]), line
        assert ("Q4_1 plain C" in line) if cap == "scalar" else (f"Q4_1 {cap} kernel (fast)" in line), line
