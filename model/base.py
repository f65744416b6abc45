"""What both model formats share: typed tensor views over a read-only map, and per-layer access."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dair.errors import ModelFormatError
from dair.model import qtypes
from dair.model.arch import LAYER_TENSORS, layer_fields
from dair.model.config import ModelConfig

# The llama block's tensors by GGUF short name (the distributed-llama format has exactly these).
LAYER_NAMES = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
               "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True, eq=False)
class Tensor:
    """One weight: `raw` is a zero-copy uint8 view of its bytes in the read-only file map.

    `shape` is numpy order: (rows, cols) with rows = output features for matrices, (n,) for
    vectors (norm weights).
    """

    name: str
    qtype: str
    shape: tuple[int, ...]
    raw: np.ndarray
    offset: int
    nbytes: int

    def dequantize(self) -> np.ndarray:
        return qtypes.dequantize(self.qtype, self.raw, self.shape)

    @property
    def n_values(self) -> int:
        return int(np.prod(self.shape))


class ModelFile:
    """A model file (GGUF or distributed-llama .m) seen through one interface."""

    path: Path
    format: str
    config: ModelConfig
    fingerprint: str
    tensors: dict[str, Tensor]
    metadata: dict[str, Any]
    _map: np.ndarray | None

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self.config
        return f"<ModelFile {self.format} {self.path} {c.arch} {c.n_layers} layers dim {c.dim}>"

    # -- per-layer access -------------------------------------------------------------------
    def _check_layer(self, i: int) -> None:
        if not 0 <= i < self.config.n_layers:
            raise IndexError(f"layer {i} out of range 0..{self.config.n_layers - 1}")

    def layer_tensors(self, i: int) -> dict[str, Tensor]:
        """Layer i's tensors by LayerWeights field (dair.model.arch.LAYER_TENSORS), those present."""
        self._check_layer(i)
        p = f"blk.{i}."
        return {f: self.tensors[p + name] for f, name in LAYER_TENSORS.items() if p + name in self.tensors}

    def layer_byte_range(self, i: int) -> tuple[int, int]:
        """(start, end) file offsets spanning all of layer i's tensors."""
        ts = [t for name, t in self.tensors.items() if name.startswith(f"blk.{i}.")]
        self._check_layer(i)
        return min(t.offset for t in ts), max(t.offset + t.nbytes for t in ts)

    @property
    def embedding(self) -> Tensor:
        return self.tensors["token_embd.weight"]

    @property
    def output_norm(self) -> Tensor:
        return self.tensors["output_norm.weight"]

    @property
    def output(self) -> Tensor:
        return self.tensors["output.weight"]

    def close(self) -> None:
        # Views handed out keep the map alive on their own; we only drop our references.
        self.tensors = {}
        self._map = None

    # -- shared checks ----------------------------------------------------------------------
    def _validate(self) -> None:
        """Every tensor the family's forward pass needs, with the shapes the config implies, and
        no layer tensor it would ignore."""
        c = self.config
        q_rows, kv_rows, hd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.head_dim
        e, eff = c.n_experts, c.expert_hidden_dim
        shapes: dict[str, tuple[int, ...]] = {
            "attn_norm": (c.dim,), "ffn_norm": (c.dim,), "attn_post_norm": (c.dim,), "ffn_post_norm": (c.dim,),
            "wq": (q_rows, c.dim), "wk": (kv_rows, c.dim), "wv": (kv_rows, c.dim), "wo": (c.dim, q_rows),
            "bq": (q_rows,), "bk": (kv_rows,), "bv": (kv_rows,), "q_norm": (hd,), "k_norm": (hd,),
            "w_gate": (c.hidden_dim, c.dim), "w_up": (c.hidden_dim, c.dim), "w_down": (c.dim, c.hidden_dim),
            "router": (e, c.dim), "gate_exps": (e, eff, c.dim), "up_exps": (e, eff, c.dim),
            "down_exps": (e, c.dim, eff),
        }
        want: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (c.vocab_size, c.dim),
            "output_norm.weight": (c.dim,),
            "output.weight": (c.vocab_size, c.dim),
        }
        fields = layer_fields(c)
        for i in range(c.n_layers):
            want.update({f"blk.{i}.{LAYER_TENSORS[f]}": shapes[f] for f in fields})
        for name, shape in want.items():
            t = self.tensors.get(name)
            if t is None:
                raise ModelFormatError(self.path, f"missing tensor {name} (architecture {c.arch!r}"
                                       f"{', mixture of experts' if c.n_experts else ''})")
            if tuple(t.shape) != shape:
                raise ModelFormatError(self.path, f"{name} has shape {tuple(t.shape)}, expected {shape}")
        for name in self.tensors:
            if name.startswith("blk.") and name not in want:
                raise ModelFormatError(self.path, f"unexpected tensor {name}: architecture {c.arch!r} as dair "
                                       "runs it has no such tensor")

    def _compute_fingerprint(self, header: np.ndarray) -> str:
        """sha256 of the header bytes and the tensor table: the file's identity for quick checks.

        It reads no tensor data, so opening a model touches no weight page. The weights
        themselves are compared by per-tensor digests of every byte (model/digests.py) before
        the bus admits a stage's range.
        """
        h = hashlib.sha256()
        h.update(self.format.encode())
        h.update(np.ascontiguousarray(header).tobytes())
        for t in sorted(self.tensors.values(), key=lambda t: t.offset):
            h.update(f"{t.name}|{t.qtype}|{t.shape}|{t.offset}|{t.nbytes};".encode())
        return h.hexdigest()


def read_only_map(path: Path) -> np.ndarray:
    return np.memmap(path, dtype=np.uint8, mode="r")
