"""`dair keys`: CurveZMQ key pairs for the bus, stages and clients (docs/protocol.md, "Security")."""
from __future__ import annotations

import argparse
import json
import socket


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("keys", help="make and show CurveZMQ key pairs (authentication, encryption)")
    sub = p.add_subparsers(dest="keys_command", metavar="ACTION")
    g = sub.add_parser("generate", help="write NAME.key (public, to share) and NAME.key_secret (mode 0600)")
    g.add_argument("--out", metavar="DIR", default=".", help="directory to write into (default: .)")
    g.add_argument("--name", default=None, help="file name stem (default: this host's name)")
    g.add_argument("--force", action="store_true", help="replace an existing pair of that name")
    g.add_argument("--json", action="store_true", help='print {"public": ..., "public_file": ..., "secret_file": ...}')
    g.set_defaults(func=cmd_generate)
    s = sub.add_parser("show", help="print the public key of a NAME.key or NAME.key_secret file")
    s.add_argument("file")
    s.set_defaults(func=cmd_show)
    p.set_defaults(func=lambda _args: (p.print_help(), 1)[1])


def cmd_generate(args: argparse.Namespace) -> int:
    from dair.security import generate_keys, load_public

    name = args.name or socket.gethostname().split(".")[0] or "dair"
    public, secret = generate_keys(args.out, name, force=args.force)
    key = load_public(public).decode("ascii")
    if args.json:
        print(json.dumps({"public": key, "public_file": str(public), "secret_file": str(secret)}))
        return 0
    print(f"public key {key}")
    print(f"  {public}  (copy to the bus's allowed-keys directory, or to each peer if this is the bus)")
    print(f"  {secret}  (secret: stays on this machine, mode 0600)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from dair.security import load_public

    print(load_public(args.file).decode("ascii"))
    return 0
