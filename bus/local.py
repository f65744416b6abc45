"""A cluster on this machine: one dair-bus and N dair-stage processes, started and stopped together.

Used by `dair up`, the tests and the benchmarks. Every child runs in one process group of its
own and receives SIGTERM if this process dies (PR_SET_PDEATHSIG), so nothing is orphaned even
when the parent is killed with SIGKILL.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from dair.bus.client import BusClient
from dair.errors import DairError

_PR_SET_PDEATHSIG = 1


def _terminate(procs: list[subprocess.Popen], timeout: float) -> None:
    """SIGTERM to each of procs, then SIGKILL to those still running after `timeout`."""
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port p such that p and p + 1 (the stats port) are both free right now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind((host, port + 1))
            return port
        except OSError:
            continue
    raise DairError("no free pair of ports found")


def _command(script: str, module: str) -> list[str]:
    exe = Path(sys.executable).parent / script
    if exe.exists():
        return [str(exe)]
    found = shutil.which(script)
    return [found] if found else [sys.executable, "-m", module]


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:  # not Linux: the process group still lets `stop` reach every child
        pass


class LocalCluster:
    def __init__(self, model_path: str, split: list[tuple[int, int]], port: int | None = None,
                 host: str = "127.0.0.1", threads: int | None = None, wire: str | None = None,
                 config: str | None = None, log: IO[Any] | None = None,
                 stage_args: list[str] | None = None, env: dict[str, str] | None = None,
                 keys_dir: str | None = None, standby: int = 0) -> None:
        self.model_path = model_path
        self.split = split
        self.n_standby = standby
        self.port = port or free_port_pair(host)
        self.addr = f"tcp://{host}:{self.port}"
        self.stats_addr = f"tcp://{host}:{self.port + 1}"
        self.threads = threads
        self.wire = wire
        self.config = config
        self.log = log
        self.stage_args = stage_args or []
        self.env = {**os.environ, **(env or {})}
        # A keys directory as dair.security.make_cluster_keys lays it out: CURVE on every socket.
        self.keys_dir = keys_dir
        self.bus: subprocess.Popen | None = None
        self.stages: list[subprocess.Popen] = []
        self.clients: list[subprocess.Popen] = []  # processes using the cluster (dair serve)
        self.pgid: int | None = None

    @property
    def procs(self) -> list[subprocess.Popen]:
        return ([self.bus] if self.bus else []) + self.stages

    def _spawn(self, cmd: list[str]) -> subprocess.Popen:
        out = self.log if self.log is not None else None
        pgid = self.pgid or 0

        def setup_child() -> None:  # runs in the child between fork and exec
            try:  # (Popen's process_group= needs Python 3.11)
                os.setpgid(0, pgid)
            except OSError:  # the group is gone (all its members exited): start a new one
                os.setpgid(0, 0)
            _die_with_parent()

        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, env=self.env,
                             stdin=subprocess.DEVNULL, preexec_fn=setup_child)
        if self.pgid is None:
            self.pgid = p.pid
        return p

    def spawn_client(self, cmd: list[str]) -> subprocess.Popen:
        """A process that uses the cluster (e.g. `dair serve`), in its group and stopped with it."""
        p = self._spawn(cmd)
        self.clients.append(p)
        return p

    def bus_command(self) -> list[str]:
        cmd = _command("dair-bus", "dair.bus.main") + ["--bind", self.addr, "--model", self.model_path]
        if self.keys_dir:
            cmd += ["--keys", self.keys_dir]
        return cmd + (["--config", self.config] if self.config else [])

    def stage_command(self, first: int, last: int, index: int) -> list[str]:
        """The command of a stage for layers first..last; first < 0: a standby stage."""
        where = ["--standby"] if first < 0 else ["--layers", f"{first}-{last}"]
        cmd = _command("dair-stage", "dair.stages.main") + where + [
            "--model", self.model_path, "--bus", self.addr, "--name", f"stage{index}"]
        if self.threads is not None:
            cmd += ["--threads", str(self.threads)]
        if self.wire:
            cmd += ["--wire", self.wire]
        if self.config:
            cmd += ["--config", self.config]
        if self.keys_dir:
            cmd += ["--keys", self.keys_dir]
        return cmd + self.stage_args

    def start(self) -> LocalCluster:
        self.bus = self._spawn(self.bus_command())
        for i, (a, b) in enumerate(self.split):
            self.stages.append(self._spawn(self.stage_command(a, b, i)))
        for _ in range(self.n_standby):
            self.add_standby()
        return self

    def add_standby(self) -> subprocess.Popen:
        """A stage without layers, for the bus to give a dead stage's range to."""
        return self.add_stage(-1, -1)

    def add_stage(self, first: int, last: int, extra: list[str] | None = None) -> subprocess.Popen:
        p = self._spawn(self.stage_command(first, last, len(self.stages)) + (extra or []))
        self.stages.append(p)
        return p

    def add_placed_stage(self, extra: list[str] | None = None) -> subprocess.Popen:
        """A stage without --layers: the bus places it by its --max-ram and --speed."""
        cmd = [a for a in self.stage_command(-1, -1, len(self.stages)) if a != "--standby"]
        p = self._spawn(cmd + (extra or []))
        self.stages.append(p)
        return p

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        with BusClient(self.addr, timeout=5.0, keys=self.client_keys()) as c:
            return c.wait_ready(timeout, alive=self.alive)

    def client_keys(self) -> Any:
        """The PeerKeys of this cluster's client key (None without keys)."""
        if not self.keys_dir:
            return None
        from dair import security

        return security.peer_keys("client", {}, self.keys_dir)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to every child, SIGKILL to those still there after `timeout`: the clients first
        (an HTTP server finishes its requests while the bus still answers), then bus and stages."""
        _terminate(self.clients, timeout)
        _terminate(self.procs, timeout)
        if self.pgid is not None:
            try:  # anything a child started in our group
                os.killpg(self.pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
