"""The GGUF header (metadata and tensor table), read without materialising the big arrays.

A stage needs the hyper-parameters and the tensor table, never the vocabulary, yet in a GGUF the
tokenizer arrays sit between the two: hundreds of thousands of strings for a modern vocabulary.
The `gguf` package's reader builds numpy views for every element of every array (18.8 s and
733 MB for Gemma 3's 262k tokens). This reader walks the header once through small positioned
reads (so no page of the header is mapped into the process), steps over a string array by its
length fields and over a numeric array by its byte count, and keeps only where each big array
lies; `get()` decodes one on demand.

The format (ggml's docs/gguf.md), all integers little-endian unless the file is byte-swapped:

    magic "GGUF" | version u32 (2 or 3) | n_tensors u64 | n_kv u64
    n_kv x  (key: string, value type u32, value)
    n_tensors x  (name: string, n_dims u32, ne u64[n_dims], ggml type u32, offset u64)
    padding to general.alignment (default 32), then the tensor data; offsets are relative to it.
    string = length u64 + UTF-8 bytes; array = element type u32 + count u64 + elements.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dair.errors import ModelFormatError
from dair.ops.strings import decode_strings, skip_strings

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f",
           BOOL: "?", UINT64: "Q", INT64: "q", FLOAT64: "d"}

# ggml's tensor types by id (ggml.h; ids of removed types stay unused).
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
    35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}

# Arrays at least LAZY_MIN_ITEMS long (and those the caller names) are stepped over and decoded
# only when asked for. Every other value (hyper-parameters, token ids, the chat template, short
# per-layer arrays) is decoded at open.
LAZY_MIN_ITEMS = 1024
# A length field beyond this is garbage, not a big file.
_MAX_SANE = 1 << 40
_CHUNK = 1 << 20


@dataclass(frozen=True)
class LazyArray:
    """Where an array's elements lie in the file; decoded by GGUFHeader.get()."""

    item_type: int
    count: int
    offset: int  # file offset of the first element
    nbytes: int


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. `shape` is ggml's order (ne0 first: the row length), as
    the gguf package gives it; `data_offset` is absolute in the file."""

    name: str
    type_id: int
    shape: tuple[int, ...]
    data_offset: int

    @property
    def tensor_type(self) -> str:
        return GGML_TYPES.get(self.type_id, f"#{self.type_id}")


class _Bad(Exception):
    """A malformed header; GGUFHeader turns it into a ModelFormatError naming the file."""


class _Truncated(_Bad):
    def __init__(self, end: int, size: int) -> None:
        super().__init__(f"truncated: data runs to byte {end} but the file has {size} bytes")
        self.end = end


class _Cursor:
    """Sequential reads of the header through a window of positioned reads (os.pread)."""

    def __init__(self, fd: int, size: int, order: str) -> None:
        self.fd, self.size, self.order = fd, size, order
        self.buf, self.base, self.pos = b"", 0, 0
        self.u32 = struct.Struct(order + "I")
        self.u64 = struct.Struct(order + "Q")

    def _check(self, end: int) -> None:
        if end > self.size:
            if end > _MAX_SANE:
                raise _Bad(f"corrupt header: a length field points to byte {end}")
            raise _Truncated(end, self.size)

    def _fill(self, n: int) -> None:
        self._check(self.pos + n)
        self.buf = os.pread(self.fd, max(n, _CHUNK), self.pos)
        self.base = self.pos
        if len(self.buf) < n:  # the file shrank under us
            raise _Truncated(self.pos + n, self.pos + len(self.buf))

    def take(self, n: int) -> bytes:
        rel = self.pos - self.base
        if rel < 0 or rel + n > len(self.buf):
            self._fill(n)
            rel = 0
        self.pos += n
        return self.buf[rel:rel + n]

    def unpack(self, st: struct.Struct) -> Any:
        return st.unpack(self.take(st.size))[0]

    def string(self) -> str:
        n = self.unpack(self.u64)
        self._check(self.pos + n)
        return self.take(n).decode("utf-8", errors="replace")

    def skip(self, n: int) -> None:
        self._check(self.pos + n)
        self.pos += n

    def skip_strings(self, count: int) -> None:
        """Step over `count` strings by their length fields, decoding none of them (in C: a
        Python loop over a 262k vocabulary costs a tenth of a second)."""
        big = self.order == ">"
        while count:
            if self.pos - self.base < 0 or self.pos - self.base + 8 > len(self.buf):
                self._fill(8)
            try:
                done, p = skip_strings(self.buf, self.pos - self.base, count, big)
            except ValueError as e:
                raise _Bad(str(e)) from None
            count -= done
            self.pos = self.base + p
        self._check(self.pos)


class GGUFHeader:
    """A GGUF file's metadata and tensor table.

    `values` holds every metadata key, in file order, as plain Python (str, int, float, bool,
    list), including the gguf package's pseudo-keys GGUF.version, GGUF.tensor_count and
    GGUF.kv_count, except the arrays named in `lazy_keys` and any array of LAZY_MIN_ITEMS or more,
    which are in `lazy` and come out of `get()`. `decoded` names the lazy arrays decoded so far: what a stage never should.
    """

    format = "gguf"  # what dair.tokenizer.load_tokenizer asks of a model file

    def __init__(self, path: str | Path, lazy_keys: Collection[str] = ()) -> None:
        self.path = Path(path)
        self.lazy_keys = frozenset(lazy_keys)
        self.values: dict[str, Any] = {}
        self.lazy: dict[str, LazyArray] = {}
        self._order: list[str] = []  # every key, in file order
        self.tensors: list[TensorInfo] = []
        self.decoded: set[str] = set()
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise ModelFormatError(self.path, "no such file") from None
        except IsADirectoryError:
            raise ModelFormatError(self.path, "is a directory, not a model file") from None
        except OSError as e:
            raise ModelFormatError(self.path, f"cannot read ({e.strerror})") from None
        try:
            self.file_size = os.fstat(fd).st_size
            self._parse(fd)
        except _Bad as e:
            raise ModelFormatError(self.path, str(e)) from None
        finally:
            os.close(fd)

    # -- parsing ----------------------------------------------------------------------------
    def _parse(self, fd: int) -> None:
        head = os.pread(fd, 24, 0)
        if len(head) < 4 or head[:4] != GGUF_MAGIC:
            raise _Bad(f"bad magic {head[:4]!r}: not a GGUF file")
        if len(head) < 24:
            raise _Truncated(24, self.file_size)
        order = "<"
        version = struct.unpack_from("<I", head, 4)[0]
        if version & 0xFFFF == 0:  # written on a big-endian machine (the gguf package's test)
            order = ">"
            version = struct.unpack_from(">I", head, 4)[0]
        if version not in SUPPORTED_VERSIONS:
            raise _Bad(f"GGUF version {version} is not supported (only 2 and 3)")
        self.version, self.byte_order = version, order
        n_tensors, n_kv = struct.unpack_from(order + "QQ", head, 8)
        cur = _Cursor(fd, self.file_size, order)
        cur.pos = 24
        self.values.update({"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv})
        self._order += list(self.values)
        for _ in range(n_kv):
            key = cur.string()
            if key in self.values or key in self.lazy:
                raise _Bad(f"duplicate metadata key {key}")
            self._order.append(key)
            vtype = cur.unpack(cur.u32)
            if vtype == ARRAY:
                item_type, count = cur.unpack(cur.u32), cur.unpack(cur.u64)
                if (count >= LAZY_MIN_ITEMS or key in self.lazy_keys) and item_type in (STRING, *_SCALAR):
                    start = cur.pos
                    self._skip_array(cur, item_type, count)
                    self.lazy[key] = LazyArray(item_type, count, start, cur.pos - start)
                    continue
                self.values[key] = self._array(cur, item_type, count)
            else:
                self.values[key] = self._value(cur, vtype)
        names: set[str] = set()
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack(cur.u32)
            if n_dims > 8:
                raise _Bad(f"tensor {name} has {n_dims} dimensions: corrupt tensor table")
            dims = struct.unpack(order + "Q" * n_dims, cur.take(8 * n_dims))
            type_id, rel = cur.unpack(cur.u32), cur.unpack(cur.u64)
            if name in names:
                raise _Bad(f"duplicate tensor {name}")
            names.add(name)
            infos.append((name, type_id, dims, rel))
        align = self.values.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
            raise _Bad(f"general.alignment {align!r} is not a power of two")
        self.alignment = align
        self.tensor_table_end = cur.pos
        self.data_offset = -(-cur.pos // align) * align
        self.tensors = [TensorInfo(n, t, tuple(int(d) for d in dims), self.data_offset + rel)
                        for n, t, dims, rel in infos]

    def _value(self, cur: _Cursor, vtype: int) -> Any:
        if vtype == STRING:
            return cur.string()
        if vtype == ARRAY:
            item_type, count = cur.unpack(cur.u32), cur.unpack(cur.u64)
            return self._array(cur, item_type, count)
        fmt = _SCALAR.get(vtype)
        if fmt is None:
            raise _Bad(f"unknown metadata value type {vtype}")
        return struct.unpack(cur.order + fmt, cur.take(struct.calcsize(fmt)))[0]

    def _array(self, cur: _Cursor, item_type: int, count: int) -> list[Any]:
        fmt = _SCALAR.get(item_type)
        if fmt is not None:
            size = struct.calcsize(fmt)
            cur._check(cur.pos + size * count)
            return list(struct.unpack(cur.order + fmt * count, cur.take(size * count)))
        return [self._value(cur, item_type) for _ in range(count)]

    @staticmethod
    def _skip_array(cur: _Cursor, item_type: int, count: int) -> None:
        if item_type == STRING:
            cur.skip_strings(count)
        else:
            cur.skip(struct.calcsize(_SCALAR[item_type]) * count)

    # -- access -----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Every metadata key, lazy or not, in file order."""
        return list(self._order)

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value; a lazy array is read from the file and decoded now (not kept)."""
        if key in self.values:
            return self.values[key]
        span = self.lazy.get(key)
        if span is None:
            return default
        self.decoded.add(key)
        return self.read_array(span)

    def read_array(self, span: LazyArray) -> list[Any]:
        raw = self.read_bytes(span.offset, span.nbytes)
        if span.item_type != STRING:
            dtype = np.dtype(self.byte_order + _SCALAR[span.item_type])
            return np.frombuffer(raw, dtype, span.count).tolist()
        try:
            return decode_strings(raw, span.count, self.byte_order == ">")
        except ValueError as e:  # the file changed under us since the header was walked
            raise ModelFormatError(self.path, str(e)) from None

    def read_bytes(self, offset: int, n: int) -> bytes:
        """Bytes of the file by a positioned read: nothing of the file gets mapped."""
        with open(self.path, "rb", buffering=0) as f:
            raw = os.pread(f.fileno(), n, offset)
        if len(raw) != n:
            raise ModelFormatError(self.path, f"truncated: data runs to byte {offset + n} but the file "
                                   f"has {offset + len(raw)} bytes")
        return raw
