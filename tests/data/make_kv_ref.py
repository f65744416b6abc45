"""Recreate SmolLM2-135M-Instruct.Q4_1.kv2000.ref.json: llama.cpp's logits over 2,000
teacher-forced tokens with an f16 and with a Q8_0 KV cache (-ctk/-ctv q8_0).

Run with llama-cpp-python installed (not a dair dependency):
    python tests/data/make_kv_ref.py MODEL.gguf > tests/data/SmolLM2-135M-Instruct.Q4_1.kv2000.ref.json

The text is tokenized by llama.cpp. Per position: the five highest logits of llama.cpp's default
run (f16 cache, no flash attention) and, at those tokens, the logits of its flash-attention run
with the f16 cache and with the Q8_0 cache (a quantized V cache needs flash attention there).
"""
import json
import sys

import numpy as np
from llama_cpp import Llama

N = 2000
TEXT = ("Long documents are pasted into chats: a contract, a paper, a log file. The model must keep "
        "every earlier token in its cache and attend to all of them for each new one. ")
F16, Q8_0 = 1, 8  # ggml type ids


def logits(path: str, ids: list[int], kv: int, flash: bool) -> np.ndarray:
    llm = Llama(model_path=path, n_ctx=2048, n_batch=256, n_ubatch=256, logits_all=True, verbose=False,
                type_k=kv, type_v=kv, flash_attn=flash, n_threads=2)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], np.float32)


path = sys.argv[1]
tok = Llama(model_path=path, n_ctx=64, vocab_only=True, verbose=False)
ids: list[int] = []
while len(ids) < N:
    ids += tok.tokenize(TEXT.encode(), add_bos=False, special=True)
ids = ids[:N]
base = logits(path, ids, F16, False)
top = np.argsort(-base, axis=1)[:, :5]


def at_top(x: np.ndarray) -> list[list[float]]:
    return np.round(np.take_along_axis(x, top, 1), 4).tolist()


json.dump({"n": N, "text": TEXT, "ids": ids, "top5_ids": top.tolist(), "f16": at_top(base),
           "f16_flash": at_top(logits(path, ids, F16, True)), "q8_0_flash": at_top(logits(path, ids, Q8_0, True))},
          sys.stdout, separators=(",", ":"))
