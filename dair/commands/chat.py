"""`dair chat`: a conversation with the model through its own chat template."""
from __future__ import annotations

import argparse
import json
import sys

from dair.commands.common import (
    SEED_MAX,
    add_backend_args,
    add_sampling_args,
    backend_from_args,
    max_tokens_from_args,
    sampling_from_args,
)
from dair.commands.stream import run_generation
from dair.commands.text import check_utf8, stdin_error

HELP = "commands: /reset starts a new conversation, /quit (or Ctrl-D) leaves"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with the model (applies its chat template)")
    add_backend_args(p)
    add_sampling_args(p)
    p.add_argument("--system", help="system message")
    p.add_argument("--json", action="store_true",
                   help="after each reply, one JSON line: prompt_ids, ids (a stop token kept), text, stop")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from dair.tokenizer import prompt_ids as encode_prompt

    params = sampling_from_args(args)
    max_tokens = max_tokens_from_args(args)  # checked before the model loads
    backend = backend_from_args(args)
    tok = backend.tokenizer
    base = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP, file=sys.stderr)
    try:
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            except UnicodeDecodeError as e:
                raise stdin_error(e) from None
            check_utf8(line, "the input line")
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                break
            if line == "/reset":
                messages = list(base)
                print("(new conversation)", file=sys.stderr)
                continue
            messages.append({"role": "user", "content": line})
            prompt_ids = encode_prompt(tok, messages=messages)
            params.seed = (params.seed + 1) % (SEED_MAX + 1)  # a new draw per turn, reproducible from the first
            try:
                result, reply = run_generation(backend, prompt_ids, params, max_tokens, args.stop)
            except KeyboardInterrupt:
                result, reply = None, ""
                print("\n(interrupted)", file=sys.stderr)
            sys.stdout.write("\n")
            if args.json and result is not None:
                print(json.dumps({"prompt_ids": prompt_ids, "ids": result["ids"], "text": reply,
                                  "stop": result["stop"]}))
            sys.stdout.flush()
            messages.append({"role": "assistant", "content": reply.strip()})
    finally:
        backend.close()
    return 0
