"""`dair generate`: raw completion of a prompt (no chat template), streamed as it is produced."""
from __future__ import annotations

import argparse
import json
import sys

from dair.commands.common import (
    add_backend_args,
    add_sampling_args,
    backend_from_args,
    max_tokens_from_args,
    sampling_from_args,
)
from dair.commands.stream import run_generation


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt (raw text, no chat template)")
    add_backend_args(p)
    add_sampling_args(p)
    p.add_argument("--json", action="store_true", help="end with one JSON line: prompt_ids, ids, text, timings")
    p.add_argument("prompt", help="the text to continue")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    params = sampling_from_args(args)
    max_tokens = max_tokens_from_args(args)  # checked before the model loads
    backend = backend_from_args(args)
    try:
        from dair.tokenizer import prompt_ids as encode_prompt

        prompt_ids = encode_prompt(backend.tokenizer, text=args.prompt)
        result, text = run_generation(backend, prompt_ids, params, max_tokens, args.stop)
    finally:
        backend.close()
    sys.stdout.write("\n")
    t = result["timings"]
    print(f"[{len(prompt_ids)} prompt tokens at {t['prefill_tok_s']:.1f} tok/s, {len(result['ids'])} generated "
          f"at {t['decode_tok_s']:.1f} tok/s, stop: {result['stop']}]", file=sys.stderr)
    if args.json:
        print(json.dumps({"prompt_ids": prompt_ids, "ids": result["ids"], "text": text, "stop": result["stop"],
                          "seed": params.seed, "timings": t}))
    return 0
