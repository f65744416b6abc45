"""Recreate chat.ref.json: llama.cpp's greedy answer to one chat-templated question.

Run with llama-cpp-python installed (not a dair dependency):
    python tests/data/make_chat_ref.py MODEL.gguf > tests/data/chat.ref.json
The prompt ids are rendered by hand here from SmolLM2's template, not by dair.
"""
import json
import sys

from llama_cpp import Llama

QUESTION = "What is the capital of France?"
PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")

llm = Llama(model_path=sys.argv[1], n_ctx=512, verbose=False)
ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
out = []
for tok in llm.generate(ids, temp=0.0, top_k=1):
    out.append(tok)
    if len(out) >= 24 or tok == 2:
        break
json.dump({"question": QUESTION, "prompt": PROMPT, "prompt_ids": ids, "ids": out,
           "text": llm.detokenize(out).decode("utf-8", "replace")}, sys.stdout, indent=1)
