"""What Ollama's /api/tags, /api/show and /api/ps say about a model, read from the model file
the server has (the bus's, by fingerprint): family, parameter count, quantization, metadata."""
from __future__ import annotations

import datetime
import os
from typing import Any

# llama.cpp's llama_ftype (GGUF `general.file_type`) by number, as Ollama names quantization levels.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
    18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
    25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
}
# Arrays longer than this (the vocabulary, merges, token types) are sent empty unless the request
# says verbose, as Ollama does.
SHORT_ARRAY = 64


def parameter_count(mf: Any) -> int:
    """general.parameter_count when the file states it, else the elements of all its tensors."""
    meta = getattr(mf, "metadata", {}) or {}
    if meta.get("general.parameter_count"):
        return int(meta["general.parameter_count"])
    total, seen = 0, set()
    for t in mf.tensors.values():
        if id(t) in seen:  # a tied output is the embedding under a second name
            continue
        seen.add(id(t))
        n = 1
        for d in t.shape:
            n *= int(d)
        total += n
    return total


def human_count(n: int) -> str:
    """Ollama's parameter_size spelling: 8.0B, 7.2B, 135M."""
    if n >= 1_000_000_000:
        return f"{n / 1e9:.1f}B"
    if n >= 1_000_000:
        return f"{n / 1e6:.0f}M"
    return f"{n / 1e3:.0f}K"


def quantization(mf: Any) -> str:
    """general.file_type's name, else the commonest tensor type of the file."""
    meta = getattr(mf, "metadata", {}) or {}
    ft = meta.get("general.file_type")
    if isinstance(ft, int) and ft in FILE_TYPES:
        return FILE_TYPES[ft]
    counts: dict[str, int] = {}
    for t in mf.tensors.values():
        counts[t.qtype] = counts.get(t.qtype, 0) + 1
    return max(counts, key=counts.get) if counts else ""  # type: ignore[arg-type]


def details(mf: Any) -> dict[str, Any]:
    """Ollama's `details` object."""
    family = str(mf.config.arch)
    return {"parent_model": "", "format": "gguf" if mf.format == "gguf" else str(mf.format), "family": family,
            "families": [family], "parameter_size": human_count(parameter_count(mf)),
            "quantization_level": quantization(mf)}


def model_info(mf: Any, verbose: bool = False) -> dict[str, Any]:
    """The file's metadata keys and values (Ollama's `model_info`); arrays longer than SHORT_ARRAY
    (the vocabulary, merges, token types) are empty unless verbose, as Ollama sends them."""
    meta = getattr(mf, "metadata", {}) or {}
    keys = mf.keys() if hasattr(mf, "keys") else list(meta)
    out: dict[str, Any] = {}
    for k in keys:
        if k.startswith("GGUF."):  # the container's own header fields, not model metadata
            continue
        if k not in meta and not verbose:  # a large array dair's reader leaves in the file
            out[k] = []
            continue
        v = meta[k] if k in meta else mf.get(k)
        if isinstance(v, (bytes, bytearray)):
            v = v.decode("utf-8", "replace")
        if isinstance(v, (list, tuple)) or hasattr(v, "tolist"):
            v = list(v.tolist() if hasattr(v, "tolist") else v)
            v = v if verbose or len(v) <= SHORT_ARRAY else []
        out[k] = v
    out.setdefault("general.architecture", str(mf.config.arch))
    out["general.parameter_count"] = parameter_count(mf)
    return out


def modified_at(mf: Any) -> str:
    """The file's modification time, RFC 3339 in UTC."""
    t = os.stat(mf.path).st_mtime
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat().replace("+00:00", "Z")
