"""A stage's computation: runs its layer range on the activation messages it is given.

It owns the RangeEngine and the per-session state (the positions its KV cache holds, the
sampling settings). It keeps no token history: a sample step brings the ids its repeat penalty
looks back on (`Step.recent`), from the bus's history. Every `act` of a batch for the same layer
is run as one `run_layers` call, so the pending decode steps of several sessions become one
batched matmul.
It runs on the stage's main thread, right where messages are received (no thread hand-off on
the critical path); its answers are collected in `outbox` for the link to send.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from dair.bus import protocol as P
from dair.bus import states, wire
from dair.config import StageConfig
from dair.engine.residency import parse_size


@dataclass
class StageSession:
    next_pos: int = 0  # positions 0..next_pos-1 are in the KV cache
    params: Any = None  # SamplingParams from the session's last step that carried them


class Compute:
    def __init__(self, model: Any, first: int, last: int, stage: StageConfig, max_context: int) -> None:
        """`stage`: config.toml's [stage] (flags applied); `max_context`: [bus] max_context."""
        self.model = model
        self.kv_type, self.max_context = stage.kv_type, max_context
        self.max_ram = parse_size(stage.max_ram)
        self.first, self.last = first, last
        self.n_layers = model.config.n_layers
        self.threads = stage.threads
        self.wire = stage.wire
        self.max_batch = stage.max_batch
        self.lz4_min_bytes = stage.lz4_min_bytes
        self.engine: Any = None
        self.state = states.LOADING
        self.sessions: dict[str, StageSession] = {}
        self.counters: dict[str, int] = {}
        self.batches = 0
        self.batched_segments = 0
        self.max_batch_seen = 0
        self.compute_s = 0.0
        self.fatal: str | None = None
        self.outbox: list[list[Any]] = []

    # --- plumbing -----------------------------------------------------------------------------
    def count(self, code: str) -> None:
        self.counters[code] = self.counters.get(code, 0) + 1

    def _send(self, header: dict[str, Any], buffers: list[Any] = ()) -> None:
        self.outbox.append(P.encode(header, buffers, self.lz4_min_bytes))

    def _error(self, code: str, msg: str, sid: str | None = None) -> None:
        self.count(code)
        self._send(P.error(code, msg, sid=sid))

    def build(self) -> bool:
        """Build the engine for the current range; False (and `fatal` set) if it cannot."""
        if self.first < 0:  # a standby: no weights touched until the bus assigns a range
            self.state = states.STANDBY
            return True
        try:
            self._build(self.first, self.last)
            return True
        except Exception as e:  # a stage that cannot build its engine must say why and stop
            self.fatal = f"cannot load layers {self.first}-{self.last}: {e}"
            self.state = states.DEAD
            return False

    def _build(self, first: int, last: int) -> None:
        from dair.engine.forward import RangeEngine

        self.state = states.LOADING
        if self.engine is not None:
            for sid in list(self.sessions):
                self.engine.close_session(sid)
            self.engine.close()  # stops its prefetch thread (streaming mode)
        self.sessions.clear()
        self.engine = RangeEngine(self.model, first, last, threads=self.threads, max_ram=self.max_ram,
                                  kv_type=self.kv_type, max_context=self.max_context)
        self.first, self.last = first, last
        self.state = states.READY

    # --- message handling --------------------------------------------------------------------
    def process(self, batch: list[tuple[dict[str, Any], list[Any]]]) -> None:
        acts: list[tuple[dict[str, Any], list[Any]]] = []
        sids: set[str] = set()
        for header, buffers in batch:
            t = header["type"]
            if t == P.ACT:
                seg_sids = {s.sid for s in header["segs"]}
                # The same session twice in one run_layers call would see its own future tokens.
                if acts and (seg_sids & sids or header["layer"] != acts[0][0]["layer"]
                             or sum(len(h["segs"]) for h, _ in acts) >= self.max_batch):
                    self._run(acts)
                    acts, sids = [], set()
                acts.append((header, buffers))
                sids |= seg_sids
                continue
            if acts:
                self._run(acts)
                acts, sids = [], set()
            self._control(header)
        if acts:
            self._run(acts)

    def _control(self, header: dict[str, Any]) -> None:
        t = header["type"]
        if t in (P.OPEN, P.CLOSE, P.HEARTBEAT) and self.engine is None:
            return  # a standby holds no sessions (the bus opens them again after ASSIGN)
        if t == P.OPEN:
            sid = header["sid"]
            if sid in self.sessions:
                self.engine.close_session(sid)
            self.engine.open_session(sid)
            self.sessions[sid] = StageSession()
        elif t == P.CLOSE:
            # Idempotent: the bus closes ephemeral sessions on every stage.
            if self.sessions.pop(header["sid"], None) is not None:
                self.engine.close_session(header["sid"])
        elif t == P.HEARTBEAT:
            # The bus's sessions when it sent this beat (messages arrive in order, so every session
            # opened before it is listed): any other is one whose `close` never reached us.
            live = {sid for sid in header["sids"] if isinstance(sid, str)}
            for sid in [sid for sid in self.sessions if sid not in live]:
                del self.sessions[sid]
                self.engine.close_session(sid)
                self.count("sessions_expired")
        elif t == P.ASSIGN:
            if (header["first"], header["last"]) != (self.first, self.last):
                try:
                    self._build(header["first"], header["last"])
                except Exception as e:
                    self.fatal = f"cannot load layers {header['first']}-{header['last']}: {e}"
                    self.state = states.DEAD

    def _check(self, header: dict[str, Any]) -> tuple[str, str] | None:
        if header["layer"] != self.first:
            return P.E_LAYER, f"act for layer {header['layer']}, this stage runs layers {self.first}-{self.last}"
        if header["layer"] > 0 and header["shape"][1] != self.engine.dim:
            return P.E_BAD_FIELD, f"act of width {header['shape'][1]}, the model's is {self.engine.dim}"
        return None

    def _run(self, acts: list[tuple[dict[str, Any], list[Any]]]) -> None:
        steps: list[P.Step] = []
        parts: list[np.ndarray] = []
        seen: set[str] = set()
        layer = acts[0][0]["layer"]
        for header, buffers in acts:
            problem = self._check(header)
            if problem:
                self._error(*problem, sid=header["segs"][0].sid)
                continue
            # One bad step (a session closed while its step was on its way, say) must not cost
            # the other sessions batched in the same message their step.
            keep, offset, rows = [], 0, []
            for step in header["segs"]:
                n = len(step.ids)
                if self._step_ok(step, seen):
                    keep.append(step)
                    rows.append((offset, offset + n))
                    seen.add(step.sid)
                offset += n
            if not keep:
                continue
            steps += keep
            if layer > 0:
                x = wire.unpack(buffers[0], header["dtype"], header["shape"][0], header["shape"][1])
                if len(keep) < len(header["segs"]):
                    x = np.concatenate([x[a:b] for a, b in rows])
                parts.append(x)
        if not steps:
            return
        t0 = time.perf_counter()
        try:
            for s in steps:
                if s.pos < self.sessions[s.sid].next_pos:
                    self.engine.truncate_session(s.sid, s.pos)
            if layer == 0:
                ids = np.fromiter((i for s in steps for i in s.ids), dtype=np.int32)
                x = self.engine.embed(ids)
            else:
                x = parts[0] if len(parts) == 1 else np.concatenate(parts)
            y = self.engine.run_layers(x, [(s.sid, np.arange(s.pos, s.end, dtype=np.int32)) for s in steps])
            for s in steps:
                self.sessions[s.sid].next_pos = s.end
            if self.engine.has_head:
                results = self._head(y, steps)
        except Exception as e:
            traceback.print_exc()
            for s in steps:
                self._error(P.E_ENGINE, f"{type(e).__name__}: {e}", sid=s.sid)
            return
        ct = time.perf_counter() - t0
        self.compute_s += ct
        self.batches += 1
        self.batched_segments += len(steps)
        self.max_batch_seen = max(self.max_batch_seen, len(steps))
        if self.engine.has_head:
            # Every step has a result; q (the first step's) times the hop.
            self._send({"type": P.TOKENS, "results": results, "ct": ct, "q": steps[0].step_id})
        else:
            self._send({"type": P.ACT, "layer": self.last + 1, "dtype": self.wire,
                        "shape": [int(y.shape[0]), int(y.shape[1])], "segs": steps, "ct": ct},
                       [wire.pack(y, self.wire)])

    def _step_ok(self, s: P.Step, seen: set[str]) -> bool:
        """Can this step run now? If not, an error naming its session goes to the bus. A step
        that brings sampling settings has them checked (and kept) here, where a bad one costs
        only its own session."""
        st = self.sessions.get(s.sid)
        vocab = self.model.config.vocab_size
        if st is None:
            problem = (P.E_UNKNOWN_SESSION, f"unknown session {s.sid!r}")
        elif s.sid in seen:
            problem = (P.E_BAD_FIELD, f"session {s.sid!r} twice in one step")
        elif s.pos > st.next_pos:
            problem = (P.E_BAD_FIELD, f"session {s.sid!r}: position {s.pos} after a gap "
                       f"(this stage holds {st.next_pos} positions)")
        elif max(s.ids) >= vocab or (s.next_id or 0) >= vocab or (s.recent and max(s.recent) >= vocab):
            problem = (P.E_BAD_FIELD, f"session {s.sid!r}: token id beyond the vocabulary ({vocab})")
        elif s.end > self.engine.max_context:
            problem = (P.E_CONTEXT, f"session {s.sid!r}: position {s.end} beyond the context of "
                       f"{self.engine.max_context}")
        else:
            if s.params is None or not self.engine.has_head:
                return True
            from dair.engine.sampling import SamplingParams

            try:
                st.params = SamplingParams.from_dict(s.params)
                return True
            except Exception as e:  # DairError, or a setting of the wrong kind
                problem = (P.E_BAD_FIELD, f"session {s.sid!r}: sampling settings: {e}")
        self._error(*problem, sid=s.sid)
        return False

    def _head(self, y: np.ndarray, steps: list[P.Step]) -> list[dict[str, Any]]:
        """The results of the steps that ask for one (`out`), from the final rows y."""
        from dair.engine.sampling import SamplingParams, sample_token, token_logprobs, top_logits

        results: list[dict[str, Any]] = []
        rows, offset = [], 0
        for s in steps:
            if s.out == "sample":
                rows.append(offset + len(s.ids) - 1)
            offset += len(s.ids)
        logits = self.engine.head(y[rows]) if rows else None
        offset, r = 0, 0
        for s in steps:
            n = len(s.ids)
            if s.out == "sample":
                st = self.sessions[s.sid]
                params = st.params if st.params is not None else SamplingParams()
                # The penalty's look-back: the bus's history before this step, then its own ids.
                tok = int(sample_token(logits[r], params, (s.recent or []) + s.ids, s.end))
                res = {"sid": s.sid, "q": s.step_id, "pos": s.end, "id": tok}
                if s.top_k is not None:  # the sampled token's log-probability and the k likeliest ids' (OpenAI's logprobs)
                    lp, top = token_logprobs(logits[r], tok, s.top_k)
                    res["lp"], res["top"] = lp, [[i, v] for i, v in top]
                r += 1
                results.append(res)
            elif s.out == "none":
                # Passed the last stage, nothing asked of it: the bus counts it done (a prefill
                # chunk's progress) rather than wait for the request's end to forget it.
                results.append({"sid": s.sid, "q": s.step_id, "pos": s.end})
            elif s.out == "score":
                lg = self.engine.head(y[offset:offset + n])
                nx = s.next_id
                targets = np.array(s.ids[1:] + [nx if nx is not None else 0], dtype=np.int64)
                top, lp = top_logits(lg, s.top_k or 5, targets)
                lps: list[float | None] = [float(v) for v in lp]
                if nx is None:
                    lps[-1] = None
                results.append({"sid": s.sid, "q": s.step_id, "pos": s.pos,
                                "top": [[[int(i), float(v)] for i, v in row] for row in top], "lp": lps})
            offset += n
        return results
