"""dair-bus's event loop: sockets, dispatch, the stages' membership, routing, heartbeats, stats.

One thread, one ROUTER for stages and clients, one PUB for stats. It never touches activation
values: it reads each message's header, forwards the same frames (zero-copy) to the stage that
owns the next layer, and hands token results to the requests' rules (bus/requests.py), which
turn them into the next decode step.
"""
from __future__ import annotations

import logging
import os
import secrets
import sys
import time
import traceback
import uuid
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from dair import security
from dair.bus import protocol as P
from dair.bus.registry import DEAD, LIVE_STATES, LOADING, STANDBY, Node, Registry, fmt_span
from dair.bus.requests import Requests
from dair.bus.sessions import Session
from dair.bus.trust import RefusalBudget, Refused, check_entries
from dair.model import digests

# Wait this long after a stage to be placed registers before planning, and at most
# PLAN_WAIT_S for the registered budgets to hold the whole model (then plan anyway: they stream).
PLAN_SETTLE_S = 0.5
PLAN_WAIT_S = 10.0


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
        # Told to clients (welcome, heartbeat replies): a new value means a restarted bus, which
        # has lost every session, so a client waiting for tokens can give up at once.
        self.boot = uuid.uuid4().hex[:12]
        self.stats_s = bus["stats_interval_ms"] / 1000.0
        self.max_stages = int(bus.get("max_stages", 64))
        self.max_queued = int(bus.get("max_queued_msgs", 1000))
        self.max_frame = int(bus["max_frame_bytes"])
        self.lz4_min = int(cfg["stage"]["lz4_min_bytes"])
        self.registry = Registry(model.config.n_layers)
        # A stage's range serves only if its bytes match ours (digests of every tensor it uses).
        self.gate_bytes = digests.RangeGate(model).start()
        self.counters: dict[str, int] = {}
        self.inflight: dict[int, tuple[bytes, float]] = {}
        self.client_seen: dict[bytes, float] = {}
        self.budget = RefusalBudget()
        # The last time the loop had read every message waiting for it: silence is measured up
        # to here, so that a busy bus does not take its own backlog for dead stages.
        self.caught_up = time.monotonic()
        self.to_clients: list[tuple[bytes, dict[str, Any]]] = []
        self.act_bytes = 0
        self.act_rows = 0
        self.req = Requests(cfg, model, tokenizer, self.registry, send=self.send, tell=self.tell,
                            route=self.forward, busy_at=self.busy_at, count=self.count, log=self.log)
        self.sessions: dict[str, Session] = self.req.sessions  # the same dict: the requests own it
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

    def send_assign(self, n: Node) -> None:
        self.send(n.ident, {"type": P.ASSIGN, "node": n.node, "first": n.first, "last": n.last,
                            "heartbeat_ms": int(self.hb_s * 1000), "liveness": self.liveness,
                            "resume": n.resume})

    def busy_at(self, ident: bytes) -> bool:
        """Is a step at this stage right now (sent less than a second ago, not back yet)?"""
        now = time.perf_counter()
        return any(i == ident and now - t < 1.0 for i, t in self.inflight.values())

    def refuse(self, node: Node, n: int, msg: str) -> None:
        """A stage's message that is not its work: counted for the peer, charged to its budget,
        answered with one error (never acted on)."""
        node.refused += 1
        self.count("stage_refused")
        self.budget.charge(node.ident, max(1, n), time.monotonic())
        if node.refused <= 3:  # the first few name the offender; the counters keep the rest
            self.log(f"refused from stage {node.name}: {msg}")
        self.reply_error(node.ident, P.E_REFUSED, msg)

    def model_info(self) -> dict[str, Any]:
        c = self.model.config
        title = str(getattr(self.model, "metadata", {}).get("general.name", "") or "")
        return {"path": str(self.model.path), "file": os.path.basename(str(self.model.path)),
                "name": title or os.path.basename(str(self.model.path)),
                "fingerprint": self.model.fingerprint, "n_layers": c.n_layers, "dim": c.dim,
                "vocab_size": c.vocab_size, "context_length": c.context_length,
                "max_context": self.req.context_limit()[0], "eos_ids": sorted(self.req.eos_ids),
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
            due = min(next_hb, next_stats, self.req.held_until if self.req.held else next_hb)
            wait = max(0.0, due - time.monotonic())
            if poller.poll(min(wait, 0.2) * 1000):
                for _ in range(1000):  # bounded drain, so timers still run under a flood
                    try:
                        frames = self.router.recv_multipart(copy=False, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        self.caught_up = time.monotonic()
                        break
                    self.on_frames(frames)
                    self.flush()
                while self.router_mon is not None and self.router_mon.poll(0):
                    self.on_disconnect(int(recv_monitor_message(self.router_mon)["value"]))
            else:
                self.caught_up = time.monotonic()
            now = time.monotonic()
            if self.plan_due and now >= self.plan_due:
                self.plan_due = 0.0
                self.replan()
            if self.req.held and now >= self.req.held_until:
                self.req.release_held()
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
                self.count("stages_declared_dead")
                what = fmt_span(node.first, node.last) if node.first >= 0 else "standby"
                self.log(f"stage {node.name} ({what}) closed its connection: declared dead")
                self.stage_lost(node)
                if any(n.place for n in self.registry.nodes.values()):
                    self.plan_due = now
        for node in self.registry.expire(now, self.hb_s * self.liveness, self.caught_up):
            self.count("stages_declared_dead")
            what = fmt_span(node.first, node.last) if node.first >= 0 else "standby"
            self.log(f"stage {node.name} ({what}) silent for {now - node.last_seen:.1f}s: declared dead")
            self.stage_lost(node)
            if any(n.place for n in self.registry.nodes.values()):
                self.plan_due = now  # the placed stages share the layers again
        # The sessions the bus holds: a stage closes any other it has (one whose `close` it
        # missed while it was cut off or declared dead), so that no KV cache outlives its session.
        beat = {"type": P.HEARTBEAT, "t": time.time(), "sids": list(self.sessions)}
        for node in self.registry.nodes.values():
            if node.state != DEAD:
                self.send(node.ident, beat)
        self.budget.prune(now)
        silence = self.hb_s * self.liveness
        self.req.check_paused(now, 4 * silence, self._covering())
        self.req.expire_idle(now, silence, self.client_seen)
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
        self.req.forget_kv()
        self.cover_gaps()
        replan = any(n.place and n.state != DEAD for n in self.registry.nodes.values())  # placed stages move
        if any(s.paused for s in self.sessions.values()) and not self._covering() and not self.registry.ready() \
                and not replan:
            self.req.fail_paused(P.E_NOT_READY, f"stage {dead.name} ({fmt_span(dead.first, dead.last)}) died and "
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
            self.send_assign(sb)
            self.open_sessions(sb)  # after ASSIGN: the stage builds its engine first

    def open_sessions(self, node: Node) -> None:
        for s in self.sessions.values():
            self.send(node.ident, {"type": P.OPEN, "sid": s.sid})

    def on_frames(self, frames: list[Any]) -> None:
        ident = bytes(frames[0].buffer)
        body = frames[1:]
        node = self.registry.get(ident)
        now = time.monotonic()
        if node is not None:
            node.msgs_in += 1
            node.bytes_in += _nbytes(body)
            node.heard(now, 2.0 * self.hb_s)  # any traffic is life, a refused message too
        if self.budget.exhausted(ident, now):
            # It spent its budget of refused work: dropped unread (no decoding, no reply).
            self.count("rate_limited")
            if node is not None:
                node.rate_limited += 1
            return
        header: Any = None
        try:
            # Only a registered stage sends big headers (score results: positions x top_k); from
            # anyone else a header inflating beyond 4 MiB is refused before it costs decoding.
            header, buffers = P.decode(body, self.max_frame,
                                       P.MAX_HEADER_BYTES * (8 if node is not None else 1))
            t = header["type"]
            if self.gate is not None:
                # Least privilege: a client key cannot join as a stage or inject activations, and
                # a leaked stage key gives no client's access.
                role = security.peer_role(frames[1])
                if t not in (P.STAGE_TO_BUS if role == "stage" else P.CLIENT_TO_BUS):
                    if role == "stage":
                        why = (f"forbidden: this key is a stage key ({security.peer_user(frames[1])}); "
                               f"{t} needs a client key (one in the bus's client keys)")
                    else:
                        why = (f"forbidden: this key is a {role or 'unknown'} key; {t} needs a stage key "
                               "(one in the bus's stage keys)")
                    raise P.ProtocolError(P.E_FORBIDDEN, why)
                if node is not None and (security.peer_user(frames[1]) or "") != node.user:
                    # The routing id of a stage whose connection closed, reused by another key.
                    raise P.ProtocolError(P.E_FORBIDDEN, "forbidden: this connection's key is not the one "
                                          f"stage {node.name} registered with")
            allowed = P.STAGE_TO_BUS if node is not None or t == P.REGISTER else P.CLIENT_TO_BUS
            if t not in allowed:
                if t in (P.ACT, P.TOKENS):
                    raise P.ProtocolError(P.E_NOT_REGISTERED, f"{t} from a peer that has not registered")
                raise P.ProtocolError(P.E_UNKNOWN_TYPE, f"{t!r} is not a message the bus takes from this peer")
        except P.ProtocolError as e:
            self.count("bad_frames")
            self.budget.charge(ident, 1, now)
            # A key's role never changes: a stage refused for it must stop, not retry forever.
            fatal = e.code == P.E_FORBIDDEN and isinstance(header, dict) and header.get("type") == P.REGISTER
            self.reply_error(ident, e.code, e.msg, **({"fatal": True} if fatal else {}))
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
            self.budget.charge(ident, 1, now)
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
        r = self.req
        handler = {P.HELLO: self.on_hello, P.STATUS: self.on_status, P.GENERATE: r.on_generate,
                   P.SCORE: r.on_score, P.CANCEL: r.on_cancel, P.SESSION_OPEN: r.on_session_open,
                   P.SESSION_CLOSE: r.on_session_close, P.HEARTBEAT: self.on_client_heartbeat,
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

            self._unit_bytes = model_unit_bytes(self.model, kv_tokens=self.req.max_context)
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
            self.send_assign(n)
            self.open_sessions(n)  # after ASSIGN: the stage builds its engine first
        if not moved:
            return
        self.log("placed: " + ", ".join(f"{by_name[p.name].name} {fmt_span(p.first + a, p.last + a)} ({p.mode})"
                                        for p in plan))
        self.req.forget_kv()  # moved ranges hold no KV

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
        user = (security.peer_user(body[0]) or "") if self.gate is not None else ""
        prev = self.previous_connection(ident, h, user)
        place = bool(h.get("place"))  # started without --layers: the bus places it (replan)
        if place and h["first"] >= 0 and (not h["last"] < n_layers or [
                c for c in self.registry.conflicts(h["first"], h["last"], ignore=ident) if c is not prev]):
            h = {**h, "first": -1, "last": -1}  # its old range (before a bus restart) is taken: re-place it
        standby = bool(h.get("standby")) or (place and h["first"] < 0)
        if standby:  # no layers until the bus assigns a dead stage's range (cover_gaps)
            h = {**h, "first": -1, "last": -1, "state": STANDBY}
        elif not 0 <= h["first"] <= h["last"] < n_layers:
            msg = f"{where} asks for layers {h['first']}-{h['last']}; the model has layers 0-{n_layers - 1}"
            self.log(f"refused: {msg}")
            self.reply_error(ident, P.E_LAYER, msg, fatal=True)
            return
        # A peer's identity is its connection, never the name, pid or host it announces: the
        # range of a live stage goes only to that stage on a new connection (`prev`), or once the
        # owner's connection has closed (its death is established). Checked before anything goes.
        clash = [c for c in self.registry.conflicts(h["first"], h["last"], ignore=ident) if c is not prev]
        gone = [c for c in clash if c.dropped_at]
        clash = [c for c in clash if not c.dropped_at]
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
        if not standby:
            verdict, why = self.gate_bytes.admit(ident, h["first"], h["last"], h.get("digests"), where,
                                                 self.registry.nodes)
            if verdict == "wait":  # not fatal: the stage registers again after a heartbeat timeout
                raise P.ProtocolError(P.E_BUSY, why)
            if verdict == "refused":
                self.refuse_bytes(ident, why)
                return
        if prev is not None:  # the same stage, which lost its old connection: that entry goes
            self.registry.remove(prev.ident)
        for old in gone:
            old.state = DEAD
            self.count("stages_declared_dead")
            self.log(f"stage {old.name} ({fmt_span(old.first, old.last)}) closed its connection: declared dead")
        for old in list(self.registry.nodes.values()):  # a dead stage's row goes once its range is retaken
            if old.state == DEAD and not (h["last"] < old.first or h["first"] > old.last):
                self.registry.remove(old.ident)
        same = node if node is not None else prev
        name = same.node if same is not None else self.registry.new_name()
        new = Node(ident=ident, node=name, name=h["name"], host=h["host"], pid=h["pid"], first=h["first"],
                   last=h["last"], threads=h["threads"], wire=h["wire"], state=h["state"], rss=h["rss"],
                   rss_at_register=h["rss"], max_ram=h.get("max_ram", 0), user=user,
                   place=place, speed=float(h.get("speed", 1.0) or 1.0),
                   resume=same.resume if same is not None else secrets.token_hex(16))
        self.registry.add(new)
        self.send_assign(new)
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
        self.open_sessions(new)
        self.req.forget_kv()
        if self.registry.ready() and h["state"] == "ready" and any(s.paused for s in self.sessions.values()):
            self.req.resume_paused()
        self.log(f"registered {h['name']} as {name}: {fmt_span(h['first'], h['last'])} ({h['state']})")

    def previous_connection(self, ident: bytes, h: dict[str, Any], user: str) -> Node | None:
        """The entry of the stage registering here if it registered before on another connection:
        it proves that by the `resume` token the bus gave it over that connection only (and, with
        keys, by the same key). Nothing a stage says about itself (name, pid, host) counts."""
        token = h.get("resume")
        if not token:
            return None
        for n in self.registry.nodes.values():
            if n.ident != ident and n.resume and secrets.compare_digest(n.resume, token) and n.user == user:
                return n
        return None

    def refuse_bytes(self, ident: bytes, refusal: str) -> None:
        self.log(f"refused: {refusal}")
        self.reply_error(ident, P.E_FINGERPRINT, refusal, fatal=True)

    def on_stage_heartbeat(self, ident: bytes, node: Node | None, h: dict[str, Any], body: list[Any]) -> None:
        assert node is not None
        if self.gate_bytes.refused(ident):
            return  # told to exit; its last beats change nothing
        if h.get("state") in LIVE_STATES and node.first >= 0 and (verdict := self.gate_bytes.beat(
                ident, node.first, node.last, h, f"stage {node.name} (pid {node.pid} on {node.host})",
                self.registry.nodes))[0] != "ok":
            h = {k: v for k, v in h.items() if k != "state"}  # not serving (yet): it stays loading
            if verdict[0] == "refused":
                self.refuse_bytes(ident, verdict[1])
                node.state = DEAD  # its range goes to the next free standby
                self.plan_due = time.monotonic() if node.place else self.plan_due
                self.cover_gaps()
                return
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
            self.req.resume_paused()

    def on_stage_error(self, ident: bytes, node: Node | None, h: dict[str, Any], body: list[Any]) -> None:
        self.count(f"stage_{h['code']}")
        sid = h.get("sid")
        s = self.sessions.get(sid) if sid else None
        if s is not None and s.req is not None:
            self.req.finish_error(s, h["code"], f"{node.name if node else 'stage'}: {h['msg']}")
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
        if node.first < 0 or layer != node.last + 1:
            self.refuse(node, len(h["segs"]), f"act for layer {layer} from a stage that runs "
                        + (fmt_span(node.first, node.last) if node.first >= 0 else "no layers (standby)"))
            return
        if not self.stage_work(node, h["segs"], "act"):
            return
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
                    self.req.finish_error(sess, P.E_NOT_READY, f"no live stage owns layer {layer}")
            return
        for s in segs:  # from now on only `owner` may answer for these steps
            sess = self.sessions.get(s["sid"])
            if sess is not None and s["q"] in sess.qs:
                sess.qs[s["q"]] = owner.ident
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
                    self.req.finish_error(sess, P.E_BUSY, f"stage {owner.name} has {self.max_queued} messages "
                                      "queued (max_queued_msgs)")

    def on_tokens(self, ident: bytes, node: Node | None, h: dict[str, Any], body: list[Any]) -> None:
        assert node is not None
        results = h["results"]
        if node.first < 0 or node.last != self.registry.n_layers - 1:
            self.refuse(node, len(results), "tokens from a stage that does not run the last layer ("
                        + (fmt_span(node.first, node.last) if node.first >= 0 else "a standby") + ")")
            return
        q = h.get("q", results[0].get("q", -1) if results else -1)
        if not results:  # a prefill chunk that samples nothing: only its timing
            self._hop(node, q if isinstance(q, int) else -1, h.get("ct"))
            return
        accepted = self.stage_work(node, results, "tokens")
        if accepted is None:
            return
        self._hop(node, q if isinstance(q, int) else -1, h.get("ct"))
        steps = []
        for s, r in accepted:
            s.qs.pop(r["q"], None)  # once: a second result for this step is stale
            if s.req is None:
                continue  # cancelled or closed
            try:
                if s.req.kind == "score":
                    self.req.finish_score(s, r)
                else:
                    step = self.req.on_token(s, r)
                    if step is not None:
                        steps.append(step)
            except (KeyError, TypeError, ValueError) as e:
                self.count(P.E_BAD_FIELD)
                self.req.finish_error(s, P.E_BAD_FIELD, f"malformed result from {node.name}: {e}")
        self.req.hold_or_send(node, steps)

    def stage_work(self, node: Node, entries: list[dict[str, Any]], what: str) -> list[tuple[Session, dict]] | None:
        """The entries of a stage's message that answer steps the bus gave that stage (None and
        refused if any does not: see trust.check_entries); stale ones are counted and left out."""
        try:
            c = check_entries(self.sessions, node.ident, self.registry.held_by(node.ident, self.sessions.values()),
                              entries, what)
        except Refused as e:
            self.refuse(node, len(entries), str(e))
            return None
        if c.stale:
            node.stale += c.stale
            self.count("stale_results")
        if not c.accepted:
            self.count("stale_dropped")
            return None
        return c.accepted


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
                "totals": {"tokens": self.req.tokens_total, "act_bytes": self.act_bytes, "act_rows": self.act_rows,
                           "bytes_per_token_hop": self.act_bytes / self.act_rows if self.act_rows else 0.0},
                "counters": {**self.counters, **({"refused_keys": self.gate.refused} if self.gate else {})},
                "t": time.time()}
