"""Several test hosts on one machine: network namespaces joined by veth pairs to a bridge.

    with NetnsLab(4) as lab:                  # 4 hosts: 10.213.0.2 .. 10.213.0.5
        p = lab.popen(lab.hosts[0], ["dair-bus", "--bind", f"tcp://{lab.hosts[0].addr}:5555", ...])

Each host is a namespace with `lo` and an `eth0` (one end of a veth pair whose other end is a
port of the lab's bridge), an address in 10.213.0.0/24 and a `tbf` rate limit on its `eth0`
(the kernels here have tbf and htb but not netem: delay is added by a relay in the test
transport instead, tests/support/delay_relay.py and `start_dair_cluster(delay_ms=...)`). Nothing is
addressed or routed in the root namespace: the bridge has no address, so traffic goes only
among the lab's hosts, and several labs (parallel runs) can use the same /24 on separate bridges.

Names carry this process's pid and a counter (`dairt-<pid hex>x<n>-<i>`), so parallel runs do not
collide and a later run can remove what a crashed run left (`cleanup_stale`). `close()` kills the
processes started in the lab before it removes their namespaces, and runs on any exit from the
`with` block (KeyboardInterrupt included) and, as a last resort, at interpreter exit.

Needs root and iproute2 (`ip`, `tc`); `unavailable_reason()` says why a lab cannot be built here.
"""
from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUBNET = "10.213.0"
PREFIX = "dairt-"
# Namespace names: dairt-<pid hex>x<lab counter>-<host index>.
_NS_RE = re.compile(r"^dairt-([0-9a-f]+)x(\d+)-(\d+)$")
_counter = itertools.count()
_open_labs: set[NetnsLab] = set()
_lock = threading.Lock()


class NetnsError(RuntimeError):
    pass


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip() or r.returncode}")
    return r


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def unavailable_reason() -> str | None:
    """Why namespaces cannot be built here (None if they can): root, iproute2, a trial namespace."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root to include them)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) not found"
    try:
        with NetnsLab(1):
            pass
    except NetnsError as e:
        return f"cannot build a network namespace lab here: {e}"
    return None


def _kill_ns_pids(ns: str) -> None:
    """SIGKILL whatever still runs in namespace `ns` (children that escaped their group, or the
    processes of a crashed run)."""
    r = _run("ip", "netns", "pids", ns, check=False)
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def cleanup_stale() -> list[str]:
    """Remove what labs of dead processes left: their processes, veths, namespaces and bridges.
    Returns the removed names."""
    removed = []
    r = _run("ip", "netns", "list", check=False)
    tags = set()
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = _NS_RE.match(name)
        if m and not _pid_alive(int(m.group(1), 16)):
            _kill_ns_pids(name)
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
            tags.add(f"{m.group(1)}x{m.group(2)}")
    links = _run("ip", "-o", "link", "show", check=False).stdout
    for tag in tags:
        for veth in re.findall(rf"^\d+: (dv{tag}h\d+)[@:]", links, re.M):
            _run("ip", "link", "del", veth, check=False)
            removed.append(veth)
        if _run("ip", "link", "del", f"db{tag}", check=False).returncode == 0:
            removed.append(f"db{tag}")
    return removed


@dataclass
class Host:
    index: int
    ns: str
    addr: str
    veth: str  # the root-namespace end; the namespace end is `eth0`

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]


@dataclass(eq=False)
class NetnsLab:
    n_hosts: int
    rate: str | None = "1gbit"
    burst: str = "64kb"
    latency: str = "50ms"
    subnet: str = SUBNET
    hosts: list[Host] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.n_hosts <= 250:
            raise ValueError("1..250 hosts")
        self.tag = f"{os.getpid():x}x{next(_counter)}"
        self.bridge = f"db{self.tag}"  # interface names are at most 15 characters
        self._created: list[tuple[str, str]] = []  # ("ns"|"link", name), in creation order
        self._closed = False

    # --- building -----------------------------------------------------------------------------
    def open(self) -> NetnsLab:
        with _lock:
            _open_labs.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._created.append(("link", self.bridge))
        _run("ip", "link", "set", self.bridge, "up")
        for i in range(self.n_hosts):
            ns, veth = f"{PREFIX}{self.tag}-{i}", f"dv{self.tag}h{i}"
            _run("ip", "netns", "add", ns)
            self._created.append(("ns", ns))
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._created.append(("link", veth))
            _run("ip", "link", "set", veth, "master", self.bridge, "up")
            host = Host(i, ns, f"{self.subnet}.{i + 2}", veth)
            ex = host.exec_prefix()
            _run(*ex, "ip", "link", "set", "lo", "up")
            _run(*ex, "ip", "addr", "add", f"{host.addr}/24", "dev", "eth0")
            _run(*ex, "ip", "link", "set", "eth0", "up")
            if self.rate:
                # Egress of each host; both directions of a hop pass one host's eth0 each.
                _run(*ex, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", self.rate,
                     "burst", self.burst, "latency", self.latency)
            self.hosts.append(host)

    def __enter__(self) -> NetnsLab:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- running ------------------------------------------------------------------------------
    def popen(self, host: Host, cmd: list[str], **kw: Any) -> subprocess.Popen:
        """Start `cmd` inside `host` (`ip netns exec` execs it: the Popen's pid is the command's)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(host.exec_prefix() + cmd, **kw)
        self.procs.append(p)
        return p

    def run(self, host: Host, cmd: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess:
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(host.exec_prefix() + cmd, timeout=timeout, **kw)

    def qdisc_stats(self, host: Host) -> str:
        return _run(*host.exec_prefix(), "tc", "-s", "qdisc", "show", "dev", "eth0").stdout

    # --- teardown -----------------------------------------------------------------------------
    def stop_processes(self, timeout: float = 5.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    p.kill()
                p.wait()

    def close(self) -> None:
        """Idempotent; never raises (it runs while another exception may be propagating)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop_processes()
        finally:
            # veths first: namespace removal is asynchronous in the kernel, and a veth that
            # lingers would keep its name (and bridge port) for a moment after `netns del`.
            for kind, name in reversed(self._created):
                if kind == "link":
                    _run("ip", "link", "del", name, check=False)
            for kind, name in reversed(self._created):
                if kind == "ns":
                    _kill_ns_pids(name)
                    _run("ip", "netns", "del", name, check=False)
            with _lock:
                _open_labs.discard(self)


@atexit.register
def _close_all() -> None:
    for lab in list(_open_labs):
        lab.close()


# --- a dair cluster on a lab ------------------------------------------------------------------
BUS_PORT = 5555  # every host has its own port space: no free-port search needed


def _script(name: str) -> list[str]:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return [str(exe)]
    module = {"dair-bus": "dair.bus.main", "dair-stage": "dair.stages.main"}[name]
    return [sys.executable, "-m", module]


def start_relay(lab: NetnsLab, host: Host, maps: list[tuple[str, str]], delay_ms: float,
                log: Any = None) -> subprocess.Popen:
    """tests/support/delay_relay.py inside `host`: each (listen, target) pair of "HOST:PORT" addresses,
    every chunk held `delay_ms` in each direction. Returns once the relay listens."""
    script = Path(__file__).resolve().parent / "delay_relay.py"
    cmd = [sys.executable, str(script), "--delay-ms", str(delay_ms)]
    for listen, target in maps:
        cmd += ["--map", f"{listen}={target}"]
    p = lab.popen(host, cmd, stdout=subprocess.PIPE, stderr=log if log is not None else None, text=True)
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if line != "ready":
        p.kill()
        raise NetnsError(f"delay relay on {host.ns} did not start (status {p.wait()}): {line!r}")
    return p


def start_dair_cluster(lab: NetnsLab, model: str, split: list[tuple[int, int]], *, wire: str = "f32",
                       threads: int = 1, config: str | None = None, log: Any = None,
                       delay_ms: float | None = None) -> str:
    """dair-bus on host 0, stage i on host i + 1; returns the address at which the bus is reached
    from the other hosts (those after the stages are free for clients). The bus binds a
    non-loopback address, hence `--insecure` (no keys here; giving each namespace its own key
    pair would test the cross-host case CurveZMQ is for).

    With `delay_ms` (0 included: the relays' own cost alone), every host but the bus's runs a delay relay (tests/support/delay_relay.py) on its
    own loopback, forwarding the bus's ROUTER and stats ports: the stages and clients there
    connect to that (the returned address is then 127.0.0.1's) and every byte between them and
    the bus is `delay_ms` later in each direction, as with `netem delay` on every host's link.
    The bus sees the relay's connection as the peer, which ZeroMQ's ROUTER does not mind."""
    if lab.n_hosts < len(split) + 1:
        raise ValueError(f"{len(split)} stages need {len(split) + 1} hosts")
    bus = lab.hosts[0]
    addr = f"tcp://{bus.addr}:{BUS_PORT}"
    cfg = ["--config", config] if config else []
    out = {"stdout": log, "stderr": subprocess.STDOUT} if log is not None else {}
    lab.popen(bus, _script("dair-bus") + ["--bind", addr, "--model", model, "--insecure", *cfg], **out)
    peer_addr = addr
    if delay_ms is not None:
        # The stats PUB is on port + 1 (bus/protocol.py): relayed too, so the address is complete.
        ports = (BUS_PORT, BUS_PORT + 1)
        for host in lab.hosts[1:]:
            start_relay(lab, host, [(f"127.0.0.1:{p}", f"{bus.addr}:{p}") for p in ports], delay_ms, log)
        peer_addr = f"tcp://127.0.0.1:{BUS_PORT}"
    for i, (a, b) in enumerate(split):
        lab.popen(lab.hosts[i + 1], _script("dair-stage") + [
            "--layers", f"{a}-{b}", "--model", model, "--bus", peer_addr, "--name", f"ns-stage{i}",
            "--threads", str(threads), "--wire", wire, *cfg], **out)
    return peer_addr


def client_command(addr: str, ids: list[int], tokens: int, runs: int = 1, wait: float = 60.0) -> list[str]:
    script = Path(__file__).resolve().parent / "netns_client.py"
    return [sys.executable, str(script), "--bus", addr, "--ids", ",".join(map(str, ids)),
            "--tokens", str(tokens), "--runs", str(runs), "--wait", str(wait)]
