"""dair's GGUF header reader against the gguf package, and opening without reading the vocabulary.

The gguf package's GGUFReader is the independent reference: on every GGUF the tests have, the
header reader must give the same metadata (values and Python types) and the same tensor table
(name, type, shape, absolute offset). A stage-style open, in a fresh process, must decode no
tokenizer array and map no page of the header.
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from support.tiny_models import write_tiny_gguf

from dair.errors import ModelFormatError
from dair.model import open_model
from dair.model.gguf_file import _LARGE_ARRAYS as TOKENIZER_ARRAYS
from dair.model.gguf_header import GGML_TYPES, GGUFHeader
from dair.model.synth import write_synth

DATA = Path(__file__).parent.parent / "data"

# Every kind of value GGUF has, with what was written as the truth to compare against.
ALL_VALUES = {
    "test.u8": (255, "uint8"), "test.i8": (-128, "int8"), "test.u16": (65535, "uint16"),
    "test.i16": (-32768, "int16"), "test.u32": (4_000_000_000, "uint32"), "test.i32": (-2_000_000_000, "int32"),
    "test.u64": (2**63 + 5, "uint64"), "test.i64": (-(2**62), "int64"), "test.f32": (0.1, "float32"),
    "test.f64": (0.1, "float64"), "test.true": (True, "bool"), "test.false": (False, "bool"),
    "test.str": ("héllo ▁wörld 日本 \U0001f600", "string"),
    "test.ints": ([1, -2, 3], "array"), "test.floats": ([0.5, -1.25], "array"),
    "test.bools": ([True, False, True], "array"), "test.strs": (["a", "", "▁b", "日本"], "array"),
    # big arrays outside the tokenizer: stepped over at open, decoded by get()
    "test.big_floats": ([i * 0.25 for i in range(3000)], "array"),
    "test.big_strs": ([f"s{i}" * (i % 7) for i in range(2000)], "array"),
}


def _write_all_values(path: Path, big_endian: bool) -> Path:
    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    w.add_custom_alignment(64)
    w.add_key_value("test.empty_str", "", gguf.GGUFValueType.STRING)  # add_string skips ""
    for key, (value, kind) in ALL_VALUES.items():
        if kind == "array":
            w.add_array(key, value)
        else:
            getattr(w, f"add_{kind}")(key, value)
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal(7).astype(np.float16))
    w.add_tensor("c.weight", rng.standard_normal((2, 3, 32)).astype(np.float32))
    raw = rng.integers(0, 256, size=(4, 18 * 2), dtype=np.uint8)
    w.add_tensor("d.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


FILES = {
    "tiny-q8_0": lambda p: write_tiny_gguf(p),
    "tiny-q4_0-tied": lambda p: write_tiny_gguf(p, qtype="Q4_0", tied=True),
    "tiny-f16-spm": lambda p: write_tiny_gguf(p, qtype="F16", tokenizer={
        "model": "llama", "tokens": ["<unk>", "<s>", "</s>", *[f"▁t{i}" for i in range(93)]],
        "token_type": [2, 3, 3] + [1] * 93, "scores": [-float(i) for i in range(96)], "bos": 1, "eos": 2,
        "add_bos": True, "chat_template": "{{ messages }}"}),
    "synth-tiny": lambda p: write_synth(p, "tiny", "q4_0", n_layers=2),
    "synth-tiny-q8_0": lambda p: write_synth(p, "tiny", "q8_0", n_layers=1),
    "all-values-le": lambda p: _write_all_values(p, big_endian=False),
    "all-values-be": lambda p: _write_all_values(p, big_endian=True),
}


def _files() -> list:
    out = [pytest.param("default", id="default-model")]
    out += [pytest.param(name, id=name) for name in FILES]
    out += [pytest.param(str(p), id=p.name) for p in sorted(DATA.glob("*.gguf"))]
    return out


@pytest.fixture
def gguf_path(request, tmp_path, default_model) -> Path:
    name = request.param
    if name == "default":
        return Path(default_model)
    if name in FILES:
        return FILES[name](tmp_path / f"{name}.gguf")
    return Path(name)


def _strict_equal(a, b) -> bool:
    """Equal values of the same Python types, lists element by element."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_strict_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@functools.lru_cache(maxsize=16)  # the gguf package takes seconds over the default model's vocabulary
def _reference(path: Path) -> tuple[dict, list, int]:
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items()}
    table = [(t.name, t.tensor_type.name, tuple(int(n) for n in t.shape), int(t.data_offset)) for t in r.tensors]
    return meta, table, int(r.data_offset)


@pytest.mark.parametrize("gguf_path", _files(), indirect=True)
def test_header_matches_gguf_package(gguf_path):
    ref_meta, ref_table, ref_data = _reference(gguf_path)
    h = GGUFHeader(gguf_path, lazy_keys=TOKENIZER_ARRAYS)
    assert h.decoded == set()
    assert h.keys() == list(ref_meta), "keys differ or come in another order"
    bad = [k for k, v in ref_meta.items() if not _strict_equal(h.get(k), v)]
    assert not bad, f"values differ from the gguf package's: {bad}"
    table = [(t.name, t.tensor_type, t.shape, t.data_offset) for t in h.tensors]
    assert table == ref_table
    assert h.data_offset == ref_data
    # what opening leaves in the file: the tokenizer arrays always, other arrays when big
    assert TOKENIZER_ARRAYS & set(ref_meta) <= set(h.lazy)
    assert h.decoded == set(h.lazy)


@pytest.mark.parametrize("big_endian", [False, True], ids=["le", "be"])
def test_all_values_as_written(tmp_path, big_endian):
    """Against what the writer was given (the gguf package reads the same file above)."""
    h = GGUFHeader(_write_all_values(tmp_path / "v.gguf", big_endian))
    assert h.byte_order == (">" if big_endian else "<") and h.alignment == 64 and h.data_offset % 64 == 0
    assert h.get("test.empty_str") == ""
    for key, (value, kind) in ALL_VALUES.items():
        got = h.get(key)
        if kind in ("float32",):
            assert got == pytest.approx(value, rel=1e-7)
        else:
            assert got == value, key
    assert {"test.big_floats", "test.big_strs"} <= set(h.lazy) and "test.strs" in h.values
    shapes = {t.name: (t.tensor_type, t.shape) for t in h.tensors}
    assert shapes == {"a.weight": ("F32", (5, 3)), "b.weight": ("F16", (7,)), "c.weight": ("F32", (32, 3, 2)),
                      "d.weight": ("Q4_0", (64, 4))}


def test_model_metadata_interface_unchanged(default_model):
    """GGUFModel.metadata: every key of the file but the tokenizer arrays, plain values (what
    dair.model.config consumes); the arrays through get(), as the gguf package reads them."""
    ref_meta, _, _ = _reference(Path(default_model))
    mf = open_model(default_model)
    assert set(mf.metadata) == set(ref_meta) - TOKENIZER_ARRAYS
    assert all(_strict_equal(mf.metadata[k], ref_meta[k]) for k in mf.metadata)
    assert mf._header.decoded == set()
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        assert _strict_equal(mf.get(key), ref_meta[key]), key
    assert mf.get("no.such.key", 7) == 7


def test_type_table_matches_gguf_package():
    assert {t.value: t.name for t in gguf.GGMLQuantizationType}.items() <= GGML_TYPES.items()


def test_bad_headers_are_one_line_errors(tmp_path, default_model):
    src = Path(default_model).read_bytes()[:200_000]
    cases = {
        "version": src[:4] + (7).to_bytes(4, "little") + src[8:],
        "value type": None,
    }
    # an unknown value type for the first key: after magic, version, counts, key string
    n = int.from_bytes(src[24:32], "little")
    vt = 32 + n
    cases["value type"] = src[:vt] + (99).to_bytes(4, "little") + src[vt + 4:]
    expect = {"version": "GGUF version 7 is not supported", "value type": "unknown metadata value type 99"}
    for name, raw in cases.items():
        p = tmp_path / f"{name.replace(' ', '_')}.gguf"
        p.write_bytes(raw)
        with pytest.raises(ModelFormatError) as ei:
            GGUFHeader(p)
        msg = str(ei.value)
        assert "\n" not in msg and str(p) in msg and expect[name] in msg


# -- a stage-style open reads no vocabulary ----------------------------------------------------

STAGE_OPEN = r"""
import json, sys
import numpy as np
from dair.model import open_model

PAGE = 4096
def present(addr, n):
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        e = np.frombuffer(f.read(n * 8), dtype=np.uint64)
    return (e >> np.uint64(63)).astype(bool)

mf = open_model(sys.argv[1])
c = mf.config                                    # what a stage needs: hyper-parameters,
lt = [mf.layer_tensors(i) for i in range(c.n_layers)]  # its layers' tensor views, the fingerprint
fp = mf.fingerprint
h = mf._header
base = mf._map.__array_interface__["data"][0]
# The header's pages, less what the kernel may map around a fault in the first tensor's bytes:
# the page cache's large folios reach 2 MB (PMD size), fault-around 64 KB beyond.
end = max(0, (h.data_offset - (2 << 20) - (64 << 10)) // PAGE)
def header_pages():
    return int(present(base, end).sum())
out = {"decoded": sorted(h.decoded), "lazy": sorted(h.lazy), "header_pages": end,
       "mapped_after_open": header_pages(),
       "modules": [m for m in ("gguf", "tokenizers", "jinja2", "dair.tokenizer") if m in sys.modules]}
from dair.tokenizer import load_tokenizer
tok = load_tokenizer(mf)
out["decoded_by_tokenizer"] = sorted(h.decoded)
out["mapped_after_tokenizer"] = header_pages()
out["hello"] = tok.encode("Hello, world!")
print(json.dumps(out))
"""


def _stage_open(path) -> dict:
    r = subprocess.run([sys.executable, "-c", STAGE_OPEN, str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_stage_open_decodes_no_vocabulary(default_model):
    out = _stage_open(default_model)
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"} <= set(out["lazy"])
    assert out["decoded"] == [], "opening the model decoded tokenizer arrays"
    assert out["modules"] == [], f"opening the model imported {out['modules']}"
    # ...and the tokenizer, where text is handled, reads them
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges"} <= set(out["decoded_by_tokenizer"])
    assert out["hello"] == [19556, 28, 905, 17]  # llama.cpp's ids (tests/data tokenize.json)


def test_stage_open_maps_no_page_of_the_vocabulary(tmp_path):
    """A 262k vocabulary puts 7 MB of header before the weights: none of its pages may be mapped
    into the process by opening the model, nor by loading the tokenizer (positioned reads)."""
    path = write_synth(tmp_path / "v262k.gguf", "tiny-v262k", "q4_0", n_layers=1)
    out = _stage_open(path)
    assert out["header_pages"] > 500
    assert out["decoded"] == []
    assert out["mapped_after_open"] == 0, "opening the model mapped pages of its header (the vocabulary)"
    assert out["mapped_after_tokenizer"] == 0
