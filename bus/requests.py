"""Requests as the bus schedules them: sessions, prompts cut into steps, tokens, batching, the end.

This object owns the sessions and every rule about them, and no socket: it talks through the
callbacks it is given (`send` to a stage, `tell` a client, `route` a step into the pipeline), so
its rules run in one process in tests (tests/unit/test_requests.py). `Broker` owns the sockets and
the stages' membership, and hands it the messages of clients and the results of the last stage.
"""
from __future__ import annotations

import functools
import math
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

from dair.bus import protocol as P
from dair.bus.registry import Node, Registry
from dair.bus.sessions import Request, Session, common_prefix
from dair.tokenizer import CompletionText, prompt_ids

PARAM_KEYS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed")
# Sampling seeds are 64-bit (engine.sampling); anything else is refused rather than wrapped.
SEED_RANGE = range(0, 1 << 64)
# max_tokens of a generate request: 0 (prompt only) up to this (the context ends it anyway).
MAX_TOKENS_RANGE = range(0, 1 << 31)

Send = Callable[[bytes, dict[str, Any]], None]


def repeat_window(params: dict[str, Any]) -> int:
    """How many earlier ids the repeat penalty of these sampling settings looks at (0: none)."""
    try:
        key = tuple(sorted((k, v) for k, v in params.items() if v is not None))
        hash(key)
    except TypeError:  # a value that is not a number: from_dict says what is wrong
        key = None
    if key is None:
        return _repeat_window(params)
    # Asked for every decode step, on the path of the next step: worked out once per settings.
    return _repeat_window_of(key)


@functools.lru_cache(maxsize=256)
def _repeat_window_of(items: tuple[tuple[str, Any], ...]) -> int:
    return _repeat_window(dict(items))


def _repeat_window(params: dict[str, Any]) -> int:
    from dair.engine.sampling import SamplingParams

    p = SamplingParams.from_dict({k: v for k, v in params.items() if v is not None})
    return p.repeat_last_n if p.repeat_penalty != 1.0 else 0


class Requests:
    def __init__(self, cfg: dict[str, Any], model: Any, tokenizer: Any, registry: Registry, *,
                 send: Send, tell: Send, route: Callable[[int, int, list[Any], list[P.Step]], None],
                 busy_at: Callable[[bytes], bool], count: Callable[[str], None],
                 log: Callable[[str], None]) -> None:
        """send(stage, header): to a stage; tell(client, header): to a client, after the stage
        traffic of the current message; route(layer, step id, frames, steps): an `act` into
        the pipeline; busy_at(stage): whether a step is at that stage right now (hold_or_send)."""
        bus = cfg["bus"]
        self.model = model
        self.tok = tokenizer
        self.registry = registry
        self.send, self.tell, self.route, self.busy_at = send, tell, route, busy_at
        self.count, self.log = count, log
        self.lz4_min = int(cfg["stage"]["lz4_min_bytes"])
        # An idle session unused for this long is closed, so that sessions nobody comes back to
        # do not hold KV caches on the stages forever.
        self.session_idle_s = float(bus["session_idle_timeout_s"])
        # Prompt tokens per prefill step: bounds a stage's activation memory on long prompts, and
        # lets stage 1 start on the next chunk while stage 2 runs this one.
        self.prefill_chunk = int(bus["prefill_chunk"])
        self.max_sessions = int(bus["max_sessions"])
        self.max_per_client = int(bus["max_sessions_per_client"])
        self.max_pending = int(bus["max_pending_per_client"])
        ctx_len = int(model.config.context_length)
        self.max_context = min(int(bus["max_context"]) or ctx_len, ctx_len)
        self.context_set_by = (f"max_context = {self.max_context} (config)" if self.max_context < ctx_len
                               else f"the model's context_length {ctx_len}")
        self.sampling = {k: v for k, v in cfg["sampling"].items() if k in PARAM_KEYS}
        self.default_max_tokens = int(cfg["sampling"]["max_tokens"])
        self.eos_ids = frozenset(int(i) for i in getattr(tokenizer, "eos_ids", ()) or ())
        self.sessions: dict[str, Session] = {}
        # Prefill steps whose passing a client asked to hear of: q -> (sid, tokens done, of total)
        self.progress_steps: dict[int, tuple[str, int, int]] = {}
        # Decode steps held back for a moment to travel with another group (see hold_or_send).
        self.held: list[P.Step] = []
        self.held_until = 0.0
        self.tokens_total = 0
        self._q = 0

    def context_limit(self) -> tuple[int, str]:
        """The longest context a session may reach and what sets it: the config and the model
        (self.max_context), or the smallest a live stage reports (its RAM budget's KV cache)."""
        limit, why = self.max_context, self.context_set_by
        for n in self.registry.live():
            got = int(n.stage_stats.get("max_context", 0) or 0)
            if 0 < got < limit:
                limit = got
                why = f"stage {n.name} (layers {n.first}-{n.last}): {n.stage_stats.get('context_set_by', '')}"
        return limit, why

    def expire_idle(self, now: float, silence: float, client_seen: dict[bytes, float]) -> None:
        """Close the sessions of clients silent for `silence`, and sessions unused for
        session_idle_timeout_s (a client waiting for a stream is not asked to prove it is alive)."""
        for s in list(self.sessions.values()):
            if s.req is not None:
                continue
            quiet = now - client_seen.get(s.client, now)
            if quiet > silence:
                self.log(f"closing session {s.sid}: its client has been silent for {quiet:.1f}s")
                self.close_session(s)
            elif now - s.last_active > self.session_idle_s:
                self.log(f"closing session {s.sid}: unused for {self.session_idle_s:.0f}s")
                self.close_session(s)

    def forget_kv(self) -> None:
        """What the stages hold of every session is gone (a range died, moved or joined anew):
        idle sessions replay their history with their next request; running requests pause
        (their steps in flight become stale, and are dropped) until `resume_paused`."""
        for s in self.sessions.values():
            s.kv_len = 0
            if s.req is not None and not s.paused:
                s.paused = True
                s.qs.clear()
                s.silent.clear()

    def resume_paused(self) -> None:
        """The pipeline is whole again: replay each paused request's history from position 0 (the
        new stage holds nothing), sampling the next token where the request left off."""
        for s in self.sessions.values():
            if not s.paused or s.req is None:
                continue
            s.paused, s.paused_t = False, 0.0
            req = s.req
            self.log(f"resuming session {s.sid}: replaying {len(s.history)} tokens")
            if req.kind == "score":
                req.positions = []
                self.send_prompt(s, 0, s.history, "score", top_k=req.top_k)
            else:
                self.send_prompt(s, 0, s.history, "sample", top_k=self.sample_k(req))

    def check_paused(self, now: float, limit: float, covering: bool) -> None:
        """A request paused for `limit` with no stage loading the missing range (a re-plan that
        could not place it, say) ends with `not_ready` rather than hang."""
        for s in list(self.sessions.values()):
            if not s.paused or s.req is None:
                continue
            if not s.paused_t:
                s.paused_t = now
            elif now - s.paused_t > limit and not covering:
                self.finish_error(s, P.E_NOT_READY, f"paused {now - s.paused_t:.0f}s for a lost stage and no "
                                  "stage took its range: " + "; ".join(self.registry.problems()))

    def fail_paused(self, code: str, msg: str) -> None:
        for s in list(self.sessions.values()):
            if s.paused and s.req is not None:
                self.finish_error(s, code, msg)

    def hold_or_send(self, last: Node, steps: list[P.Step]) -> None:
        """Send the next decode steps, or hold them until another group comes back.

        Sessions whose steps travel apart (say, one group at stage 1 while another is at stage
        3) each pay a full pass over every stage's weights. When another step is at the last
        stage right now, it will be back within one stage's compute time: waiting for it merges
        both groups into one batch for good, which on a CPU costs little more than either alone.
        """
        if self.held:
            steps = self.held + steps
            self.held = []
        elif steps and self.busy_at(last.ident):
            self.held = steps
            p50 = last.compute_s.pct(50) or 0.005
            self.held_until = time.monotonic() + min(0.05, max(0.002, 2.0 * p50))
            return
        self.send_step(steps)

    def release_held(self) -> None:
        steps, self.held = self.held, []
        self.send_step(steps)

    def send_step(self, steps: list[P.Step]) -> None:
        """Steps (of different sessions) as one `act` for layer 0: the stages run them as one batch."""
        if not steps:
            return
        n = sum(len(s.ids) for s in steps)
        header = {"type": P.ACT, "layer": 0, "dtype": "ids", "shape": [n], "segs": steps}
        self.route(0, steps[0].step_id, P.encode(header, (), self.lz4_min), steps)

    def make_step(self, s: Session, pos: int, ids: list[int], out: str, *, top_k: int | None = None,
                  next_id: int | None = None, params: dict[str, Any] | None = None) -> P.Step:
        """The step of `ids` at `pos` for session s, numbered and recorded as in flight. A sample
        step carries the ids before it that the session's repeat penalty looks back on: the
        history is the bus's alone (Session.history), so a stage never keeps one."""
        q = self.next_q()
        window = repeat_window(s.params) if out == "sample" else 0
        step = P.Step(s.sid, pos, ids, q, out, top_k=top_k, next_id=next_id, params=params,
                      recent=s.history[max(0, pos - window):pos] if window else None)
        s.qs[q] = None  # made, not sent: nobody's to answer yet
        if out == "none":
            s.silent.add(q)
        return step

    def send_prompt(self, s: Session, start: int, ids: list[int], out: str, top_k: int | None = None) -> None:
        """ids[start:] (the session's history) as prefill steps of `prefill_chunk` tokens, sent at
        once (they pipeline). `sample`: the last chunk samples and carries the session's sampling
        settings; `score`: every chunk scores its rows (top_k alternatives each)."""
        for a in range(start, len(ids), self.prefill_chunk):
            b = min(a + self.prefill_chunk, len(ids))
            final = b == len(ids)
            if out == "score":
                step = self.make_step(s, a, ids[a:b], "score", top_k=top_k, next_id=None if final else ids[b])
            elif final:
                step = self.make_step(s, a, ids[a:b], out, top_k=top_k, params=dict(s.params))
            else:
                step = self.make_step(s, a, ids[a:b], "none")
                if s.req is not None and s.req.progress:
                    self.progress_steps[step.step_id] = (s.sid, b - start, len(ids) - start)
            self.send_step([step])

    def on_prefill_step(self, q: int) -> None:
        """Prefill step q passed the last stage: `progress` to a client that asked for it."""
        sid, done, total = self.progress_steps.pop(q, ("", 0, 0))
        s = self.sessions.get(sid)
        # Only a step still in flight in its session counts: one the bus forgot (a replay, a
        # cancel) or never made says nothing to the client.
        if s is not None and q in s.qs and s.req is not None and s.req.progress:
            self.tell(s.req.client, {"type": P.PROGRESS, "req": s.req.req, "sid": sid, "done": done, "total": total})
        if len(self.progress_steps) > 10000:  # steps lost with a failed stage must not pile up
            self.progress_steps = {q: v for q, v in self.progress_steps.items() if v[0] in self.sessions}

    def on_silent_result(self, s: Session, q: int) -> None:
        """Step q of s, one that asks nothing of the last stage, has passed it (the stage that
        answers was checked to hold it): its progress goes out, and it is in flight no more."""
        self.on_prefill_step(q)
        s.silent.discard(q)
        s.qs.pop(q, None)

    def new_session(self, client: bytes, params: dict[str, Any] | None, ephemeral: bool) -> Session:
        if len(self.sessions) >= self.max_sessions:
            raise P.ProtocolError(P.E_BUSY, f"the bus holds {len(self.sessions)} sessions (max_sessions)")
        mine = sum(1 for s in self.sessions.values() if s.client == client)
        if mine >= self.max_per_client:
            raise P.ProtocolError(P.E_BUSY, f"this client holds {mine} sessions (max_sessions_per_client)")
        merged = self.clean_params(dict(self.sampling), params)
        if merged.get("seed") is None:
            # A seed fixed per session makes a replayed generation sample the same tokens.
            merged["seed"] = random.getrandbits(31)
        s = Session(sid=uuid.uuid4().hex[:12], client=client, ephemeral=ephemeral, params=merged)
        self.sessions[s.sid] = s
        for node in self.registry.live():
            self.send(node.ident, {"type": P.OPEN, "sid": s.sid})
        return s

    def clean_params(self, base: dict[str, Any], update: dict[str, Any] | None) -> dict[str, Any]:
        """base overlaid with the known sampling settings of update, checked here rather than
        failing later on the last stage."""
        from dair.engine.sampling import SamplingParams

        # None is "not given" (the session keeps its setting): a step's settings are all numbers.
        merged = {**base, **{k: v for k, v in (update or {}).items() if k in PARAM_KEYS and v is not None}}
        # NaN passes every range check (comparisons are false) and would sample garbage.
        bad = [k for k, v in merged.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise P.ProtocolError(P.E_BAD_FIELD, f"sampling settings: {', '.join(bad)} not a finite number")
        seed = merged.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed not in SEED_RANGE):
            raise P.ProtocolError(P.E_BAD_FIELD, f"sampling settings: seed {seed!r} is not an integer in "
                                  f"0..2^64-1")
        try:
            SamplingParams.from_dict({k: v for k, v in merged.items() if v is not None})
        except Exception as e:
            raise P.ProtocolError(P.E_BAD_FIELD, f"sampling settings: {e}") from None
        return merged

    def close_session(self, s: Session) -> None:
        self.sessions.pop(s.sid, None)
        for node in self.registry.live():
            self.send(node.ident, {"type": P.CLOSE, "sid": s.sid})

    def client_session(self, ident: bytes, sid: str) -> Session:
        s = self.sessions.get(sid)
        if s is None or s.client != ident:
            raise P.ProtocolError(P.E_UNKNOWN_SESSION, f"unknown session {sid!r}")
        return s

    def require_ready(self) -> None:
        if not self.registry.ready():
            raise P.ProtocolError(P.E_NOT_READY, "pipeline not ready: " + "; ".join(self.registry.problems()))

    def encode_prompt(self, h: dict[str, Any]) -> list[int]:
        """The prompt of a generate or score request as ids: given, or encoded here from its
        text or chat messages (dair.tokenizer.prompt_ids, as every client that encodes does)."""
        try:
            if "ids" in h:
                ids = list(h["ids"])
            elif "text" in h:
                ids = prompt_ids(self.tok, text=h["text"])
            else:
                msgs = h["messages"]
                if not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                           and isinstance(m.get("content"), str) for m in msgs):
                    raise P.ProtocolError(P.E_BAD_FIELD, "messages: each needs 'role' and 'content' strings")
                ids = prompt_ids(self.tok, messages=msgs)
        except P.ProtocolError:
            raise
        except Exception as e:
            raise P.ProtocolError(P.E_BAD_FIELD, f"cannot tokenize: {e}") from None
        vocab = self.model.config.vocab_size
        if any(i >= vocab for i in ids):
            raise P.ProtocolError(P.E_BAD_FIELD, f"token id beyond the vocabulary ({vocab})")
        if not ids:
            raise P.ProtocolError(P.E_BAD_FIELD, "empty prompt")
        limit, why = self.context_limit()
        if len(ids) >= limit:
            raise P.ProtocolError(P.E_CONTEXT, f"prompt of {len(ids)} tokens does not fit the maximum "
                                  f"context of {limit} tokens, set by {why}")
        return ids

    def check_pending(self, ident: bytes) -> None:
        running = sum(1 for s in self.sessions.values() if s.req is not None and s.req.client == ident)
        if running >= self.max_pending:
            raise P.ProtocolError(P.E_BUSY, f"this client has {running} requests running (max_pending_per_client)")

    def on_generate(self, ident: bytes, h: dict[str, Any]) -> None:
        self.require_ready()
        self.check_pending(ident)
        ids = self.encode_prompt(h)
        # 0 means 0 (the prompt only, as in-process); absent means the configured default.
        max_tokens = self.default_max_tokens if h.get("max_tokens") is None else h["max_tokens"]
        if max_tokens not in MAX_TOKENS_RANGE:
            raise P.ProtocolError(P.E_BAD_FIELD, f"max_tokens {max_tokens}: expected 0..{MAX_TOKENS_RANGE.stop - 1}")
        if "sid" in h:
            s = self.client_session(ident, h["sid"])
            if s.req is not None:
                raise P.ProtocolError(P.E_BUSY, f"session {s.sid} is already generating")
            if h.get("params"):
                s.params = self.clean_params(s.params, h["params"])
        else:
            s = self.new_session(ident, h.get("params"), ephemeral=True)
        stop = frozenset(int(i) for i in h["stop_ids"]) if "stop_ids" in h else self.eos_ids
        keep = min(common_prefix(s.history[:s.kv_len], ids), len(ids) - 1)
        s.history = list(ids)
        s.kv_len = keep
        s.last_active = time.monotonic()
        s.req = Request(req=h["req"], client=ident, kind="generate", max_tokens=max_tokens,
                        stop_ids=stop, stream=h.get("stream", True), n_prompt=len(ids), logprobs=h.get("logprobs"),
                        n_new_prompt=len(ids) - keep, text=CompletionText(self.tok, stop),
                        progress=h.get("progress", False))
        if max_tokens <= 0:
            self.finish(s, "length")
            return
        self.send_prompt(s, keep, ids, "sample", top_k=self.sample_k(s.req))

    def on_token(self, s: Session, r: dict[str, Any]) -> P.Step | None:
        req = s.req
        assert req is not None
        tok, pos = int(r["id"]), int(r["pos"])
        now = time.perf_counter()
        if req.t_first is None:
            req.t_first = now
            if req.progress and req.n_new_prompt > self.prefill_chunk:  # the last prefill step, with its token
                self.tell(req.client, {"type": P.PROGRESS, "req": req.req, "sid": s.sid, "done": req.n_new_prompt,
                                       "total": req.n_new_prompt})
        s.kv_len = pos
        del s.history[pos:]
        s.history.append(tok)
        req.generated.append(tok)
        s.tokens += 1
        self.tokens_total += 1
        if tok in req.stop_ids:  # kept in ids (as the in-process engine does), no text, never streamed
            self.finish(s, "eos")
            return None
        logprobs = self.result_logprobs(req, r)
        piece = req.text.feed(tok)
        if req.stream:
            self.tell(req.client, {"type": P.TOKEN, "req": req.req, "sid": s.sid, "id": tok, "pos": pos,
                                   "text": piece, **logprobs})
        if len(req.generated) >= req.max_tokens or pos + 1 >= self.context_limit()[0]:
            self.finish(s, "length")
            return None
        return self.make_step(s, pos, [tok], "sample", top_k=self.sample_k(req))

    @staticmethod
    def sample_k(req: Request) -> int | None:
        """A request asking for logprobs has every sample step carry `k` (at least 1: the
        sampled token's own log-probability comes with any k)."""
        return None if req.logprobs is None else max(1, req.logprobs)

    def result_logprobs(self, req: Request, r: dict[str, Any]) -> dict[str, Any]:
        """The `lp` and `top` of a stage's sample result, checked (a stage is trusted only to
        compute them, not to send anything it likes): ValueError if malformed."""
        if req.logprobs is None:
            return {}
        lp, top = r["lp"], r["top"]
        vocab = self.model.config.vocab_size

        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)

        if not number(lp) or not isinstance(top, list) or len(top) > max(1, req.logprobs) or not all(
                isinstance(e, list) and len(e) == 2 and isinstance(e[0], int) and not isinstance(e[0], bool)
                and 0 <= e[0] < vocab and number(e[1]) for e in top):
            raise ValueError("'lp' must be a number and 'top' at most k [id, logprob] pairs")
        return {"lp": float(lp), "top": [[e[0], float(e[1])] for e in top[:req.logprobs]]}

    def timings(self, req: Request) -> dict[str, float]:
        end = time.perf_counter()
        first = req.t_first if req.t_first is not None else end
        prefill_s, decode_s = first - req.t0, end - first
        n_dec = max(0, len(req.generated) - 1)
        return {"prefill_s": prefill_s, "decode_s": decode_s,
                "prefill_tok_s": req.n_new_prompt / prefill_s if prefill_s > 0 else 0.0,
                "decode_tok_s": n_dec / decode_s if decode_s > 0 and n_dec else 0.0}

    def finish(self, s: Session, stop: str) -> None:
        req = s.req
        assert req is not None
        timings = self.timings(req)
        s.last_tok_s = timings["decode_tok_s"]
        s.end()
        # The text streamed, joined (plus a character still incomplete at the end): the stop
        # token that ended it has none.
        self.tell(req.client, {"type": P.DONE, "req": req.req, "sid": s.sid, "stop": stop,
                               "ids": req.generated, "text": req.text.finish() if req.text is not None else "",
                               "n_prompt": req.n_prompt, "timings": timings})
        if s.ephemeral:
            self.close_session(s)

    def finish_error(self, s: Session, code: str, msg: str) -> None:
        req = s.end()
        if req is not None:
            self.count(code)
            self.tell(req.client, P.error(code, msg, sid=s.sid, req=req.req))
        if s.ephemeral:
            self.close_session(s)
        else:
            s.kv_len = 0  # what the stages hold is unknown now: replay from history next time

    def fail_running(self, code: str, msg: str) -> None:
        for s in list(self.sessions.values()):
            if s.req is not None:
                self.finish_error(s, code, msg)

    def on_score(self, ident: bytes, h: dict[str, Any]) -> None:
        self.require_ready()
        if not 0 < h["top_k"] <= 1000:
            raise P.ProtocolError(P.E_BAD_FIELD, "score: top_k must be in 1..1000")
        self.check_pending(ident)
        ids = self.encode_prompt(h)
        s = self.new_session(ident, None, ephemeral=True)
        s.history = list(ids)
        s.req = Request(req=h["req"], client=ident, kind="score", top_k=h["top_k"], n_prompt=len(ids))
        self.send_prompt(s, 0, ids, "score", top_k=h["top_k"])

    def finish_score(self, s: Session, r: dict[str, Any]) -> None:
        req = s.req
        assert req is not None
        req.positions += [{"top": top, "logprob_next": lp} for top, lp in zip(r["top"], r["lp"], strict=True)]
        if s.qs:
            return  # chunks still to come (they arrive in order)
        s.end()
        self.tell(req.client, {"type": P.SCORED, "req": req.req, "positions": req.positions})
        self.close_session(s)

    def on_cancel(self, ident: bytes, h: dict[str, Any]) -> None:
        s = self.client_session(ident, h["sid"])
        if s.req is not None and s.req.kind == "generate":
            self.finish(s, "cancel")

    def on_session_open(self, ident: bytes, h: dict[str, Any]) -> None:
        s = self.new_session(ident, h.get("params"), ephemeral=False)
        self.tell(ident, {"type": P.OPENED, "req": h["req"], "sid": s.sid})

    def on_session_close(self, ident: bytes, h: dict[str, Any]) -> None:
        s = self.client_session(ident, h["sid"])
        if s.req is not None and s.req.kind == "generate":
            self.finish(s, "cancel")
        self.close_session(s)
        self.tell(ident, {"type": P.CLOSED, "sid": s.sid, "req": h.get("req")})

    def next_q(self) -> int:
        self._q += 1
        return self._q
