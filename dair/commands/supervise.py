"""`dair up`'s supervisor: the cluster outlives any one of its processes.

Each child (the bus, each stage, each standby) is a slot. When a child exits, one line says
which slot, its layers and how it ended; the rest keep running so that the bus can give the dead
stage's range to a standby. The slot is restarted after a back-off that doubles with each death
within a window (a dead stage comes back as a standby, a dead bus as the bus on the same port,
which the stages find again by themselves); after `give_up_deaths` deaths within the window it is
left dead, loudly. Settings: config.toml [up].
"""
from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dair.bus.local import LocalCluster
from dair.config import UpConfig, section
from dair.errors import DairError

Span = tuple[int, int]
POLL_S = 0.2  # how often children are checked; a restart is never due sooner than this anyway
LAYERS_EVERY_S = 1.0  # how often the bus is asked which stage holds which layers (for the exit lines)


@dataclass(frozen=True)
class RestartPolicy:
    delay_s: float
    delay_max_s: float
    give_up_deaths: int
    window_s: float

    @classmethod
    def from_config(cls, up: dict[str, Any] | UpConfig) -> RestartPolicy:
        """From config.toml's [up] (its typed view, or the section's dict)."""
        u = up if isinstance(up, UpConfig) else section(UpConfig, {"up": up})
        p = cls(u.restart_delay_s, u.restart_delay_max_s, u.give_up_deaths, u.give_up_window_s)
        if p.delay_s <= 0 or p.delay_max_s < p.delay_s or p.give_up_deaths < 1 or p.window_s <= 0:
            raise DairError(f"config [up]: expected 0 < restart_delay_s <= restart_delay_max_s, give_up_deaths "
                            f">= 1 and give_up_window_s > 0, got {p}")
        return p

    def delay(self, deaths: int) -> float:
        """Back-off before the restart that follows the deaths-th death within the window."""
        return min(self.delay_max_s, self.delay_s * 2 ** max(0, deaths - 1))


@dataclass
class Slot:
    name: str
    layers: Span | None  # the range it was started with; None for the bus and standbys
    proc: subprocess.Popen
    secret_key: str | None = None
    deaths: deque[float] = field(default_factory=deque)
    restart_at: float | None = None
    gave_up: bool = False

    @property
    def is_bus(self) -> bool:
        return self.name == "bus"

    def describe(self) -> str:
        what = "" if self.is_bus else f"layers {self.layers[0]}-{self.layers[1]}, " if self.layers else "standby, "
        return f"{self.name} ({what}pid {self.proc.pid})"


def how_it_ended(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class SupervisedCluster(LocalCluster):
    """A LocalCluster whose stages each have a name and (with keys) a key pair of their own."""

    def start_bus(self) -> subprocess.Popen:
        self.bus = self._spawn(self.bus_command())
        return self.bus

    def start_stage(self, slot_name: str, layers: Span | None, secret_key: str | None) -> subprocess.Popen:
        # Flags given after stage_command's own win (argparse keeps the last).
        extra = ["--name", slot_name] + (["--secret-key", secret_key] if secret_key else [])
        first, last = layers if layers else (-1, -1)
        return self.add_stage(first, last, extra)


class Supervisor:
    """Starts the slots, watches them on a thread of its own, and stops everything on `stop()`."""

    def __init__(self, cluster: SupervisedCluster, split: list[Span], standby: int, policy: RestartPolicy,
                 say: Callable[[str], None], stage_key: Callable[[str], str | None] = lambda name: None) -> None:
        self.cluster = cluster
        self.policy = policy
        self.say = say
        self.slots: list[Slot] = []
        self._plan = [(f"stage{i}", s) for i, s in enumerate(split)] + \
                     [(f"stage{len(split) + j}", None) for j in range(standby)]
        self._stage_key = stage_key
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.fatal: str | None = None  # set when the bus is given up on: the cluster cannot serve

    def start(self) -> None:
        self.slots.append(Slot("bus", None, self.cluster.start_bus()))
        for name, layers in self._plan:
            key = self._stage_key(name)
            self.slots.append(Slot(name, layers, self.cluster.start_stage(name, layers, key), key))

    def check_started(self) -> bool:
        """For wait_ready: a child that exits before the pipeline is ready is a start-up failure
        (a bad flag, model or key), reported as the error rather than restarted."""
        for s in self.slots:
            if s.proc.poll() is not None:
                raise DairError(f"{s.describe()} {how_it_ended(s.proc.returncode)} before the pipeline was ready")
        return True

    def watch(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dair-up-supervisor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from dair.bus.client import BusClient

        client = BusClient(self.cluster.addr, timeout=1.0, keys=self.cluster.client_keys())
        next_layers = 0.0
        try:
            while not self._stopping.wait(POLL_S):
                now = time.monotonic()
                if now >= next_layers:
                    next_layers = now + LAYERS_EVERY_S
                    self._learn_layers(client)
                with self._lock:
                    if self._stopping.is_set():
                        return
                    try:
                        self.tick(time.monotonic())
                    except Exception as e:  # noqa: BLE001 - e.g. a fork that failed: try again next round
                        # This thread must live on: the children it started get SIGTERM when it
                        # ends (PR_SET_PDEATHSIG follows the thread that forked them).
                        self.say(f"dair up: error while supervising: {e}")
        finally:
            client.close()

    def _learn_layers(self, client: Any) -> None:
        """Which range each stage serves now, as the bus says: a standby may have taken one over."""
        from dair.bus.stats import nodes_of

        try:
            nodes = nodes_of(client.status(timeout=1.0))
        except Exception:  # the bus is busy, restarting or gone: keep what was known
            return
        by_pid = {n.pid: n for n in nodes if not n.dead}
        for s in self.slots:
            n = by_pid.get(s.proc.pid)
            if n is not None and not s.is_bus and s.proc.poll() is None:
                s.layers = (n.first, n.last) if n.has_range else None

    def tick(self, now: float) -> None:
        """One round: report and schedule the newly dead, restart those that are due."""
        for s in self.slots:
            if s.gave_up:
                continue
            if s.restart_at is None and s.proc.poll() is not None:
                self._on_death(s, now)
            elif s.restart_at is not None and now >= s.restart_at:
                self._restart(s)

    def _on_death(self, s: Slot, now: float) -> None:
        s.deaths.append(now)
        while s.deaths and now - s.deaths[0] > self.policy.window_s:
            s.deaths.popleft()
        n = len(s.deaths)
        ended = f"dair up: {s.describe()} {how_it_ended(s.proc.returncode)}"
        if n >= self.policy.give_up_deaths:
            s.gave_up = True
            self.say(f"{ended}; it died {n} times within {self.policy.window_s:g}s: giving up on {s.name}, "
                     "it is not restarted again")
            if s.is_bus:
                self.fatal = f"the bus died {n} times within {self.policy.window_s:g}s"
            return
        delay = self.policy.delay(n)
        s.restart_at = now + delay
        again = "the bus on the same port" if s.is_bus else "a standby"
        self.say(f"{ended}; restarting it as {again} in {delay:g}s")

    def _restart(self, s: Slot) -> None:
        s.restart_at = None
        if s.is_bus:
            s.proc = self.cluster.start_bus()
        else:
            s.layers = None  # back as a standby: the bus gives it a range that needs one
            s.proc = self.cluster.start_stage(s.name, None, s.secret_key)
        self.say(f"dair up: restarted {s.describe()}")

    def stop(self) -> None:
        """No more restarts, then SIGTERM to every child (SIGKILL after a grace period)."""
        self._stopping.set()
        with self._lock:  # waits for a tick in progress, so no child starts after this
            pass
        if self._thread is not None:
            self._thread.join(5)
        self.cluster.stop()
