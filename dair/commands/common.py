"""Flags shared by the commands that run the model, so each is defined once."""
from __future__ import annotations

import argparse
from typing import Any

from dair.engine.sampling import SamplingParams
from dair.errors import DairError


def add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", help="model file (GGUF or .m); default: the fetched default model")
    p.add_argument("--bus", metavar="ADDR", help="use a running cluster at this bus address instead of this process")
    p.add_argument("--threads", type=int, default=0, help="compute threads (0 = one per core)")
    add_key_args(p)


def add_key_args(p: argparse.ArgumentParser) -> None:
    """CurveZMQ keys of a client of the bus (fall back on the config's [security] section)."""
    p.add_argument("--keys", metavar="DIR", default=None,
                   help="keys directory: bus.key and clients/client.key_secret (config [security] keys)")
    p.add_argument("--secret-key", metavar="PATH", default=None, help="this client's key pair (NAME.key_secret)")
    p.add_argument("--server-key", metavar="PATH|Z85", default=None, help="the bus's public key")


def keys_from_args(args: argparse.Namespace, cfg: dict | None = None) -> Any:
    """PeerKeys for a client, or None when CURVE is off."""
    from dair import security
    from dair.config import load_config

    cfg = cfg if cfg is not None else load_config(getattr(args, "config", None))
    return security.peer_keys("client", cfg.get("security") or {}, getattr(args, "keys", None),
                              getattr(args, "secret_key", None), getattr(args, "server_key", None))


def backend_from_args(args: argparse.Namespace, quiet: bool = False) -> Any:
    """The backend the flags of add_backend_args ask for: a cluster with --bus, else this process."""
    from dair.backend import open_backend

    return open_backend(args.model, args.bus, args.threads, quiet=quiet,
                        keys=keys_from_args(args) if args.bus else None)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=None, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repeat-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random, printed with --json)")
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="stop when this text appears (repeatable)")


SEED_MAX = 2**64 - 1  # the sampler's generator takes a 64-bit seed; msgpack carries at most uint64


def check_seed(seed: int) -> int:
    """A seed outside 0..2^64-1 is an error: masking it would make different seeds draw alike."""
    if not 0 <= seed <= SEED_MAX:
        raise DairError(f"--seed {seed}: expected an integer from 0 to {SEED_MAX}")
    return seed


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    import secrets

    seed = check_seed(args.seed) if args.seed is not None else secrets.randbelow(2**31)
    return SamplingParams.from_config(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                      min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=seed)


def max_tokens_from_args(args: argparse.Namespace) -> int:
    from dair.config import defaults

    n = int(args.max_tokens if args.max_tokens is not None else defaults("sampling")["max_tokens"])
    if n < 0:
        raise DairError(f"-n/--max-tokens {n}: expected 0 or more tokens")
    return n
