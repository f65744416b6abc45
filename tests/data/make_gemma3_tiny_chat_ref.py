"""Recreate gemma3-tiny-chat.ref.json: llama.cpp's greedy answer, up to its end-of-generation
token, to one Gemma-templated question on the tiny Gemma 3 model of tests/support/gemma_tiny.py.

    .venv/bin/python tests/support/gemma_tiny.py /tmp/gemma3-tiny.gguf      # dair writes the file
    python tests/data/make_gemma3_tiny_chat_ref.py /tmp/gemma3-tiny.gguf > tests/data/gemma3-tiny-chat.ref.json

The second step runs with llama-cpp-python installed (not a dair dependency). The prompt is
rendered by hand here in Gemma's format (llama.cpp's LLM_CHAT_TEMPLATE_GEMMA), not by dair; the
stop is llama.cpp's own end-of-generation test (llama_vocab_is_eog).
"""
import hashlib
import json
import sys

import llama_cpp
import numpy as np
from llama_cpp import Llama

QUESTION = "Is one fruit?"
PROMPT = f"<start_of_turn>user\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n"
MAX = 64

path = sys.argv[1]
llm = Llama(model_path=path, n_ctx=256, n_threads=1, verbose=False, logits_all=True)
vocab = llama_cpp.llama_model_get_vocab(llm.model)
ids = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
out, top5 = [], []
llm.eval(ids)
while len(out) < MAX:
    logits = np.array(llm.scores[llm.n_tokens - 1])
    best = np.argsort(-logits)[:5]
    top5.append([[int(t), round(float(logits[t]), 4)] for t in best])
    out.append(int(best[0]))
    if llama_cpp.llama_vocab_is_eog(vocab, out[-1]):
        break
    llm.eval([out[-1]])
stop = out[-1]
json.dump({"sha256": hashlib.sha256(open(path, "rb").read()).hexdigest(), "question": QUESTION, "prompt": PROMPT,
           "prompt_ids": ids, "ids": out, "top5": top5,
           "stop_token": {"id": stop, "piece": llm.detokenize([stop], special=True).decode(),
                          "is_eog": bool(llama_cpp.llama_vocab_is_eog(vocab, stop))},
           "text": llm.detokenize(out[:-1] if llama_cpp.llama_vocab_is_eog(vocab, stop) else out).decode("utf-8", "replace")},
          sys.stdout, indent=1)
