"""GGUF model files (llama.cpp's format), parsed by the `gguf` package over a read-only map."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from dair.errors import ModelFormatError
from dair.model import arch as families
from dair.model import qtypes
from dair.model.base import ModelFile, Tensor
from dair.model.config import ModelConfig

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
_LARGE_ARRAYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                 "tokenizer.ggml.merges"}


class _Truncated(Exception):
    def __init__(self, end: int, size: int) -> None:
        super().__init__(f"truncated: data runs to byte {end} but the file has {size} bytes")


def _reader(path: Path) -> Any:
    from gguf import GGUFReader

    class Reader(GGUFReader):
        # A plain ndarray view of the memmap: the stock reader slices it ~10^6 times while
        # parsing the vocabulary, and numpy's memmap subclass hooks make that 4x slower.
        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain = value.view(np.ndarray)

        # The stock reader turns a short file into an obscure numpy reshape error; name it.
        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                if end > 1 << 40:  # no real file is that big: a length field is garbage
                    raise ModelFormatError(path,
                                           f"corrupt header: a length field points to byte {end}")
                raise _Truncated(end, len(self.data))
            return super()._get(offset, dtype, count, override_order)

    return Reader(path, "r")


def _field_value(field: Any) -> Any:
    """A GGUF metadata value as plain Python (str, int, float, bool or list)."""
    from gguf import GGUFValueType

    if field.types and field.types[0] == GGUFValueType.ARRAY:
        if len(field.types) > 1 and field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if field.types and field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]].tolist()[0]
    if field.types and field.types[0] == GGUFValueType.BOOL:
        return bool(value)
    return value


class GGUFModel(ModelFile):
    format = "gguf"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            reader = _reader(self.path)
        except _Truncated as e:
            raise ModelFormatError(self.path, str(e)) from None
        except ModelFormatError:
            raise
        except FileNotFoundError:
            raise ModelFormatError(self.path, "no such file") from None
        except Exception as e:  # the gguf package raises bare ValueError/IndexError/struct errors
            raise ModelFormatError(self.path, f"not a readable GGUF file ({_one_line(e)})") from None
        self._reader = reader
        self._map = np.asarray(reader.data)
        self._fields = reader.fields
        try:
            self.metadata = {k: _field_value(f) for k, f in reader.fields.items() if k not in _LARGE_ARRAYS}
        except Exception as e:
            raise ModelFormatError(self.path, f"unreadable metadata ({_one_line(e)})") from None
        self.arch = self._arch()
        self.tensors = self._tensor_views(reader)
        self.config = self._config()
        self._validate()
        self._header_end = min((t.offset for t in self.tensors.values()), default=len(self._map))
        self.fingerprint = self._compute_fingerprint(self._map[: self._header_end])

    # -- metadata ---------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value, including the large tokenizer arrays (decoded on demand)."""
        if key in self.metadata:
            return self.metadata[key]
        field = self._fields.get(key) if self._fields is not None else None
        if field is None:
            return default
        try:
            return _field_value(field)
        except Exception as e:
            raise ModelFormatError(self.path, f"unreadable metadata {key} ({_one_line(e)})") from None

    def _require(self, key: str) -> Any:
        if key not in self.metadata:
            raise ModelFormatError(self.path, f"missing metadata key {key}")
        return self.metadata[key]

    def _arch(self) -> str:
        arch = self._require("general.architecture")
        if arch not in families.FAMILIES:
            raise ModelFormatError(self.path, f"architecture {arch!r} is not supported (dair runs "
                                   f"{', '.join(families.FAMILIES)})")
        return str(arch)

    def _config(self) -> ModelConfig:
        a = self.arch
        dim = int(self._require(f"{a}.embedding_length"))
        n_heads = int(self._require(f"{a}.attention.head_count"))
        n_kv = int(self.metadata.get(f"{a}.attention.head_count_kv", n_heads))
        head_dim = int(self.metadata.get(f"{a}.attention.key_length", dim // max(n_heads, 1)))
        v_dim = int(self.metadata.get(f"{a}.attention.value_length", head_dim))
        if v_dim != head_dim:
            raise ModelFormatError(self.path, f"value_length {v_dim} != key_length {head_dim} is not supported")
        n_layers = int(self._require(f"{a}.block_count"))
        embd = self.tensors.get("token_embd.weight")
        if embd is None:
            raise ModelFormatError(self.path, "missing tensor token_embd.weight")
        vocab = int(self.metadata.get(f"{a}.vocab_size", embd.shape[0]))
        scaling = None
        stype = self.metadata.get(f"{a}.rope.scaling.type")
        if stype and stype != "none":
            scaling = {"type": stype, "factor": float(self.metadata.get(f"{a}.rope.scaling.factor", 1.0))}
            orig = self.metadata.get(f"{a}.rope.scaling.original_context_length")
            if orig:
                scaling["original_context_length"] = int(orig)
        if "rope_freqs.weight" in self.tensors:
            scaling = dict(scaling or {}, type="llama3", freq_factors_tensor="rope_freqs.weight")
        cfg = ModelConfig(
            arch=a,
            dim=dim,
            hidden_dim=int(self._require(f"{a}.feed_forward_length")),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            vocab_size=vocab,
            context_length=int(self.metadata.get(f"{a}.context_length", 2048)),
            rope_theta=float(self.metadata.get(f"{a}.rope.freq_base", 10000.0)),
            rope_dim=int(self.metadata.get(f"{a}.rope.dimension_count", head_dim)),
            rms_eps=float(self.metadata.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            tied_embeddings=self._tied,
            rope_scaling=scaling,
            **families.resolve(a, self.metadata, dim, n_heads, head_dim, n_layers),
        )
        if n_heads <= 0 or n_kv <= 0 or n_heads % n_kv:
            raise ModelFormatError(self.path, f"{n_heads} heads / {n_kv} KV heads is not a valid grouping")
        return cfg

    # -- tensors ----------------------------------------------------------------------------
    def _tensor_views(self, reader: Any) -> dict[str, Tensor]:
        size = len(self._map)
        tensors: dict[str, Tensor] = {}
        for rt in reader.tensors:
            name = rt.name
            type_name = getattr(rt.tensor_type, "name", str(rt.tensor_type))
            q = qtypes.QTYPES.get(type_name)
            if q is None:
                raise ModelFormatError(self.path, f"{name} has type {type_name}, not supported yet")
            m = _BLOCK_RE.match(name)
            if m:
                if m.group(2) not in families.LAYER_FIELDS:
                    raise ModelFormatError(self.path, f"unexpected tensor {name}: not a tensor dair knows "
                                           f"(architecture {self.arch!r} variant not supported)")
            elif name not in families.GLOBAL_TENSORS:
                raise ModelFormatError(self.path, f"unexpected tensor {name}: not a tensor dair knows")
            shape = tuple(int(n) for n in reversed([int(x) for x in rt.shape]))
            while len(shape) > 1 and shape[0] == 1:  # ggml pads ne with 1s; numpy order puts them first
                shape = shape[1:]
            n_values = int(np.prod(shape))
            if shape[-1] % q.block_values:
                raise ModelFormatError(self.path, f"{name}: row of {shape[-1]} values is not a whole "
                                       f"number of {type_name} blocks")
            nbytes = qtypes.tensor_nbytes(type_name, n_values)
            offset = int(rt.data_offset)
            if offset + nbytes > size:
                raise ModelFormatError(self.path, f"truncated: {name} ends at byte {offset + nbytes} "
                                       f"but the file has {size} bytes")
            raw = self._map[offset:offset + nbytes]
            tensors[name] = Tensor(name, type_name, shape, raw, offset, nbytes)
        self._tied = "output.weight" not in tensors
        if self._tied and "token_embd.weight" in tensors:
            tensors["output.weight"] = tensors["token_embd.weight"]
        return tensors

    def close(self) -> None:
        super().close()
        self._reader = None
        self._fields = None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
