"""`dair tokenize`: the model's token ids for a text, as llama.cpp would give them."""
from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenize", help="print the token ids of a text")
    p.add_argument("text", help="text to tokenize ('-' reads stdin)")
    p.add_argument("--model", metavar="PATH", help="model file (GGUF, .m or .t); default: the default model")
    p.add_argument("--json", action="store_true", help='print {"ids": [...]}')
    p.add_argument("--no-special", action="store_true",
                   help="treat special-token text like <|im_start|> as plain text")
    p.add_argument("--bos", choices=["auto", "yes", "no"], default="auto",
                   help="prepend BOS: per the model's metadata (auto), always, or never")
    p.set_defaults(func=cmd_tokenize)


def cmd_tokenize(args: argparse.Namespace) -> int:
    import sys

    from dair.commands.text import check_utf8, stdin_error
    from dair.model.fetch import resolve_model_path
    from dair.tokenizer import load_tokenizer

    try:
        text = sys.stdin.read() if args.text == "-" else args.text
    except UnicodeDecodeError as e:
        raise stdin_error(e) from None
    check_utf8(text, "standard input" if args.text == "-" else "the text")
    tok = load_tokenizer(resolve_model_path(args.model))
    add_bos = None if args.bos == "auto" else args.bos == "yes"
    ids = tok.encode(text, parse_special=not args.no_special, add_bos=add_bos)
    if args.json:
        print(json.dumps({"ids": ids}))
    else:
        print(" ".join(str(i) for i in ids))
    return 0
