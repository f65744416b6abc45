"""A stage that registers again while the bus still holds its earlier, silent connection.

Across a network partition neither end sees a TCP close: the stage gives up on a connection
whose answers never arrive and registers on a new one, while the bus still counts the old one
live (its heartbeats stopped only now) and refuses the range as owned. Without the bus's
`resume` token, which the lost ASSIGN carried, the stage cannot prove it owned that range; it
must register again after its back-off instead of exiting, and be admitted once the bus has
declared the silent connection dead. A real bus and stage, with a TCP relay between them that
plays the partition.
"""
from __future__ import annotations

import socket
import threading
import time

from support.cluster_fixtures import stop_cluster

from dair.bus.client import BusClient, BusTimeout
from dair.bus.local import LocalCluster

PROMPT = [504, 3575, 282, 4649, 314]  # "The capital of France is" -> " Paris."
CONFIG = """
[bus]
heartbeat_interval_ms = 200
heartbeat_liveness = 5
[reconnect]
initial_ms = 200
max_ms = 800
jitter = 0.2
"""


class PartitionRelay:
    """Relays TCP connections to `target`. The first connection is cut the way a partition cuts
    it: what the bus sends is dropped, and when the stage closes its end the bus is not told, so
    the bus's side stays open and silent. Later connections pass everything, closes included."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.held: list[socket.socket] = []  # the cut connection's bus side, kept open
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.target)
            except OSError:
                down.close()  # the stage sees a refused connection, as it would without the relay
                continue
            self.accepted += 1
            cut = self.accepted == 1
            if cut:
                self.held.append(up)
            threading.Thread(target=self._pump, args=(down, up, not cut), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, not cut, cut), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, close: bool, cut: bool = False) -> None:
        """src -> dst; with `cut`, only ZeroMQ's handshake passes (greeting and commands), then
        nothing: the stage's socket connects and sends, and never hears a message."""
        seen, sent = b"", 0
        try:
            while b := src.recv(1 << 16):
                if not cut:
                    dst.sendall(b)
                    continue
                seen += b
                n = _zmtp_handshake_len(seen)
                if n > sent:
                    dst.sendall(seen[sent:n])
                    sent = n
        except OSError:
            pass
        if close:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        for s in self.held:
            s.close()


ZMTP_GREETING = 64


def _zmtp_handshake_len(buf: bytes) -> int:
    """How many leading bytes of a ZMTP 3 stream are handshake, complete so far: the greeting
    and the command frames (flag bit 2) after it, up to the first message frame."""
    if buf[:1] != b"\xff":
        return 0
    if len(buf) < ZMTP_GREETING:
        return len(buf)  # the greeting goes out in parts: each waits for the peer's first bytes
    i = ZMTP_GREETING
    while i < len(buf):
        flags = buf[i]
        if not flags & 0x04:
            break  # the first message: from here on nothing passes
        width = 8 if flags & 0x02 else 1
        if i + 1 + width > len(buf):
            break
        size = int.from_bytes(buf[i + 1:i + 1 + width], "big")
        if i + 1 + width + size > len(buf):
            break
        i += 1 + width + size
    return i


def _status(addr: str) -> dict:
    try:
        with BusClient(addr, timeout=2) as c:
            return c.status()
    except BusTimeout:
        return {}


def test_stage_registers_again_while_the_bus_still_holds_its_silent_connection(default_model, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    log_path = tmp_path / "cluster.log"
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed with the cluster
    c = LocalCluster(str(default_model), [], threads=1, config=str(config), log=log)
    relay = None
    try:
        c.start()
        deadline = time.monotonic() + 60
        while not _status(c.addr) and time.monotonic() < deadline:  # the bus is listening
            time.sleep(0.2)
        relay = PartitionRelay(("127.0.0.1", c.port))
        cmd = c.stage_command(0, 29, 0)
        cmd[cmd.index("--bus") + 1] = f"tcp://127.0.0.1:{relay.port}"
        stage = c._spawn(cmd)
        c.stages.append(stage)
        # Ready at first on the cut connection (its heartbeats arrive); then the stage, hearing
        # nothing, gives up on it, is refused, and registers again until admitted, which is
        # once the bus has declared the cut connection dead.
        deadline = time.monotonic() + 120
        st: dict = {}
        again = "that may be this stage's own earlier connection: registering again"
        while time.monotonic() < deadline and stage.poll() is None and not (
                "declared dead" in log_path.read_text() and (st := _status(c.addr)).get("ready")):
            time.sleep(0.3)
        text = log_path.read_text()
        assert stage.poll() is None, f"the stage exited:\n{text[-3000:]}"
        assert st.get("ready"), f"never ready: {st}\n{text[-3000:]}"
        assert again in text and relay.accepted >= 3, (relay.accepted, text[-3000:])
        assert "no word from the bus" in text
        assert "already owned by" in text
        live = [n for n in st["nodes"] if n["state"] != "dead"]
        assert [(n["first"], n["last"]) for n in live] == [(0, 29)]
        with BusClient(c.addr, timeout=60) as cl:
            done = list(cl.generate(ids=PROMPT, max_tokens=2, params={"temperature": 0}))[-1]
        assert done["ids"] == [7042, 30]
    finally:
        stop_cluster(c)
        if relay is not None:
            relay.close()
