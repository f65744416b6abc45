"""dair-bus's event loop: registry, routing, sessions, tokenization, heartbeats, stats.

One thread, one ROUTER for stages and clients, one PUB for stats. It never touches activation
values: it reads each message's header, forwards the same frames (zero-copy) to the stage that
owns the next layer, and turns token results into the next decode step.
"""
from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
import traceback
import uuid
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from dair import security
from dair.bus import protocol as P
from dair.bus.registry import DEAD, LOADING, STANDBY, Node, Registry, fmt_span
from dair.bus.sessions import Request, Session, common_prefix
from dair.tokenizer import StreamDecoder

# Prompt tokens per prefill step: bounds a stage's activation memory on long prompts, and lets
# stage 1 start on the next chunk while stage 2 runs this one.
PREFILL_CHUNK = 256
# An idle session unused for this long is closed (config [bus] session_idle_timeout_s), so
# that sessions nobody comes back to do not hold KV caches on the stages forever.
SESSION_IDLE_S = 600.0
# Wait this long after a stage to be placed registers before planning, and at most
# PLAN_WAIT_S for the registered budgets to hold the whole model (then plan anyway: they stream).
PLAN_SETTLE_S = 0.5
PLAN_WAIT_S = 10.0
PARAM_KEYS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed")


def _fmt_budget(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n else "unlimited"


def _nbytes(frames: list[Any]) -> int:
    return sum(len(f.buffer) if hasattr(f, "buffer") else memoryview(f).nbytes for f in frames)


class Broker:
    def __init__(self, cfg: dict[str, Any], model: Any, tokenizer: Any, bind: str,
                 keys: tuple[str, dict[str, str]] | None = None) -> None:
        bus = cfg["bus"]
        self.cfg = cfg
        self.model = model
        self.tok = tokenizer
        self.bind = bind
        self.stats_bind = P.stats_address(bind)
        self.hb_s = bus["heartbeat_interval_ms"] / 1000.0
        self.liveness = int(bus["heartbeat_liveness"])
        self.session_idle_s = float(bus.get("session_idle_timeout_s", SESSION_IDLE_S))
        # Told to clients (welcome, heartbeat replies): a new value means a restarted bus, which
        # has lost every session, so a client waiting for tokens can give up at once.
        self.boot = uuid.uuid4().hex[:12]
        self.stats_s = bus["stats_interval_ms"] / 1000.0
        self.max_sessions = int(bus["max_sessions"])
        self.max_per_client = int(bus["max_sessions_per_client"])
        self.max_pending = int(bus.get("max_pending_per_client", 16))
        self.max_stages = int(bus.get("max_stages", 64))
        self.max_queued = int(bus.get("max_queued_msgs", 1000))
        self.max_frame = int(bus["max_frame_bytes"])
        self.lz4_min = int(cfg["stage"]["lz4_min_bytes"])
        ctx_len = int(model.config.context_length)
        self.max_context = min(int(bus["max_context"]) or ctx_len, ctx_len)
        self.context_set_by = (f"max_context = {self.max_context} (config)" if self.max_context < ctx_len
                               else f"the model's context_length {ctx_len}")
        self.sampling = {k: v for k, v in cfg["sampling"].items() if k in PARAM_KEYS}
        self.default_max_tokens = int(cfg["sampling"].get("max_tokens", 256))
        self.eos_ids = frozenset(int(i) for i in getattr(tokenizer, "eos_ids", ()) or ())
        self.registry = Registry(model.config.n_layers)
        self.sessions: dict[str, Session] = {}
        self.counters: dict[str, int] = {}
        self.inflight: dict[int, tuple[bytes, float]] = {}
        self.client_seen: dict[bytes, float] = {}
        # Decode steps held back for a moment to travel with another group (see hold_or_send).
        self.held: list[dict[str, Any]] = []
        self.to_clients: list[tuple[bytes, dict[str, Any]]] = []
        self.held_until = 0.0
        self.tokens_total = 0
        self.act_bytes = 0
        self.act_rows = 0
        self._q = 0
        self._running = True
        # Placement of stages started without --layers (replan): when to plan next (0 = no plan
        # pending), and since when budgets too small for the model have been waiting for more.
        self.plan_due = 0.0
        self.plan_waiting_since = 0.0
        self._unit_bytes: tuple[list[int], int] | None = None
        self.ctx = zmq.Context.instance()
        # keys: (bus secret key path, {role: allowed-keys dir}); the ZAP handler must run on the
        # sockets' context before they bind, or libzmq would admit any client key.
        self.gate: security.Gatekeeper | None = None
        if keys is not None:
            self.gate = security.Gatekeeper(self.ctx, keys[1], logger=logging.getLogger("dair.security"))
            self.gate.start()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.MAXMSGSIZE, self.max_frame)
        self.router.setsockopt(zmq.LINGER, 0)
        # A peer's queue (either way) holds at most max_queued_msgs messages. Mandatory routing
        # makes a full (or gone) peer an error we count and answer `busy`, where a plain ROUTER
        # would drop the message silently and leave its request waiting forever.
        self.router.setsockopt(zmq.SNDHWM, self.max_queued)
        self.router.setsockopt(zmq.RCVHWM, self.max_queued)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            # A stage process that dies closes its TCP connection at once: acting on that (see
            # on_disconnect) saves most of the heartbeat timeout in a failover.
            self.router_mon: zmq.Socket | None = self.router.get_monitor_socket(
                zmq.EVENT_DISCONNECTED, addr=f"inproc://dair-bus-monitor-{id(self)}")
        except zmq.ZMQError:
            self.router_mon = None  # heartbeats alone find dead stages
        if keys is not None:
            security.server_socket_setup(self.router, keys[0])
        self.router.bind(bind)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            security.server_socket_setup(self.pub, keys[0])
        self.pub.bind(self.stats_bind)

    # --- helpers ------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        print(f"dair-bus: {msg}", file=sys.stderr, flush=True)

    def count(self, code: str) -> None:
        self.counters[code] = self.counters.get(code, 0) + 1

    def send(self, ident: bytes, header: dict[str, Any], buffers: list[Any] = ()) -> None:
        self.send_frames(ident, P.encode(header, buffers, self.lz4_min))

    def send_frames(self, ident: bytes, frames: list[Any]) -> bool:
        """False when the peer's queue is full (max_queued_msgs)."""
        node = self.registry.get(ident)
        size = _nbytes(frames)
        if node is not None:
            node.msgs_out += 1
            node.bytes_out += size
        try:
            # Forwarded frames are sent as they came (zero-copy) when big; small ones are copied,
            # which pyzmq does faster than tracking them.
            self.router.send_multipart([ident, *frames], copy=size < 1 << 16, flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            self.count("send_dropped")
            # Only a full queue is the sender's to answer; a peer that is not connected (its
            # connection just dropped) is the failover's: it registers again and replays.
            return e.errno != zmq.EAGAIN
        return True

    def tell(self, client: bytes, header: dict[str, Any]) -> None:
        """Queue a message for a client; `flush` sends them after the current message's stage
        traffic, so the next step is on its way before clients are served (and in order)."""
        self.to_clients.append((client, header))

    def flush(self) -> None:
        for client, header in self.to_clients:
            self.send(client, header)
        self.to_clients.clear()

    def reply_error(self, ident: bytes, code: str, msg: str, **extra: Any) -> None:
        self.count(code)
        self.send(ident, P.error(code, msg, **extra))

    def next_q(self) -> int:
        self._q += 1
        return self._q

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

    def model_info(self) -> dict[str, Any]:
        c = self.model.config
        title = str(getattr(self.model, "metadata", {}).get("general.name", "") or "")
        return {"path": str(self.model.path), "file": os.path.basename(str(self.model.path)),
                "name": title or os.path.basename(str(self.model.path)),
                "fingerprint": self.model.fingerprint, "n_layers": c.n_layers, "dim": c.dim,
                "vocab_size": c.vocab_size, "context_length": c.context_length,
                "max_context": self.context_limit()[0], "eos_ids": sorted(self.eos_ids),
                "bos_id": getattr(self.tok, "bos_id", None)}

    # --- loop ---------------------------------------------------------------------------------
    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        if self.router_mon is not None:
            poller.register(self.router_mon, zmq.POLLIN)
        next_hb = next_stats = time.monotonic()
        while self._running:
            due = min(next_hb, next_stats, self.held_until if self.held else next_hb)
            wait = max(0.0, due - time.monotonic())
            if poller.poll(min(wait, 0.2) * 1000):
                for _ in range(1000):  # bounded drain, so timers still run under a flood
                    try:
                        frames = self.router.recv_multipart(copy=False, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.on_frames(frames)
                    self.flush()
                while self.router_mon is not None and self.router_mon.poll(0):
                    self.on_disconnect(int(recv_monitor_message(self.router_mon)["value"]))
            now = time.monotonic()
            if self.plan_due and now >= self.plan_due:
                self.plan_due = 0.0
                self.replan()
            if self.held and now >= self.held_until:
                self.release_held()
            if now >= next_hb:
                self.heartbeat(now)
                next_hb = now + self.hb_s
            self.flush()
            if now >= next_stats:
                self.pub.send_multipart([P.STATS_TOPIC, P.encode({"type": "stats", **self.stats()}, (), 0)[0]])
                next_stats = now + self.stats_s
        if self.router_mon is not None:
            self.router.disable_monitor()
            self.router_mon.close(linger=0)
        self.router.close(linger=0)
        self.pub.close(linger=0)
        if self.gate is not None:
            self.gate.stop()

    def reload_keys(self) -> None:
        """Reread the allowed-key directories (SIGHUP); connections already up stay up."""
        if self.gate is not None:
            try:
                self.gate.reload()
                self.log(f"reloaded allowed keys: {len(self.gate.keys)}")
            except Exception as e:  # a bad key file must not take the bus down
                self.log(f"cannot reload allowed keys: {e}")

    def on_disconnect(self, fd: int) -> None:
        for node in self.registry.nodes.values():
            if node.fd == fd and fd >= 0 and node.state != DEAD:
                node.fd = -1
                node.dropped_at = time.monotonic()

    def heartbeat(self, now: float) -> None:
        for node in list(self.registry.nodes.values()):
            # A stage whose connection closed and that has not registered again with a new one
            # (which replaces this entry) within a heartbeat interval is gone: its process died.
            if node.dropped_at and now - node.dropped_at > self.hb_s and node.state != DEAD:
                node.state = DEAD
                what = fmt_span(node.first, node.last) if node.first >= 0 else "standby"
                self.log(f"stage {node.name} ({what}) closed its connection: declared dead")
                self.stage_lost(node)
                if any(n.place for n in self.registry.nodes.values()):
                    self.plan_due = now
        for node in self.registry.expire(now, self.hb_s * self.liveness):
            what = fmt_span(node.first, node.last) if node.first >= 0 else "standby"
            self.log(f"stage {node.name} ({what}) silent for {now - node.last_seen:.1f}s: declared dead")
            self.stage_lost(node)
            if any(n.place for n in self.registry.nodes.values()):
                self.plan_due = now  # the placed stages share the layers again
        for node in self.registry.nodes.values():
            if node.state != DEAD:
                self.send(node.ident, {"type": P.HEARTBEAT, "t": time.time()})
        silence = self.hb_s * self.liveness
        self.check_paused(now, 4 * silence)
        for s in list(self.sessions.values()):
            if s.req is not None:
                continue  # a client waiting for a stream is not asked to prove it is alive
            quiet = now - self.client_seen.get(s.client, now)
            if quiet > silence:
                self.log(f"closing session {s.sid}: its client has been silent for {quiet:.1f}s")
                self.close_session(s)
            elif now - s.last_active > self.session_idle_s:
                self.log(f"closing session {s.sid}: unused for {self.session_idle_s:.0f}s")
                self.close_session(s)
        for ident, seen in list(self.client_seen.items()):
            if now - seen > silence and not any(s.client == ident for s in self.sessions.values()):
                del self.client_seen[ident]

    # --- failover -----------------------------------------------------------------------------
    def stage_lost(self, dead: Node) -> None:
        """A stage died: every session's KV in its range is gone. Running requests pause until a
        standby has loaded the range, then replay their history (`resume_paused`); without a
        standby they end with `not_ready` and the sessions wait for a stage to cover the range."""
        if dead.first < 0:
            return  # a standby (or a stage still to be placed) held no KV: nothing to replay
        for s in self.sessions.values():
            s.kv_len = 0  # the next request of an idle session replays its history
            if s.req is not None and not s.paused:
                s.paused = True
                s.qs.clear()  # steps in flight are stale: `forward` drops them
        self.cover_gaps()
        replan = any(n.place and n.state != DEAD for n in self.registry.nodes.values())  # placed stages move
        if any(s.paused for s in self.sessions.values()) and not self._covering() and not self.registry.ready() \
                and not replan:
            self.fail_paused(P.E_NOT_READY, f"stage {dead.name} ({fmt_span(dead.first, dead.last)}) died and "
                             f"no standby stage is free; the session resumes (send the request again) "
                             f"once a stage covers {fmt_span(dead.first, dead.last)}")

    def _covering(self) -> bool:
        """Is a stage loading a range right now (a standby that was assigned one)?"""
        return any(n.state not in (DEAD, STANDBY) and not n.live and n.first >= 0
                   for n in self.registry.nodes.values())

    def cover_gaps(self) -> None:
        """Give each dead stage's uncovered range to a free standby, which loads it from its disk."""
        for dead in [n for n in self.registry.nodes.values() if n.state == DEAD and n.first >= 0]:
            if self.registry.conflicts(dead.first, dead.last):
                continue  # someone took (part of) it already
            free = self.registry.standbys()
            if not free:
                return
            sb = free[0]
            self.registry.remove(dead.ident)  # the dead stage's row goes once its range is retaken
            sb.first, sb.last, sb.state = dead.first, dead.last, LOADING
            self.log(f"assigning {fmt_span(dead.first, dead.last)} of dead {dead.name} to standby {sb.name}")
            self.send(sb.ident, {"type": P.ASSIGN, "node": sb.node, "first": sb.first, "last": sb.last,
                                 "heartbeat_ms": int(self.hb_s * 1000), "liveness": self.liveness})
            for s in self.sessions.values():  # after ASSIGN: the stage builds its engine first
                self.send(sb.ident, {"type": P.OPEN, "sid": s.sid})

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
                self.send_prompt(s, 0, s.history, "score", k=req.top_k)
            else:
                self.send_prompt(s, 0, s.history, "sample", p=dict(s.params))

    def check_paused(self, now: float, limit: float) -> None:
        """A request paused for `limit` with no stage loading the missing range (a re-plan that
        could not place it, say) ends with `not_ready` rather than hang."""
        for s in list(self.sessions.values()):
            if not s.paused or s.req is None:
                continue
            if not s.paused_t:
                s.paused_t = now
            elif now - s.paused_t > limit and not self._covering():
                self.finish_error(s, P.E_NOT_READY, f"paused {now - s.paused_t:.0f}s for a lost stage and no "
                                  "stage took its range: " + "; ".join(self.registry.problems()))

    def fail_paused(self, code: str, msg: str) -> None:
        for s in list(self.sessions.values()):
            if s.paused and s.req is not None:
                self.finish_error(s, code, msg)

    def on_frames(self, frames: list[Any]) -> None:
        ident = bytes(frames[0].buffer)
        body = frames[1:]
        node = self.registry.get(ident)
        if node is not None:
            node.msgs_in += 1
            node.bytes_in += _nbytes(body)
            node.last_seen = time.monotonic()
        try:
            header, buffers = P.decode(body, self.max_frame)
            t = header["type"]
            if self.gate is not None:
                # Least privilege: a client key cannot join as a stage or inject activations, and
                # a leaked stage key gives no client's access.
                role = security.peer_role(frames[1])
                if t not in (P.STAGE_TO_BUS if role == "stage" else P.CLIENT_TO_BUS):
                    need = "client" if role == "stage" else "stage"
                    raise P.ProtocolError(P.E_FORBIDDEN, f"{t} needs a {need} key, this peer has a "
                                          f"{role or 'unknown'} key")
            allowed = P.STAGE_TO_BUS if node is not None or t == P.REGISTER else P.CLIENT_TO_BUS
            if t not in allowed:
                if t in (P.ACT, P.TOKENS):
                    raise P.ProtocolError(P.E_NOT_REGISTERED, f"{t} from a peer that has not registered")
                raise P.ProtocolError(P.E_UNKNOWN_TYPE, f"{t!r} is not a message the bus takes from this peer")
        except P.ProtocolError as e:
            self.count("bad_frames")
            self.reply_error(ident, e.code, e.msg)
            return
        fd = -1
        if t in (P.REGISTER, P.HEARTBEAT) and (node is not None or t == P.REGISTER):
            try:
                fd = int(frames[-1].get(zmq.SRCFD))
            except (zmq.ZMQError, AttributeError, ValueError):
                fd = -1
        try:
            self.dispatch(ident, node, header, buffers, body)
            if fd >= 0 and (registered := self.registry.get(ident)) is not None:
                registered.fd, registered.dropped_at = fd, 0.0  # (re)connected: alive
        except P.ProtocolError as e:
            self.count("bad_frames")
            self.reply_error(ident, e.code, e.msg, sid=header.get("sid"),
                             req=header.get("req") if isinstance(header.get("req"), int) else None)
        except Exception:  # a bug must cost one request, never the bus
            self.count("internal")
            self.log(f"internal error on a {header.get('type')} message:\n{traceback.format_exc()}")
            req = header.get("req")
            self.reply_error(ident, "internal", "internal error in the bus (see its log)",
                             req=req if isinstance(req, int) else None)

    def dispatch(self, ident: bytes, node: Node | None, h: dict[str, Any], buffers: list[Any],
                 body: list[Any]) -> None:
        t = h["type"]
        if node is not None or t == P.REGISTER:
            {P.REGISTER: self.on_register, P.HEARTBEAT: self.on_stage_heartbeat, P.ACT: self.on_act,
             P.TOKENS: self.on_tokens, P.ERROR: self.on_stage_error}[t](ident, node, h, body)
            return
        self.client_seen[ident] = time.monotonic()
        handler = {P.HELLO: self.on_hello, P.STATUS: self.on_status, P.GENERATE: self.on_generate,
                   P.SCORE: self.on_score, P.CANCEL: self.on_cancel, P.SESSION_OPEN: self.on_session_open,
                   P.SESSION_CLOSE: self.on_session_close, P.HEARTBEAT: self.on_client_heartbeat,
                   P.ERROR: None}[t]
        if handler is not None:
            handler(ident, h)

    # --- placement (stages registered without --layers) --------------------------------------
    def replan(self) -> None:
        """Place the stages registered without --layers over the layers that no stage with explicit
        layers holds, in proportion to their announced budget x speed (engine.placement.place),
        and send ASSIGN to those whose range changes. Running requests pause and replay once the
        pipeline is whole again, as after a failover."""
        from dair.engine.placement import NodeCapacity, place
        from dair.errors import DairError

        now = time.monotonic()
        for n in [n for n in self.registry.nodes.values() if n.place and n.state == DEAD]:
            self.registry.remove(n.ident)
        placed = sorted((n for n in self.registry.nodes.values() if n.place),
                        key=lambda n: int(n.node[1:]) if n.node[1:].isdigit() else 0)
        if not placed:
            return
        n_layers = self.registry.n_layers
        held = [False] * n_layers
        for n in self.registry.live():
            if not n.place:
                for i in range(n.first, n.last + 1):
                    held[i] = True
        free = [i for i in range(n_layers) if not held[i]]
        if not free:
            return
        a, b = free[0], free[-1]
        if b - a + 1 != len(free):
            self.log("cannot place stages: the layers free of explicit stages are not one contiguous range")
            return
        if self._unit_bytes is None:
            from dair.engine.placement import model_unit_bytes

            self._unit_bytes = model_unit_bytes(self.model, kv_tokens=self.max_context)
        layer_bytes, head_bytes = self._unit_bytes
        span, head = layer_bytes[a:b + 1], head_bytes if b == n_layers - 1 else 0
        need = max([*span, head])
        for n in [n for n in placed if n.max_ram and n.max_ram < need]:
            msg = (f"stage {n.name}: budget {_fmt_budget(n.max_ram)} cannot hold even one unit of "
                   f"the layers to place ({_fmt_budget(need)}); give it at least that (--max-ram)")
            self.log(f"refused: {msg}")
            self.reply_error(n.ident, P.E_LAYER, msg, fatal=True)
            self.registry.remove(n.ident)
            placed.remove(n)
        placed = placed[:len(span)]
        if not placed:
            return
        budgets = [n.max_ram or None for n in placed]
        if None not in budgets and sum(budgets) < sum(span) + head:  # type: ignore[arg-type]
            # Too little RAM registered for the whole range to be resident: wait a while for more
            # stages, then place anyway (they stream their layers from disk).
            self.plan_waiting_since = self.plan_waiting_since or now
            if now - self.plan_waiting_since < PLAN_WAIT_S:
                self.plan_due = self.plan_waiting_since + PLAN_WAIT_S
                return
        self.plan_waiting_since = 0.0
        try:
            plan = place(span, [NodeCapacity(n.node, n.max_ram or None, n.speed) for n in placed], head)
        except DairError as e:
            self.log(f"cannot place stages: {e}")
            return
        by_name = {n.node: n for n in placed}
        moved = []
        for p in plan:
            n = by_name[p.name]
            first, last = p.first + a, p.last + a
            if (n.first, n.last) == (first, last):
                continue
            n.first, n.last, n.state = first, last, LOADING
            moved.append(n)
            self.send(n.ident, {"type": P.ASSIGN, "node": n.node, "first": first, "last": last,
                                "heartbeat_ms": int(self.hb_s * 1000), "liveness": self.liveness})
            for s in self.sessions.values():  # after ASSIGN: the stage builds its engine first
                self.send(n.ident, {"type": P.OPEN, "sid": s.sid})
        if not moved:
            return
        self.log("placed: " + ", ".join(f"{by_name[p.name].name} {fmt_span(p.first + a, p.last + a)} ({p.mode})"
                                        for p in plan))
        for s in self.sessions.values():
            s.kv_len = 0  # moved ranges hold no KV: the next request replays its history
            if s.req is not None and not s.paused:
                s.paused = True
                s.qs.clear()

    # --- stages -------------------------------------------------------------------------------
    def on_register(self, ident: bytes, node: Node | None, h: dict[str, Any], body: list[Any]) -> None:
        n_layers = self.registry.n_layers
        where = f"stage {h['name']} (pid {h['pid']} on {h['host']})"
        if h["fingerprint"] != self.model.fingerprint:
            msg = (f"{where} has a different model file (fingerprint {h['fingerprint'][:16]}), "
                   f"the bus serves {self.model.path} (fingerprint {self.model.fingerprint[:16]})")
            self.log(f"refused: {msg}")
            self.reply_error(ident, P.E_FINGERPRINT, msg, fatal=True)
            return
        if node is None and sum(1 for n in self.registry.nodes.values() if n.state != DEAD) >= self.max_stages:
            # Not fatal: a real stage retries after a heartbeat timeout, when a slot may be free.
            raise P.ProtocolError(P.E_BUSY, f"the bus has {self.max_stages} stages registered (max_stages)")
        place = bool(h.get("place"))  # started without --layers: the bus places it (replan)
        if place and h["first"] >= 0 and (not h["last"] < n_layers or [
                c for c in self.registry.conflicts(h["first"], h["last"], ignore=ident) if c.pid != h["pid"]]):
            h = {**h, "first": -1, "last": -1}  # its old range (before a bus restart) is taken: re-place it
        standby = bool(h.get("standby")) or (place and h["first"] < 0)
        if standby:  # no layers until the bus assigns a dead stage's range (cover_gaps)
            h = {**h, "first": -1, "last": -1, "state": STANDBY}
        elif not 0 <= h["first"] <= h["last"] < n_layers:
            msg = f"{where} asks for layers {h['first']}-{h['last']}; the model has layers 0-{n_layers - 1}"
            self.log(f"refused: {msg}")
            self.reply_error(ident, P.E_LAYER, msg, fatal=True)
            return
        # The same process registering again (new socket after losing us) replaces its old entry.
        for old in list(self.registry.nodes.values()):
            if old.pid == h["pid"] and old.host == h["host"] and old.ident != ident:
                self.registry.remove(old.ident)
        clash = self.registry.conflicts(h["first"], h["last"], ignore=ident)
        if not place and any(c.place for c in clash):
            # Explicit layers win over placed ones: the placed stages move (replan).
            clash = [c for c in clash if not c.place]
            self.plan_due = time.monotonic()
        if clash:
            owners = ", ".join(f"{c.name} ({fmt_span(c.first, c.last)})" for c in clash)
            msg = f"{where} asks for layers {h['first']}-{h['last']}, already owned by {owners}"
            self.log(f"refused: {msg}")
            self.reply_error(ident, P.E_OVERLAP, msg, fatal=True)
            return
        for old in list(self.registry.nodes.values()):  # a dead stage's row goes once its range is retaken
            if old.state == DEAD and not (h["last"] < old.first or h["first"] > old.last):
                self.registry.remove(old.ident)
        name = node.node if node is not None else self.registry.new_name()
        new = Node(ident=ident, node=name, name=h["name"], host=h["host"], pid=h["pid"], first=h["first"],
                   last=h["last"], threads=h["threads"], wire=h["wire"], state=h["state"], rss=h["rss"],
                   rss_at_register=h["rss"], max_ram=h.get("max_ram", 0),
                   user=(security.peer_user(body[0]) or "") if self.gate is not None else "",
                   place=place, speed=float(h.get("speed", 1.0) or 1.0))
        self.registry.add(new)
        self.send(ident, {"type": P.ASSIGN, "node": name, "first": h["first"], "last": h["last"],
                          "heartbeat_ms": int(self.hb_s * 1000), "liveness": self.liveness})
        if standby:
            if place:
                # Stages started together register within moments of each other: one plan for
                # all of them rather than a reload per arrival.
                self.plan_due = time.monotonic() + PLAN_SETTLE_S
                self.log(f"registered {h['name']} as {name}: to be placed (budget "
                         f"{_fmt_budget(new.max_ram)}, speed {new.speed:g})")
                return
            self.log(f"registered {h['name']} as {name}: standby")
            self.cover_gaps()
            return
        # A stage that joins late holds no KV: open every session on it and replay from history.
        # That includes running requests (a stage whose connection dropped registers again, and
        # the steps in flight were lost with the connection): they replay once the pipeline is whole.
        for s in self.sessions.values():
            self.send(ident, {"type": P.OPEN, "sid": s.sid})
            s.kv_len = 0
            if s.req is not None and not s.paused:
                s.paused = True
                s.qs.clear()
        if self.registry.ready() and h["state"] == "ready" and any(s.paused for s in self.sessions.values()):
            self.resume_paused()
        self.log(f"registered {h['name']} as {name}: {fmt_span(h['first'], h['last'])} ({h['state']})")

    def on_stage_heartbeat(self, ident: bytes, node: Node | None, h: dict[str, Any], body: list[Any]) -> None:
        assert node is not None
        if node.state == DEAD and not self.registry.conflicts(node.first, node.last, ignore=ident):
            self.log(f"stage {node.name} is back")
        stale = h.get("state") == STANDBY and node.first >= 0  # sent before it read its ASSIGN
        if "state" in h and not stale and (node.state != DEAD or not self.registry.conflicts(
                node.first, node.last, ignore=ident)):
            node.state = h["state"]
        st = h.get("stats") or {}
        node.stage_stats = st
        node.rss = int(st.get("rss", node.rss) or 0)
        node.cpu = float(st.get("cpu", node.cpu) or 0.0)
        if node.live and any(s.paused for s in self.sessions.values()) and self.registry.ready():
            self.resume_paused()

    def on_stage_error(self, ident: bytes, node: Node | None, h: dict[str, Any], body: list[Any]) -> None:
        self.count(f"stage_{h['code']}")
        sid = h.get("sid")
        s = self.sessions.get(sid) if sid else None
        if s is not None and s.req is not None:
            self.finish_error(s, h["code"], f"{node.name if node else 'stage'}: {h['msg']}")
        elif not sid:
            self.log(f"stage {node.name if node else '?'} reports {h['code']}: {h['msg']}")

    def _hop(self, node: Node, q: int, ct: float | None) -> None:
        sent = self.inflight.pop(q, None)
        if sent is not None and sent[0] == node.ident:
            node.hop_s.add(time.perf_counter() - sent[1])
        if ct is not None:
            node.compute_s.add(float(ct))

    def on_act(self, ident: bytes, node: Node | None, h: dict[str, Any], body: list[Any]) -> None:
        assert node is not None
        layer = h["layer"]
        if layer == 0 or layer >= self.registry.n_layers:
            raise P.ProtocolError(P.E_LAYER, f"act for layer {layer}: a stage can only pass on to layers "
                                  f"1-{self.registry.n_layers - 1}")
        q = h["segs"][0]["q"]
        self._hop(node, q, h.get("ct"))
        self.act_bytes += _nbytes(body[1:])
        self.act_rows += h["shape"][0]
        self.forward(layer, q, body, h["segs"])

    def forward(self, layer: int, q: int, frames: list[Any], segs: list[dict[str, Any]]) -> None:
        if not any((x := self.sessions.get(s["sid"])) is not None and s["q"] in x.qs for s in segs):
            # Every step in it is stale (a failover replays them, a cancel dropped them): passing
            # it on would move a replacement stage's KV cache to the wrong position.
            self.count("stale_dropped")
            return
        owner = self.registry.owner(layer)
        if owner is None:
            for s in segs:
                sess = self.sessions.get(s["sid"])
                if sess is not None and s["q"] in sess.qs:
                    self.finish_error(sess, P.E_NOT_READY, f"no live stage owns layer {layer}")
            return
        now = time.perf_counter()
        self.inflight[q] = (owner.ident, now)
        if len(self.inflight) > 1000:  # steps whose answer never came (a dead stage) must not pile up
            self.inflight = {k: v for k, v in self.inflight.items() if now - v[1] < 10.0}
        if not self.send_frames(owner.ident, frames):
            # The stage's queue is full (max_queued_msgs): the step is lost, so its requests end
            # now rather than wait for tokens that will never come.
            self.inflight.pop(q, None)
            for s in segs:
                sess = self.sessions.get(s["sid"])
                if sess is not None and s["q"] in sess.qs:
                    self.finish_error(sess, P.E_BUSY, f"stage {owner.name} has {self.max_queued} messages "
                                      "queued (max_queued_msgs)")

    def on_tokens(self, ident: bytes, node: Node | None, h: dict[str, Any], body: list[Any]) -> None:
        assert node is not None
        results = h["results"]
        q = h.get("q", results[0].get("q", -1) if results else -1)
        self._hop(node, q if isinstance(q, int) else -1, h.get("ct"))
        steps = []
        for r in results:
            s = self.sessions.get(r["sid"])
            if s is None or s.req is None or r.get("q") not in s.qs:
                continue  # cancelled, closed or superseded
            s.qs.discard(r["q"])
            try:
                if s.req.kind == "score":
                    self.finish_score(s, r)
                else:
                    step = self.on_token(s, r)
                    if step is not None:
                        steps.append(step)
            except (KeyError, TypeError, ValueError) as e:
                self.count(P.E_BAD_FIELD)
                self.finish_error(s, P.E_BAD_FIELD, f"malformed result from {node.name}: {e}")
        self.hold_or_send(node, steps)

    def hold_or_send(self, last: Node, steps: list[dict[str, Any]]) -> None:
        """Send the next decode steps, or hold them until another group comes back.

        Sessions whose steps travel apart (say, one group at stage 1 while another is at stage
        3) each pay a full pass over every stage's weights. When another step is at the last
        stage right now, it will be back within one stage's compute time: waiting for it merges
        both groups into one batch for good, which on a CPU costs little more than either alone.
        """
        now = time.perf_counter()  # the clock of self.inflight
        if self.held:
            steps = self.held + steps
            self.held = []
        elif steps and any(ident == last.ident and now - t < 1.0 for ident, t in self.inflight.values()):
            self.held = steps
            p50 = last.compute_s.pct(50) or 0.005
            self.held_until = time.monotonic() + min(0.05, max(0.002, 2.0 * p50))
            return
        self.send_step(steps)

    def release_held(self) -> None:
        steps, self.held = self.held, []
        self.send_step(steps)

    # --- sessions -----------------------------------------------------------------------------
    def send_step(self, segs: list[dict[str, Any]]) -> None:
        if not segs:
            return
        n = sum(len(s["ids"]) for s in segs)
        header = {"type": P.ACT, "layer": 0, "dtype": "ids", "shape": [n], "segs": segs}
        self.forward(0, segs[0]["q"], P.encode(header, (), self.lz4_min), segs)

    def make_step(self, s: Session, pos: int, ids: list[int], out: str, **extra: Any) -> dict[str, Any]:
        q = self.next_q()
        s.qs.add(q)
        return {"sid": s.sid, "pos": pos, "ids": ids, "q": q, "out": out, **extra}

    def send_prompt(self, s: Session, start: int, ids: list[int], out: str, **last_extra: Any) -> None:
        """ids[start:] as prefill steps of PREFILL_CHUNK tokens, sent at once (they pipeline)."""
        for a in range(start, len(ids), PREFILL_CHUNK):
            b = min(a + PREFILL_CHUNK, len(ids))
            final = b == len(ids)
            if out == "score":
                extra = {"k": last_extra["k"], **({} if final else {"nx": ids[b]})}
                self.send_step([self.make_step(s, a, ids[a:b], "score", **extra)])
            else:
                self.send_step([self.make_step(s, a, ids[a:b], out if final else "none",
                                               **(last_extra if final else {}))])

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

        merged = {**base, **{k: v for k, v in (update or {}).items() if k in PARAM_KEYS}}
        # NaN passes every range check (comparisons are false) and would sample garbage.
        bad = [k for k, v in merged.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise P.ProtocolError(P.E_BAD_FIELD, f"sampling settings: {', '.join(bad)} not a finite number")
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
        try:
            if "ids" in h:
                ids = list(h["ids"])
            elif "text" in h:
                ids = self.tok.encode(h["text"])
            else:
                msgs = h["messages"]
                if not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                           and isinstance(m.get("content"), str) for m in msgs):
                    raise P.ProtocolError(P.E_BAD_FIELD, "messages: each needs 'role' and 'content' strings")
                ids = self.tok.encode(self.tok.apply_chat_template(msgs, add_generation_prompt=True))
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
        if "sid" in h:
            s = self.client_session(ident, h["sid"])
            if s.req is not None:
                raise P.ProtocolError(P.E_BUSY, f"session {s.sid} is already generating")
            if h.get("params"):
                s.params = self.clean_params(s.params, h["params"])
        else:
            s = self.new_session(ident, h.get("params"), ephemeral=True)
        max_tokens = int(h.get("max_tokens") or self.default_max_tokens)
        stop = frozenset(int(i) for i in h["stop_ids"]) if "stop_ids" in h else self.eos_ids
        keep = min(common_prefix(s.history[:s.kv_len], ids), len(ids) - 1)
        s.history = list(ids)
        s.kv_len = keep
        s.last_active = time.monotonic()
        s.req = Request(req=h["req"], client=ident, kind="generate", max_tokens=max(0, max_tokens),
                        stop_ids=stop, stream=h.get("stream", True), n_prompt=len(ids),
                        n_new_prompt=len(ids) - keep, text=StreamDecoder(self.tok))
        if max_tokens <= 0:
            self.finish(s, "length")
            return
        self.send_prompt(s, keep, ids, "sample", p=dict(s.params))

    def on_token(self, s: Session, r: dict[str, Any]) -> dict[str, Any] | None:
        req = s.req
        assert req is not None
        tok, pos = int(r["id"]), int(r["pos"])
        now = time.perf_counter()
        if req.t_first is None:
            req.t_first = now
        s.kv_len = pos
        del s.history[pos:]
        s.history.append(tok)
        req.generated.append(tok)
        s.tokens += 1
        self.tokens_total += 1
        if tok in req.stop_ids:  # kept in ids (as the in-process engine does), never streamed
            self.finish(s, "eos")
            return None
        piece = req.text.feed(tok) if req.text is not None else ""
        if req.stream:
            self.tell(req.client, {"type": P.TOKEN, "req": req.req, "sid": s.sid, "id": tok, "pos": pos,
                                   "text": piece})
        if len(req.generated) >= req.max_tokens or pos + 1 >= self.context_limit()[0]:
            self.finish(s, "length")
            return None
        return self.make_step(s, pos, [tok], "sample")

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
        self.tell(req.client, {"type": P.DONE, "req": req.req, "sid": s.sid, "stop": stop,
                               "ids": req.generated, "text": self.tok.decode(req.generated),
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
        self.send_prompt(s, 0, ids, "score", k=h["top_k"])

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

    # --- clients ------------------------------------------------------------------------------
    def on_hello(self, ident: bytes, h: dict[str, Any]) -> None:
        self.send(ident, {"type": P.WELCOME, "model": self.model_info(),
                          "stats_port": int(self.stats_bind.rpartition(":")[2]),
                          "heartbeat_ms": int(self.hb_s * 1000), "liveness": self.liveness,
                          "stats_interval_ms": int(self.stats_s * 1000), "boot": self.boot})

    def on_client_heartbeat(self, ident: bytes, h: dict[str, Any]) -> None:
        # The answer tells a waiting client that the bus is alive, and by `boot` whether it is
        # still the bus that holds its sessions.
        if "state" in h:
            # A stage this bus does not know (it restarted): silence makes the stage register
            # again (Paranoid Pirate); an answer would keep it waiting forever.
            return
        self.send(ident, {"type": P.HEARTBEAT, "t": time.time(), "boot": self.boot})

    def on_status(self, ident: bytes, h: dict[str, Any]) -> None:
        self.send(ident, {"type": P.CLUSTER, "req": h["req"], **self.stats()})

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        nodes = sorted(self.registry.nodes.values(), key=lambda n: (n.first, n.name))
        return {"ready": self.registry.ready(), "problems": self.registry.problems(),
                "n_layers": self.registry.n_layers, "nodes": [n.to_stats(now) for n in nodes],
                "sessions": [s.to_stats() for s in self.sessions.values()], "model": self.model_info(),
                "totals": {"tokens": self.tokens_total, "act_bytes": self.act_bytes, "act_rows": self.act_rows,
                           "bytes_per_token_hop": self.act_bytes / self.act_rows if self.act_rows else 0.0},
                "counters": {**self.counters, **({"refused_keys": self.gate.refused} if self.gate else {})},
                "t": time.time()}
