"""The stages' membership as the bus keeps it: register, heartbeat, disconnect, expiry, loss,
covering a dead range with a standby, placing stages started without layers, ASSIGN.

This object owns the stages' rules and no socket: it talks through the callbacks it is given
(`send` to a stage, `reply_error` to any peer), so its rules run in one process in tests
(tests/unit/test_membership.py). `Broker` owns the sockets and hands it the stages' `register` and
`heartbeat` messages, the monitor's disconnect events and the heartbeat timer.
"""
from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

from dair.bus import protocol as P
from dair.bus.registry import Node, Registry, fmt_span
from dair.bus.requests import Requests
from dair.bus.sessions import Session
from dair.bus.states import DEAD, LIVE, LOADING, READY, STANDBY
from dair.model import digests
from dair.units import format_bytes

# Wait this long after a stage to be placed registers before planning, and at most
# PLAN_WAIT_S for the registered budgets to hold the whole model (then plan anyway: they stream).
PLAN_SETTLE_S = 0.5
PLAN_WAIT_S = 10.0

Send = Callable[[bytes, dict[str, Any]], None]


def fmt_budget(n: int) -> str:
    return format_bytes(n) if n else "unlimited"


class Membership:
    def __init__(self, cfg: dict[str, Any], model: Any, registry: Registry, requests: Requests,
                 gate_bytes: digests.RangeGate, *, send: Send,
                 reply_error: Callable[..., None], count: Callable[[str], None],
                 log: Callable[[str], None]) -> None:
        """send(stage, header): a message to a stage; reply_error(peer, code, msg, **extra): an
        error to a peer (counted); gate_bytes: which connections showed their range's bytes."""
        bus = cfg["bus"]
        self.model = model
        self.registry = registry
        self.req = requests
        self.gate_bytes = gate_bytes
        self.send, self.reply_error, self.count, self.log = send, reply_error, count, log
        self.hb_s = bus["heartbeat_interval_ms"] / 1000.0
        self.liveness = int(bus["heartbeat_liveness"])
        self.max_stages = int(bus["max_stages"])
        # Placement of stages started without --layers (replan): when to plan next (0 = no plan
        # pending), and since when budgets too small for the model have been waiting for more.
        self.plan_due = 0.0
        self.plan_waiting_since = 0.0
        self._unit_bytes: tuple[list[int], int] | None = None

    @property
    def sessions(self) -> dict[str, Session]:
        return self.req.sessions

    # --- the state changes, each written once ---------------------------------------------------
    def assign(self, n: Node, first: int, last: int, state: str = LOADING) -> None:
        """Give `n` the range first..last: ASSIGN, then OPEN every session on it (after ASSIGN: the
        stage builds its engine first). A standby's range is -1..-1 and holds no sessions."""
        n.first, n.last, n.state = first, last, state
        self.send(n.ident, {"type": P.ASSIGN, "node": n.node, "first": n.first, "last": n.last,
                            "heartbeat_ms": int(self.hb_s * 1000), "liveness": self.liveness,
                            "resume": n.resume})
        if first >= 0:
            for s in self.sessions.values():
                self.send(n.ident, {"type": P.OPEN, "sid": s.sid})

    def pause_all(self, reason: str) -> None:
        """What the stages hold of every session is gone (`reason`): running requests pause and
        replay once the pipeline is whole (see Requests.forget_kv)."""
        running = sum(1 for s in self.sessions.values() if s.req is not None and not s.paused)
        if running:
            self.log(f"pausing {running} running request(s): {reason}")
        self.req.forget_kv()

    def declare_dead(self, node: Node, why: str) -> None:
        node.state = DEAD
        self.count("stages_declared_dead")
        what = fmt_span(node.first, node.last) if node.first >= 0 else "standby"
        self.log(f"stage {node.name} ({what}) {why}: declared dead")

    def connected(self, ident: bytes, fd: int) -> None:
        """A registered stage's message came over the connection with bus-side socket `fd`."""
        if fd >= 0 and (n := self.registry.get(ident)) is not None:
            n.fd, n.dropped_at = fd, 0.0  # (re)connected: alive

    # --- connections and heartbeats -----------------------------------------------------------
    def on_disconnect(self, fd: int) -> None:
        """The connection with bus-side socket `fd` closed (the ROUTER's monitor saw it)."""
        for node in self.registry.nodes.values():
            if node.fd == fd and fd >= 0 and node.state != DEAD:
                node.fd = -1
                node.dropped_at = time.monotonic()

    def heartbeat(self, now: float, caught_up: float) -> None:
        """The heartbeat timer: declare dead the stages whose connection closed or that fell
        silent (silence measured up to `caught_up`, see Registry.expire), then beat the rest."""
        for node in list(self.registry.nodes.values()):
            # A stage whose connection closed and that has not registered again with a new one
            # (which replaces this entry) within a heartbeat interval is gone: its process died.
            if node.dropped_at and now - node.dropped_at > self.hb_s and node.state != DEAD:
                self.declare_dead(node, "closed its connection")
                self.stage_lost(node)
                if any(n.place for n in self.registry.nodes.values()):
                    self.plan_due = now
        for node in self.registry.expire(now, self.hb_s * self.liveness, caught_up):
            self.declare_dead(node, f"silent for {now - node.last_seen:.1f}s")
            self.stage_lost(node)
            if any(n.place for n in self.registry.nodes.values()):
                self.plan_due = now  # the placed stages share the layers again
        # The sessions the bus holds: a stage closes any other it has (one whose `close` it
        # missed while it was cut off or declared dead), so that no KV cache outlives its session.
        beat = {"type": P.HEARTBEAT, "t": time.time(), "sids": list(self.sessions)}
        for node in self.registry.nodes.values():
            if node.state != DEAD:
                self.send(node.ident, beat)

    # --- failover -----------------------------------------------------------------------------
    def stage_lost(self, dead: Node) -> None:
        """A stage died: every session's KV in its range is gone. Running requests pause until a
        standby has loaded the range, then replay their history (`resume_paused`); without a
        standby they end with `not_ready` and the sessions wait for a stage to cover the range."""
        if dead.first < 0:
            return  # a standby (or a stage still to be placed) held no KV: nothing to replay
        self.pause_all(f"stage {dead.name} ({fmt_span(dead.first, dead.last)}) died")
        self.cover_gaps()
        replan = any(n.place and n.state != DEAD for n in self.registry.nodes.values())  # placed stages move
        if any(s.paused for s in self.sessions.values()) and not self.covering() and not self.registry.ready() \
                and not replan:
            self.req.fail_paused(P.E_NOT_READY, f"stage {dead.name} ({fmt_span(dead.first, dead.last)}) died and "
                             f"no standby stage is free; the session resumes (send the request again) "
                             f"once a stage covers {fmt_span(dead.first, dead.last)}")

    def covering(self) -> bool:
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
            sb = free[0]  # the first standby to register takes it
            self.registry.remove(dead.ident)  # the dead stage's row goes once its range is retaken
            self.log(f"assigning {fmt_span(dead.first, dead.last)} of dead {dead.name} to standby {sb.name}")
            self.assign(sb, dead.first, dead.last)

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
        # Each stage's KV cache counted at its own type: the layers' weights plus its own per layer.
        kv_cfg = self._kv_layer("")
        kv_of = {n.ident: self._kv_layer(n.kv_type) for n in placed}
        weights = [x - kv_cfg for x in span]
        for n in [n for n in placed if n.max_ram and n.max_ram < max([max(weights) + kv_of[n.ident], head])]:
            need = max([max(weights) + kv_of[n.ident], head])
            msg = (f"stage {n.name}: budget {fmt_budget(n.max_ram)} cannot hold even one unit of "
                   f"the layers to place ({fmt_budget(need)}); give it at least that (--max-ram)")
            self.log(f"refused: {msg}")
            self.reply_error(n.ident, P.E_LAYER, msg, fatal=True)
            self.registry.remove(n.ident)
            placed.remove(n)
        placed = placed[:len(span)]
        if not placed:
            return
        budgets = [n.max_ram or None for n in placed]
        least = sum(weights) + len(weights) * min(kv_of[n.ident] for n in placed)
        if None not in budgets and sum(budgets) < least + head:  # type: ignore[arg-type]
            # Too little RAM registered for the whole range to be resident: wait a while for more
            # stages, then place anyway (they stream their layers from disk).
            self.plan_waiting_since = self.plan_waiting_since or now
            if now - self.plan_waiting_since < PLAN_WAIT_S:
                self.plan_due = self.plan_waiting_since + PLAN_WAIT_S
                return
        self.plan_waiting_since = 0.0
        try:
            plan = place(weights, [NodeCapacity(n.node, n.max_ram or None, n.speed, kv_layer=kv_of[n.ident])
                                   for n in placed], head)
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
            moved.append(n)
            self.assign(n, first, last)
        if not moved:
            return
        self.log("placed: " + ", ".join(f"{by_name[p.name].name} {fmt_span(p.first + a, p.last + a)} ({p.mode})"
                                        for p in plan))
        self.pause_all("placed ranges moved")  # moved ranges hold no KV

    def _kv_layer(self, kv_type: str) -> int:
        """KV bytes per layer of one full-length session in a cache of kv_type ("" or a type this
        model cannot use: the config's)."""
        from dair.engine.placement import kv_reserve
        from dair.errors import DairError

        try:
            return kv_reserve(self.model, kv_type or None, kv_tokens=self.req.max_context)[0]
        except DairError:
            return kv_reserve(self.model, None, kv_tokens=self.req.max_context)[0]

    # --- stages -------------------------------------------------------------------------------
    def on_register(self, ident: bytes, node: Node | None, h: dict[str, Any], user: str) -> None:
        """A stage's `register` over connection `ident` (`node`: its entry if this connection
        registered before), `user` the CURVE key it joined with ("" without keys)."""
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
            self.declare_dead(old, "closed its connection")
        for old in list(self.registry.nodes.values()):  # a dead stage's row goes once its range is retaken
            if old.state == DEAD and not (h["last"] < old.first or h["first"] > old.last):
                self.registry.remove(old.ident)
        same = node if node is not None else prev
        name = same.node if same is not None else self.registry.new_name()
        new = Node(ident=ident, node=name, name=h["name"], host=h["host"], pid=h["pid"], first=h["first"],
                   last=h["last"], threads=h["threads"], wire=h["wire"], state=h["state"], rss=h["rss"],
                   rss_at_register=h["rss"], max_ram=h.get("max_ram", 0), user=user,
                   place=place, speed=float(h.get("speed", 1.0) or 1.0), kv_type=str(h.get("kv_type", "")),
                   resume=same.resume if same is not None else secrets.token_hex(16))
        self.registry.add(new)
        if standby:
            if place:
                # Stages started together register within moments of each other: one plan for
                # all of them rather than a reload per arrival.
                self.assign(new, -1, -1, STANDBY)
                self.plan_due = time.monotonic() + PLAN_SETTLE_S
                self.log(f"registered {h['name']} as {name}: to be placed (budget "
                         f"{fmt_budget(new.max_ram)}, speed {new.speed:g})")
                return
            self.assign(new, -1, -1, STANDBY)
            self.log(f"registered {h['name']} as {name}: standby")
            self.cover_gaps()
            return
        # A stage that joins late holds no KV: open every session on it and replay from history.
        # That includes running requests (a stage whose connection dropped registers again, and
        # the steps in flight were lost with the connection): they replay once the pipeline is whole.
        self.assign(new, new.first, new.last, new.state)
        self.pause_all(f"stage {new.name} joined ({fmt_span(new.first, new.last)})")
        if self.registry.ready() and h["state"] == READY and any(s.paused for s in self.sessions.values()):
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

    def on_heartbeat(self, ident: bytes, node: Node, h: dict[str, Any]) -> None:
        """A registered stage's heartbeat: its state (admitted by its range's bytes) and stats."""
        if self.gate_bytes.refused(ident):
            return  # told to exit; its last beats change nothing
        if h.get("state") in LIVE and node.first >= 0 and (verdict := self.gate_bytes.beat(
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
