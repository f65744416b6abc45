"""dair-bus's event loop: sockets, dispatch, routing, heartbeats, stats.

One thread, one ROUTER for stages and clients, one PUB for stats. It never touches activation
values: it reads each message's header, forwards the same frames (zero-copy) to the stage that
owns the next layer, and hands token results to the requests' rules (bus/requests.py), which
turn them into the next decode step. The stages' registrations, heartbeats and deaths go to the
membership's rules (bus/membership.py).
"""
from __future__ import annotations

import gc
import logging
import os
import sys
import time
import traceback
import uuid
from typing import Any

import zmq

from dair import gatekeeper
from dair.bus import protocol as P
from dair.bus.membership import Membership
from dair.bus.registry import Node, Registry, fmt_span
from dair.bus.requests import Requests
from dair.bus.sessions import Session
from dair.bus.trust import RefusalBudget, Refused, check_entries
from dair.model import digests


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
        self.stats_bind = P.stats_address(bind, connect=False)
        self.hb_s = bus["heartbeat_interval_ms"] / 1000.0
        self.liveness = int(bus["heartbeat_liveness"])
        # Told to clients (welcome, heartbeat replies): a new value means a restarted bus, which
        # has lost every session, so a client waiting for tokens can give up at once.
        self.boot = uuid.uuid4().hex[:12]
        self.stats_s = bus["stats_interval_ms"] / 1000.0
        self.max_queued = int(bus["max_queued_msgs"])
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
        self.members = Membership(cfg, model, self.registry, self.req, self.gate_bytes, send=self.send,
                                  reply_error=self.reply_error, count=self.count, log=self.log)
        self._running = True
        self.ctx = zmq.Context.instance()
        # keys: (bus secret key path, {role: allowed-keys dir}); the ZAP handler must run on the
        # sockets' context before they bind, or libzmq would admit any client key.
        self.gate: gatekeeper.Gatekeeper | None = None
        if keys is not None:
            self.gate = gatekeeper.Gatekeeper(self.ctx, keys[1], logger=logging.getLogger("dair.security"))
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
            gatekeeper.server_socket_setup(self.router, keys[0])
        self.router.bind(bind)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            gatekeeper.server_socket_setup(self.pub, keys[0])
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
        # What is alive now (the model's metadata, the vocabulary: tens of thousands of
        # containers) lives as long as the bus: kept out of the cyclic collector's walks, whose
        # pauses otherwise land on the token path (a young-generation pass took up to 6 ms).
        gc.freeze()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        if self.router_mon is not None:
            poller.register(self.router_mon, zmq.POLLIN)
        next_hb = next_stats = time.monotonic()
        while self._running:
            due = min(next_hb, next_stats, self.req.held_until if self.req.held else next_hb)
            wait = max(0.0, due - time.monotonic())
            ready = dict(poller.poll(min(wait, 0.2) * 1000))
            if ready:
                # Closed connections first: a stage that reconnects right after closing its socket
                # must find its old connection already dropped, not owning its range.
                if self.router_mon is not None and self.router_mon in ready:
                    while self.router_mon.poll(0):
                        self.members.on_disconnect(P.monitor_event(self.router_mon)[1])
                if self.router in ready:
                    self.drain()
            else:
                self.caught_up = time.monotonic()
            now = time.monotonic()
            if self.members.plan_due and now >= self.members.plan_due:
                self.members.plan_due = 0.0
                self.members.replan()
            if self.req.held and now >= self.req.held_until:
                self.req.release_held()
            if now >= next_hb:
                self.heartbeat(now)
                next_hb = now + self.hb_s
            self.flush()
            if now >= next_stats:
                self.pub.send_multipart([P.STATS_TOPIC, P.encode({"type": P.STATS, **self.stats()}, (), 0)[0]])
                next_stats = now + self.stats_s
        if self.router_mon is not None:
            self.router.disable_monitor()
            self.router_mon.close(linger=0)
        self.router.close(linger=0)
        self.pub.close(linger=0)
        if self.gate is not None:
            self.gate.stop()

    def drain(self) -> None:
        """Handle the messages waiting on the ROUTER: at most 1000, so that timers still run
        under a flood. EVENTS tells when the queue is empty (no zmq.Again raised per wake-up)."""
        router = self.router
        for _ in range(1000):
            try:
                frames = router.recv_multipart(copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                self.caught_up = time.monotonic()
                return
            self.on_frames(frames)
            self.flush()
            if not router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self.caught_up = time.monotonic()
                return

    def reload_keys(self) -> None:
        """Reread the allowed-key directories (SIGHUP); connections already up stay up."""
        if self.gate is not None:
            try:
                self.gate.reload()
                self.log(f"reloaded allowed keys: {len(self.gate.keys)}")
            except Exception as e:  # a bad key file must not take the bus down
                self.log(f"cannot reload allowed keys: {e}")

    def heartbeat(self, now: float) -> None:
        self.members.heartbeat(now, self.caught_up)
        self.budget.prune(now)
        silence = self.hb_s * self.liveness
        self.req.check_paused(now, 4 * silence, self.members.covering())
        self.req.expire_idle(now, silence, self.client_seen)
        for ident, seen in list(self.client_seen.items()):
            if now - seen > silence and not any(s.client == ident for s in self.sessions.values()):
                del self.client_seen[ident]

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
                role = gatekeeper.peer_role(frames[1])
                if t not in (P.STAGE_TO_BUS if role == "stage" else P.CLIENT_TO_BUS):
                    if role == "stage":
                        why = (f"forbidden: this key is a stage key ({gatekeeper.peer_user(frames[1])}); "
                               f"{t} needs a client key (one in the bus's client keys)")
                    else:
                        why = (f"forbidden: this key is a {role or 'unknown'} key; {t} needs a stage key "
                               "(one in the bus's stage keys)")
                    raise P.ProtocolError(P.E_FORBIDDEN, why)
                if node is not None and (gatekeeper.peer_user(frames[1]) or "") != node.user:
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
            self.members.connected(ident, fd)
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

    # --- stages -------------------------------------------------------------------------------
    def on_register(self, ident: bytes, node: Node | None, h: dict[str, Any], body: list[Any]) -> None:
        user = (gatekeeper.peer_user(body[0]) or "") if self.gate is not None else ""
        self.members.on_register(ident, node, h, user)

    def on_stage_heartbeat(self, ident: bytes, node: Node | None, h: dict[str, Any], body: list[Any]) -> None:
        assert node is not None
        self.members.on_heartbeat(ident, node, h)

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
        q = h["segs"][0].step_id
        self._hop(node, q, h.get("ct"))
        self.act_bytes += _nbytes(body[1:])
        self.act_rows += h["shape"][0]
        self.forward(layer, q, body, h["segs"])

    def forward(self, layer: int, q: int, frames: list[Any], steps: list[P.Step]) -> None:
        """Send an `act` (its frames as they are) to the owner of `layer`; q: its first step's id."""
        live = [(sess, st) for st in steps
                if (sess := self.sessions.get(st.sid)) is not None and st.step_id in sess.qs]
        if not live:
            # Every step in it is stale (a failover replays them, a cancel dropped them): passing
            # it on would move a replacement stage's KV cache to the wrong position.
            self.count("stale_dropped")
            return
        owner = self.registry.owner(layer)
        if owner is None:
            for sess, st in live:
                if st.step_id in sess.qs:
                    self.req.finish_error(sess, P.E_NOT_READY, f"no live stage owns layer {layer}")
            return
        for sess, st in live:  # from now on only `owner` may answer for these steps
            sess.qs[st.step_id] = owner.ident
        now = time.perf_counter()
        self.inflight[q] = (owner.ident, now)
        if len(self.inflight) > 1000:  # steps whose answer never came (a dead stage) must not pile up
            self.inflight = {k: v for k, v in self.inflight.items() if now - v[1] < 10.0}
        if not self.send_frames(owner.ident, frames):
            # The stage's queue is full (max_queued_msgs): the step is lost, so its requests end
            # now rather than wait for tokens that will never come.
            self.inflight.pop(q, None)
            for sess, st in live:
                if st.step_id in sess.qs:
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
        if not results:  # nothing to act on; its timing still counts
            self._hop(node, q if isinstance(q, int) else -1, h.get("ct"))
            return
        accepted = self.stage_work(node, results, "tokens")
        if accepted is None:
            return
        self._hop(node, q if isinstance(q, int) else -1, h.get("ct"))
        steps = []
        for s, r in accepted:
            if r["q"] in s.silent:  # a prefill chunk that passed the last stage: done, nothing more
                self.req.on_silent_result(s, r["q"])
                continue
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

    def stage_work(self, node: Node, entries: list[Any], what: str) -> list[tuple[Session, Any]] | None:
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
                "n_layers": self.registry.n_layers, "nodes": [n.to_stats(now).to_wire() for n in nodes],
                "sessions": [s.to_stats() for s in self.sessions.values()], "model": self.model_info(),
                "totals": {"tokens": self.req.tokens_total, "act_bytes": self.act_bytes, "act_rows": self.act_rows,
                           "bytes_per_token_hop": self.act_bytes / self.act_rows if self.act_rows else 0.0},
                "counters": {**self.counters, **({"refused_keys": self.gate.refused} if self.gate else {})},
                "t": time.time()}
