"""GGUF model files (llama.cpp's format): the header read by dair.model.gguf_header, tensors over a
read-only map."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from dair.errors import ModelFormatError
from dair.model import arch as families
from dair.model import qtypes
from dair.model.base import ModelFile, Tensor
from dair.model.config import ROPE_SCALING_TYPES, ModelConfig
from dair.model.gguf_header import GGUFHeader

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
_LARGE_ARRAYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                 "tokenizer.ggml.merges"}


class GGUFModel(ModelFile):
    format = "gguf"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        reader = GGUFHeader(self.path, lazy_keys=_LARGE_ARRAYS)
        self._header = reader
        self.metadata = dict(reader.values)  # the big tokenizer arrays stay in the file: see get()
        self.arch = self._arch()
        # A plain ndarray view: numpy's memmap subclass makes every slice slower.
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r").view(np.ndarray)
        self.tensors = self._tensor_views(reader)
        self.config = self._config()
        self._validate()
        self._header_end = min((t.offset for t in self.tensors.values()), default=len(self._map))
        # Hashed from a positioned read, not the map: the header's pages (the vocabulary) are
        # never mapped into a stage.
        header = np.frombuffer(reader.read_bytes(0, self._header_end), np.uint8)
        self.fingerprint = self._compute_fingerprint(header)

    # -- metadata ---------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value, including the large tokenizer arrays (read and decoded on demand,
        not kept: only the tokenizer asks for them, once)."""
        if key in self.metadata:
            return self.metadata[key]
        if self._header is None:
            return default
        return self._header.get(key, default)

    def keys(self) -> list[str]:
        """Every metadata key, the large tokenizer arrays' included, in file order."""
        return self._header.keys() if self._header is not None else list(self.metadata)

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
        scaling = self._rope_scaling(a, head_dim)
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

    def _rope_scaling(self, a: str, head_dim: int) -> dict[str, Any] | None:
        """rope.scaling.* as llama.cpp reads it: a factor with no type is linear (the old
        rope.scale_linear key too); llama3 files carry their factors as rope_freqs.weight."""
        md = self.metadata
        factor = float(md.get(f"{a}.rope.scaling.factor", md.get(f"{a}.rope.scale_linear", 0.0)) or 1.0)
        stype = str(md.get(f"{a}.rope.scaling.type", "linear" if factor != 1.0 else "none"))
        if stype not in ROPE_SCALING_TYPES:
            raise ModelFormatError(self.path, f"rope scaling type {stype!r} is not supported (dair runs "
                                   f"{', '.join(ROPE_SCALING_TYPES)})")
        if factor <= 0:
            raise ModelFormatError(self.path, f"rope.scaling.factor {factor} is not a positive number")
        scaling: dict[str, Any] = {"type": stype, "factor": 1.0 if stype == "none" else factor}
        attn = md.get(f"{a}.rope.scaling.attn_factor")
        if attn is not None:
            scaling["attn_factor"] = float(attn)
        if stype == "yarn":
            if float(md.get(f"{a}.rope.scaling.yarn_log_multiplier", 0.0)):
                # DeepSeek's MLA temperature rule; no family dair runs uses it.
                raise ModelFormatError(self.path, "rope.scaling.yarn_log_multiplier (DeepSeek-style YaRN) "
                                       "is not supported")
            orig = md.get(f"{a}.rope.scaling.original_context_length") or md.get(f"{a}.context_length", 2048)
            scaling["original_context_length"] = int(orig)
            for key, name in (("yarn_ext_factor", "ext_factor"), ("yarn_beta_fast", "beta_fast"),
                              ("yarn_beta_slow", "beta_slow")):
                if f"{a}.rope.scaling.{key}" in md:
                    scaling[name] = float(md[f"{a}.rope.scaling.{key}"])
        ff = self.tensors.get("rope_freqs.weight")
        if ff is not None:
            want = int(md.get(f"{a}.rope.dimension_count", head_dim)) // 2
            if ff.n_values != want:
                raise ModelFormatError(self.path, f"rope_freqs.weight has {ff.n_values} values, the rope "
                                       f"needs {want} (one per rotated pair)")
            scaling["freq_factors_tensor"] = "rope_freqs.weight"
        if stype == "none" and "attn_factor" not in scaling and ff is None:
            return None
        return scaling

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
        self._header = None

