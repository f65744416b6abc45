"""Recreate chat.ref.json: llama.cpp's greedy answer to one chat-templated question.

Run with llama-cpp-python installed (not a dair dependency):
    python tests/data/make_chat_ref.py MODEL.gguf > tests/data/chat.ref.json
The prompt ids are rendered by hand here from SmolLM2's template, not by dair.
"""
import json
import sys

import numpy as np
from llama_cpp import Llama

QUESTION = "What is the capital of France?"
PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")

llm = Llama(model_path=sys.argv[1], n_ctx=512, verbose=False, logits_all=True)
ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
out, top5 = [], []
llm.eval(ids)
while len(out) < 24:
    logits = np.array(llm.scores[llm.n_tokens - 1])
    best = np.argsort(-logits)[:5]
    top5.append([[int(t), round(float(logits[t]), 4)] for t in best])
    out.append(int(best[0]))
    if out[-1] == 2:
        break
    llm.eval([out[-1]])
json.dump({"question": QUESTION, "prompt": PROMPT, "prompt_ids": ids, "ids": out, "top5": top5,
           "text": llm.detokenize(out).decode("utf-8", "replace")}, sys.stdout, indent=1)
