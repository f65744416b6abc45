"""`dair score`: teacher-forced logits of a token sequence, and its perplexity."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dair.backend import perplexity
from dair.commands.common import add_backend_args, backend_from_args
from dair.errors import DairError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="teacher-forced top-K logits per position and perplexity")
    add_backend_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ids", help="comma-separated token ids")
    src.add_argument("--file", help="a text file, tokenized with the model's tokenizer")
    src.add_argument("--text", help="a text, tokenized with the model's tokenizer")
    p.add_argument("--top", type=int, default=5, help="K highest logits to show per position")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=handle)


def _parse_ids(s: str) -> list[int]:
    try:
        return [int(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise DairError(f"--ids takes comma-separated integers, got {s!r}") from None


def handle(args: argparse.Namespace) -> int:
    backend = backend_from_args(args, quiet=args.json)
    try:
        if args.ids is not None:
            ids = _parse_ids(args.ids)
            bad = [i for i in ids if not 0 <= i < backend.tokenizer.vocab_size]
            if bad:
                raise DairError(f"token id(s) {bad[:5]} outside the vocabulary of {backend.tokenizer.vocab_size}")
        else:
            try:
                text = Path(args.file).read_text(encoding="utf-8") if args.file else args.text
            except OSError as e:
                raise DairError(f"{args.file}: {e.strerror}") from None
            except UnicodeDecodeError as e:
                raise DairError(f"{args.file}: not valid UTF-8 (0x{e.object[e.start]:02x} at byte {e.start}); "
                                "the text must be UTF-8") from None
            from dair.tokenizer import prompt_ids

            ids = prompt_ids(backend.tokenizer, text=text)
        scored = backend.score(ids, args.top)
    finally:
        backend.close()
    ppl = perplexity(scored)
    if args.json:
        print(json.dumps({"ids": ids, "positions": scored["positions"], "perplexity": ppl}))
        return 0
    tok = backend.tokenizer
    for i, pos in enumerate(scored["positions"]):
        nxt = f"{ids[i + 1]:>6} {pos['logprob_next']:+8.3f}" if pos.get("logprob_next") is not None else " " * 15
        tops = "  ".join(f"{t}:{tok.decode([t])!r}={v:.2f}" for t, v in pos["top"])
        print(f"{i:>5} {ids[i]:>6} -> {nxt}   {tops}")
    print(f"perplexity: {ppl:.4f}" if ppl is not None else "perplexity: n/a (one token)")
    return 0
