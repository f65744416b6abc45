"""What both model formats share: typed tensor views over a read-only map, and per-layer access."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dair.errors import ModelFormatError
from dair.model import qtypes
from dair.model.config import ModelConfig

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
        self._check_layer(i)
        return {short: self.tensors[f"blk.{i}.{short}.weight"] for short in LAYER_NAMES}

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
        """Every tensor the llama forward pass needs, with the shapes the config implies."""
        c = self.config
        q_rows, kv_rows = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        want: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (c.vocab_size, c.dim),
            "output_norm.weight": (c.dim,),
            "output.weight": (c.vocab_size, c.dim),
        }
        for i in range(c.n_layers):
            want.update({
                f"blk.{i}.attn_norm.weight": (c.dim,),
                f"blk.{i}.attn_q.weight": (q_rows, c.dim),
                f"blk.{i}.attn_k.weight": (kv_rows, c.dim),
                f"blk.{i}.attn_v.weight": (kv_rows, c.dim),
                f"blk.{i}.attn_output.weight": (c.dim, q_rows),
                f"blk.{i}.ffn_norm.weight": (c.dim,),
                f"blk.{i}.ffn_gate.weight": (c.hidden_dim, c.dim),
                f"blk.{i}.ffn_up.weight": (c.hidden_dim, c.dim),
                f"blk.{i}.ffn_down.weight": (c.dim, c.hidden_dim),
            })
        for name, shape in want.items():
            t = self.tensors.get(name)
            if t is None:
                raise ModelFormatError(self.path, f"missing tensor {name}")
            if tuple(t.shape) != shape:
                raise ModelFormatError(self.path, f"{name} has shape {tuple(t.shape)}, expected {shape}")

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
