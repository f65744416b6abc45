"""Model files: GGUF and distributed-llama `.m`, one read-only zero-copy interface.

`open_model(path)` picks the reader by the file's magic bytes.
"""
from __future__ import annotations

import struct
from pathlib import Path

from dair.errors import ModelFormatError
from dair.model.base import LAYER_NAMES, ModelFile, Tensor
from dair.model.config import ModelConfig

GGUF_MAGIC = b"GGUF"
DLLAMA_MAGIC = 0x0A00ABCD

__all__ = ["open_model", "ModelFile", "ModelConfig", "Tensor", "LAYER_NAMES", "ModelFormatError"]


def open_model(path: str | Path) -> ModelFile:
    """Open a GGUF or distributed-llama `.m` file; ModelFormatError (one line) if it is neither."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise ModelFormatError(path, "no such file") from None
    except IsADirectoryError:
        raise ModelFormatError(path, "is a directory, not a model file") from None
    except OSError as e:
        raise ModelFormatError(path, f"cannot read ({e.strerror})") from None
    if head == GGUF_MAGIC:
        from dair.model.gguf_file import GGUFModel

        return GGUFModel(path)
    if len(head) == 4 and struct.unpack("<i", head)[0] == DLLAMA_MAGIC:
        from dair.model.dllama_file import DllamaModel

        return DllamaModel(path)
    if not head:
        raise ModelFormatError(path, "empty file, not a model")
    raise ModelFormatError(path, f"bad magic {head!r}: neither GGUF nor a distributed-llama .m file")
