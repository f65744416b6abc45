"""Where generation runs: in this process (LocalBackend) or on a cluster (dair.bus.client.BusBackend).

Both offer the same three calls, so `dair generate`, `score`, `chat` and `bench` are written once.
"""
from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dair.engine.sampling import SamplingParams, sample_token, top_logits
from dair.errors import DairError
from dair.model.fetch import resolve_model_path

# Called with each generated token's id and the text it completes ("" for a stop token, a
# control token or part of a character); returning False cancels the generation.
OnToken = Callable[[int, str], "bool | None"]


class Backend(Protocol):
    tokenizer: Any
    n_layers: int

    def generate(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                 stop_ids: set[int], on_token: OnToken | None = None) -> dict:
        """{"ids", "text", "stop", "timings"}: the generated ids (a stop id ends them and is kept),
        their text (dair.tokenizer.CompletionText: the pieces on_token got, joined; no stop
        token's text)."""
        ...

    def score(self, ids: list[int], top_k: int) -> dict: ...

    def close(self) -> None: ...


class LocalBackend:
    """The whole model in this process: one RangeEngine over layers 0..L-1."""

    def __init__(self, model_path: str | Path | None = None, threads: int = 0, act_q8: bool = True,
                 quiet: bool = False, kv_type: str | None = None, max_context: int | None = None) -> None:
        from dair.config import load_config
        from dair.engine.forward import RangeEngine
        from dair.model import open_model

        path = resolve_model_path(str(model_path) if model_path else None)
        t0 = time.perf_counter()
        if not quiet:
            print(f"loading {path} ...", file=sys.stderr, flush=True)
        self.model = open_model(path)
        self._tokenizer: Any = None
        self.n_layers = self.model.config.n_layers
        # The same context rule and KV cache default as a cluster's stages (config.toml).
        cfg = load_config()
        self.engine = RangeEngine(self.model, 0, self.n_layers - 1, threads=threads, act_q8=act_q8,
                                  kv_type=kv_type or cfg["stage"]["kv_type"],
                                  max_context=int(cfg["bus"]["max_context"] if max_context is None else max_context))
        # Tokens per prefill batch (config [bus] prefill_chunk, as on a cluster): bounds the
        # activation memory of a long prompt.
        self.prefill_chunk = int(cfg["bus"]["prefill_chunk"])
        self.on_prefill: Callable[[int, int], None] | None = None  # (tokens done, total) per chunk
        self._ids = itertools.count()
        if not quiet:
            print(f"loaded {self.n_layers} layers in {time.perf_counter() - t0:.2f}s", file=sys.stderr, flush=True)

    @property
    def tokenizer(self) -> Any:
        """Loaded on first use, from the metadata arrays: only what handles text needs it."""
        if self._tokenizer is None:
            from dair.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.model)
        return self._tokenizer

    def _prefill(self, sid: str, ids: list[int], all_logits: bool) -> np.ndarray:
        eng, outs = self.engine, []
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = np.asarray(ids[start:start + self.prefill_chunk], dtype=np.int32)
            pos = np.arange(start, start + chunk.size, dtype=np.int32)
            x = eng.run_layers(eng.embed(chunk), [(sid, pos)])
            outs.append(eng.head(x if all_logits else x[-1:]))
            if self.on_prefill is not None:
                self.on_prefill(start + chunk.size, len(ids))
        return np.concatenate(outs) if all_logits else outs[-1]

    def generate(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                 stop_ids: set[int], on_token: OnToken | None = None) -> dict:
        if not prompt_ids:
            raise DairError("empty prompt: give at least one token")
        limit = self.engine.max_context
        if len(prompt_ids) >= limit:
            raise DairError(f"prompt of {len(prompt_ids)} tokens does not fit the maximum context of {limit} "
                            f"tokens, set by {self.engine.context_set_by}")
        from dair.tokenizer import CompletionText

        max_tokens = min(max_tokens, limit - len(prompt_ids))
        text = CompletionText(self.tokenizer, stop_ids)
        sid = f"local-{next(self._ids)}"
        self.engine.open_session(sid)
        history, out, stop = list(prompt_ids), [], "length"
        try:
            t0 = time.perf_counter()
            logits = self._prefill(sid, prompt_ids, all_logits=False)[-1]
            t1 = time.perf_counter()
            while len(out) < max_tokens:
                pos = len(history)
                tok = sample_token(logits, params, history, pos)
                out.append(tok)
                history.append(tok)
                if tok in stop_ids:
                    stop = "eos"
                    break
                piece = text.feed(tok)
                if on_token is not None and on_token(tok, piece) is False:
                    stop = "cancel"
                    break
                if len(out) >= max_tokens:
                    break
                x = self.engine.run_layers(self.engine.embed(np.array([tok], np.int32)),
                                           [(sid, np.array([pos], np.int32))])
                logits = self.engine.head(x)[0]
            t2 = time.perf_counter()
        finally:
            self.engine.close_session(sid)
        n_decode = max(0, len(out) - 1)
        return {
            "ids": out,
            "text": text.finish(),
            "stop": stop,
            "timings": {
                "prefill_s": t1 - t0,
                "decode_s": t2 - t1,
                "prefill_tok_s": len(prompt_ids) / max(t1 - t0, 1e-9),
                "decode_tok_s": n_decode / max(t2 - t1, 1e-9) if n_decode else 0.0,
            },
        }

    def score(self, ids: list[int], top_k: int) -> dict:
        if not ids:
            raise DairError("nothing to score: give at least one token")
        if len(ids) > self.engine.max_context:
            raise DairError(f"{len(ids)} tokens do not fit the maximum context of {self.engine.max_context} "
                            f"tokens, set by {self.engine.context_set_by}")
        sid = f"local-{next(self._ids)}"
        self.engine.open_session(sid)
        try:
            logits = self._prefill(sid, ids, all_logits=True)
        finally:
            self.engine.close_session(sid)
        targets = np.asarray(ids[1:], dtype=np.int64)
        top, _ = top_logits(logits, top_k)
        _, lp = top_logits(logits[:-1], 1, targets) if targets.size else (None, np.zeros(0, np.float32))
        return {"positions": [{"top": [[i, v] for i, v in top[p]],
                               "logprob_next": float(lp[p]) if p < lp.size else None}
                              for p in range(len(ids))]}

    def close(self) -> None:
        self.engine.sessions.clear()


def open_backend(model: str | None = None, bus: str | None = None, threads: int = 0,
                 quiet: bool = False, timeout: float = 30.0, keys: Any = None) -> Backend:
    if bus:
        from dair.bus.client import BusBackend

        return BusBackend(bus, timeout=timeout, keys=keys)
    return LocalBackend(model, threads=threads, quiet=quiet)


def perplexity(scored: dict) -> float | None:
    lps = [p["logprob_next"] for p in scored["positions"] if p.get("logprob_next") is not None]
    return float(np.exp(-np.mean(lps))) if lps else None
