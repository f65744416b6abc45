"""Small synthetic model files for tests: real GGUF layout, random weights, any tensor type."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dair.model import qtypes

LAYER_SHAPES = {
    "attn_q": lambda c: (c["n_heads"] * c["head_dim"], c["dim"]),
    "attn_k": lambda c: (c["n_kv_heads"] * c["head_dim"], c["dim"]),
    "attn_v": lambda c: (c["n_kv_heads"] * c["head_dim"], c["dim"]),
    "attn_output": lambda c: (c["dim"], c["n_heads"] * c["head_dim"]),
    "ffn_gate": lambda c: (c["hidden_dim"], c["dim"]),
    "ffn_up": lambda c: (c["hidden_dim"], c["dim"]),
    "ffn_down": lambda c: (c["dim"], c["hidden_dim"]),
}

TINY = dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=96)


def write_tiny_gguf(path: Path, arch: str = "llama", qtype: str = "Q8_0", tied: bool = False,
                    override_type: dict[str, object] | None = None, seed: int = 0,
                    tokenizer: dict | None = None, extra_tensors: dict[str, np.ndarray] | None = None,
                    **cfg_over: int) -> Path:
    """A llama-shaped GGUF; `override_type` maps a tensor name to a GGMLQuantizationType to
    store random bytes of that (possibly unsupported) type."""
    import gguf

    c = dict(TINY, **cfg_over)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c["n_layers"])
    w.add_context_length(256)
    w.add_embedding_length(c["dim"])
    w.add_feed_forward_length(c["hidden_dim"])
    w.add_head_count(c["n_heads"])
    w.add_head_count_kv(c["n_kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(c["head_dim"])
    w.add_vocab_size(c["vocab_size"])
    if tokenizer:
        w.add_tokenizer_model(tokenizer.get("model", "gpt2"))
        w.add_token_list(tokenizer["tokens"])
        if "token_type" in tokenizer:
            w.add_token_types(tokenizer["token_type"])
        if "scores" in tokenizer:
            w.add_token_scores(tokenizer["scores"])
        if "merges" in tokenizer:
            w.add_token_merges(tokenizer["merges"])
        for key in ("bos", "eos"):
            if key in tokenizer:
                getattr(w, f"add_{key}_token_id")(tokenizer[key])
        if "add_bos" in tokenizer:
            w.add_add_bos_token(tokenizer["add_bos"])
        if "chat_template" in tokenizer:
            w.add_chat_template(tokenizer["chat_template"])
        if "pre" in tokenizer:
            w.add_tokenizer_pre(tokenizer["pre"])

    def put(name: str, shape: tuple[int, ...], qt: str) -> None:
        if override_type and name in override_type:
            gt = override_type[name]
            bs, ts = gguf.GGML_QUANT_SIZES[gt]
            raw = rng.integers(0, 256, size=(shape[0] if len(shape) > 1 else 1,
                                             shape[-1] // bs * ts), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=gt)
            return
        x = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if qt == "F32":
            w.add_tensor(name, x)
        elif qt == "F16":
            w.add_tensor(name, x.astype(np.float16))
        else:
            raw = qtypes.quantize(qt, x).reshape(shape[0], -1)
            w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[qt])

    put("token_embd.weight", (c["vocab_size"], c["dim"]), qtype)
    for i in range(c["n_layers"]):
        put(f"blk.{i}.attn_norm.weight", (c["dim"],), "F32")
        for short, fn in LAYER_SHAPES.items():
            put(f"blk.{i}.{short}.weight", fn(c), qtype)
        put(f"blk.{i}.ffn_norm.weight", (c["dim"],), "F32")
    put("output_norm.weight", (c["dim"],), "F32")
    if not tied:
        put("output.weight", (c["vocab_size"], c["dim"]), qtype)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
