"""CurveZMQ building blocks (dair/security.py) with real sockets on 127.0.0.1.

- `dair keys generate` writes ZeroMQ certificates, the secret one private (0600);
- a client whose key is allowed talks to a CURVE server, and the server learns its role;
- a client with an unknown key gets nothing through, and the refusal is logged and counted;
- a plain (non-CURVE) ZeroMQ socket gets nothing through, and a raw ZMTP peer offering the NULL
  mechanism is hung up on during the handshake;
- on the wire (captured by a TCP relay between the two), a CURVE message is not plaintext,
  whereas the same message without CURVE is (the control);
- non-loopback binds without keys are refused unless insecure.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from dair.cli import main as dair_main
from dair.errors import DairError
from dair.gatekeeper import Gatekeeper, peer_role, peer_user, server_socket_setup
from dair.security import (
    check_bind,
    client_socket_setup,
    generate_keys,
    is_loopback_bind,
    load_allowed,
    load_public,
    load_secret,
)

SECRET_TEXT = b"the capital of France is a SECRET-PROMPT-7d1c"
WAIT_MS = 1500


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """bus pair; allowed client `alice` and stage `s1`; unknown `mallory` (all in their own dirs)."""
    for d, name in (("bus", "bus"), ("clients", "alice"), ("stages", "s1"), ("outsiders", "mallory")):
        generate_keys(tmp_path / d, name)
    return {"dir": tmp_path, "bus_secret": tmp_path / "bus/bus.key_secret", "bus_public": tmp_path / "bus/bus.key",
            "alice": tmp_path / "clients/alice.key_secret", "s1": tmp_path / "stages/s1.key_secret",
            "mallory": tmp_path / "outsiders/mallory.key_secret"}


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
def server(ctx: zmq.Context, keys: dict[str, Path]) -> Iterator[tuple[zmq.Socket, int, Gatekeeper]]:
    """A CURVE ROUTER on 127.0.0.1 admitting clients/ as `client` and stages/ as `stage`."""
    gate = Gatekeeper(ctx, {"stage": keys["dir"] / "stages", "client": keys["dir"] / "clients"})
    gate.start()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    server_socket_setup(sock, keys["bus_secret"])
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, port, gate
    sock.close(0)
    gate.stop()


def _dealer(ctx: zmq.Context, port: int, secret: Path | None, server_public: Path | None) -> zmq.Socket:
    d = ctx.socket(zmq.DEALER)
    d.linger = 0
    if secret is not None:
        client_socket_setup(d, secret, server_public)
    d.connect(f"tcp://127.0.0.1:{port}")
    return d


# --- keys -----------------------------------------------------------------------------------------
def test_keys_generate_cli_writes_zmq_certificates(tmp_path: Path, capsys) -> None:
    assert dair_main(["keys", "generate", "--out", str(tmp_path / "k"), "--name", "node1"]) == 0
    pub, sec = tmp_path / "k/node1.key", tmp_path / "k/node1.key_secret"
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) & 0o077 == 0o044  # public: readable by all
    assert "secret-key" not in pub.read_text() and "secret-key" in sec.read_text()
    kp = load_secret(sec)
    assert kp.public == load_public(pub) and len(kp.public) == 40 and len(kp.secret or b"") == 40
    assert kp.public.decode() in capsys.readouterr().out
    assert zmq.auth.load_certificate(pub)[0] == kp.public  # ZeroMQ's own format
    # No silent overwrite: that would lock the node out of every cluster that knew the old key.
    assert dair_main(["keys", "generate", "--out", str(tmp_path / "k"), "--name", "node1"]) == 2
    assert load_secret(sec) == kp
    assert dair_main(["keys", "generate", "--out", str(tmp_path / "k"), "--name", "node1", "--force"]) == 0
    assert load_secret(sec) != kp
    assert not [p for p in (tmp_path / "k").iterdir() if p.name.startswith(".")]  # no temp dir left


def test_secret_readable_by_others_is_refused(keys: dict[str, Path]) -> None:
    os.chmod(keys["alice"], 0o644)
    with pytest.raises(DairError, match="chmod 600"):
        load_secret(keys["alice"])
    with pytest.raises(DairError, match="no secret key"):
        os.chmod(keys["alice"], 0o600)
        load_secret(keys["dir"] / "clients/alice.key")


def test_public_key_as_text_or_file(keys: dict[str, Path]) -> None:
    pub = load_public(keys["bus_public"])
    assert load_public(pub.decode()) == pub == load_public(keys["bus_secret"])
    with pytest.raises(DairError):
        load_public("not a key and not a file")
    allowed = load_allowed({"stage": keys["dir"] / "stages", "client": keys["dir"] / "clients"})
    assert sorted(allowed.values()) == [("client", "alice"), ("stage", "s1")]
    with pytest.raises(DairError, match="role"):
        load_allowed({"admin": keys["dir"] / "stages"})


# --- admission ------------------------------------------------------------------------------------
@pytest.mark.parametrize("who,role", [("alice", "client"), ("s1", "stage")])
def test_allowed_key_talks_to_curve_server(ctx, server, keys, who, role) -> None:
    sock, port, gate = server
    d = _dealer(ctx, port, keys[who], keys["bus_public"])
    d.send(b"hello")
    assert sock.poll(WAIT_MS * 2), "an allowed key got nothing through"
    ident, frame = sock.recv_multipart(copy=False)
    assert frame.bytes == b"hello"
    assert peer_user(frame) == f"{role}:{who}" and peer_role(frame) == role
    sock.send_multipart([ident.bytes, b"welcome"])
    assert d.poll(WAIT_MS) and d.recv() == b"welcome"
    assert gate.refused == 0


def test_unknown_key_gets_nothing_through_and_is_logged(ctx, server, keys, caplog) -> None:
    sock, port, gate = server
    caplog.set_level(logging.WARNING, logger="dair.security")
    d = _dealer(ctx, port, keys["mallory"], keys["bus_public"])
    d.send(b"let me in")
    assert not sock.poll(WAIT_MS)
    assert not d.poll(100)
    assert gate.refused >= 1
    mallory = load_secret(keys["mallory"]).public.decode()
    assert gate.refusals[-1].key == mallory and gate.refusals[-1].address == "127.0.0.1"
    assert any(mallory in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)
    # Allowing the key later (a new file + reload) lets the same peer in on its next attempt.
    generate_keys(keys["dir"] / "tmp", "x")
    os.replace(keys["mallory"].with_suffix(".key"), keys["dir"] / "clients/mallory.key")
    gate.reload()
    d2 = _dealer(ctx, port, keys["mallory"], keys["bus_public"])
    d2.send(b"again")
    assert sock.poll(WAIT_MS * 2)
    assert peer_user(sock.recv_multipart(copy=False)[1]) == "client:mallory"


def test_client_with_wrong_server_key_gets_nothing_through(ctx, server, keys) -> None:
    """A client that expects another server (e.g. an impostor bus's key) cannot complete CURVE."""
    sock, port, _ = server
    d = _dealer(ctx, port, keys["alice"], keys["dir"] / "outsiders/mallory.key")
    d.send(b"hello")
    assert not sock.poll(WAIT_MS)


def test_plain_zmq_socket_gets_nothing_through(ctx, server) -> None:
    sock, port, _ = server
    d = _dealer(ctx, port, None, None)
    d.send(b"plain hello")
    assert not sock.poll(WAIT_MS)


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def test_raw_zmtp_null_peer_fails_the_handshake(server) -> None:
    """Speak ZMTP 3 by hand offering the NULL mechanism (what a plain socket does): the server's
    greeting names CURVE, and it hangs up when it reads NULL, before any message is possible."""
    sock, port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        # libzmq answers the greeting in steps: signature, then version, then mechanism.
        s.sendall(b"\xff" + b"\0" * 8 + b"\x7f")
        head = _recv_exactly(s, 11)
        assert head[:1] == b"\xff" and head[9:10] == b"\x7f" and head[10:11] == b"\x03"
        s.sendall(b"\x03\x00")
        rest = _recv_exactly(s, 53)  # minor version, mechanism (20), as-server, filler (31)
        assert rest[1:21].rstrip(b"\0") == b"CURVE"
        s.sendall(b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31)
        ready = b"\x05READY" + b"\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"
        after = b""
        try:
            s.sendall(b"\x04" + bytes([len(ready)]) + ready + b"\x00\x05hello")
            s.settimeout(3)
            while chunk := s.recv(4096):
                after += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
        assert after == b""  # hung up with no READY of its own
    assert not sock.poll(300)


# --- the wire -------------------------------------------------------------------------------------
class Tap:
    """A TCP relay on 127.0.0.1 that records every byte passing through it (both directions)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.listener.settimeout(0.2)
        pairs: dict[socket.socket, socket.socket] = {}
        while not self._stop.is_set():
            try:
                a, _ = self.listener.accept()
                b = socket.create_connection(("127.0.0.1", self.target))
                pairs[a], pairs[b] = b, a
            except TimeoutError:
                pass
            if not pairs:
                continue
            ready, _, _ = select.select(list(pairs), [], [], 0.05)
            for s in ready:
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if data:
                    self.seen += data
                    pairs[s].sendall(data)
                else:
                    other = pairs.pop(s, None)
                    if other is not None:
                        pairs.pop(other, None)
                        other.close()
                    s.close()
        for s in pairs:
            s.close()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.listener.close()


def test_curve_traffic_is_not_plaintext_on_the_wire(ctx, server, keys) -> None:
    sock, port, _ = server
    tap = Tap(port)
    try:
        d = _dealer(ctx, tap.port, keys["alice"], keys["bus_public"])
        d.send(SECRET_TEXT)
        assert sock.poll(WAIT_MS * 2)
        ident, frame = sock.recv_multipart(copy=False)
        assert frame.bytes == SECRET_TEXT
        sock.send_multipart([ident.bytes, SECRET_TEXT[::-1]])
        assert d.poll(WAIT_MS) and d.recv() == SECRET_TEXT[::-1]
    finally:
        tap.close()
    wire = bytes(tap.seen)
    assert b"CURVE" in wire and len(wire) > 2 * len(SECRET_TEXT)
    for needle in (SECRET_TEXT, SECRET_TEXT[::-1], b"SECRET-PROMPT", b"TERCES"):
        assert needle not in wire


def test_control_without_curve_the_wire_is_plaintext(ctx) -> None:
    """The tap would see the message if it were in clear: the previous test's check has teeth."""
    r = ctx.socket(zmq.ROUTER)
    r.linger = 0
    port = r.bind_to_random_port("tcp://127.0.0.1")
    tap = Tap(port)
    try:
        d = _dealer(ctx, tap.port, None, None)
        d.send(SECRET_TEXT)
        assert r.poll(WAIT_MS * 2) and r.recv_multipart()[1] == SECRET_TEXT
    finally:
        tap.close()
        r.close(0)
    assert SECRET_TEXT in bytes(tap.seen)


def test_curve_pub_sub_for_stats(ctx, keys) -> None:
    """The bus's stats PUB is a CURVE server too: an allowed SUB hears it, an unknown one does not."""
    gate = Gatekeeper(ctx, {"client": keys["dir"] / "clients"})
    gate.start()
    try:
        pub = ctx.socket(zmq.PUB)
        pub.linger = 0
        server_socket_setup(pub, keys["bus_secret"])
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        subs = {}
        for who in ("alice", "mallory"):
            s = ctx.socket(zmq.SUB)
            s.linger = 0
            client_socket_setup(s, keys[who], keys["bus_public"])
            s.setsockopt(zmq.SUBSCRIBE, b"stats")
            s.connect(f"tcp://127.0.0.1:{port}")
            subs[who] = s
        heard = False
        for _ in range(30):  # PUB drops messages until a subscription has arrived
            pub.send_multipart([b"stats", b"{}"])
            if subs["alice"].poll(100):
                heard = True
                break
        assert heard
        assert not subs["mallory"].poll(300)
        pub.close(0)
        for s in subs.values():
            s.close(0)
    finally:
        gate.stop()


def test_server_setup_without_gatekeeper_is_refused(ctx, keys) -> None:
    with pytest.raises(DairError, match="Gatekeeper"):
        server_socket_setup(ctx.socket(zmq.ROUTER), keys["bus_secret"])


# --- binding --------------------------------------------------------------------------------------
@pytest.mark.parametrize("addr,local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.0.0.2:5555", True), ("tcp://localhost:5555", True),
    ("tcp://[::1]:5555", True), ("tcp://lo:5555", True), ("ipc:///tmp/dair.sock", True),
    ("inproc://bus", True),
    ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://10.213.0.2:5555", False),
    ("tcp://192.168.1.20:5555", False), ("tcp://[::]:5555", False), ("tcp://eth0:5555", False),
    ("tcp://eth0;127.0.0.1:5555", True),
])
def test_is_loopback_bind(addr: str, local: bool) -> None:
    assert is_loopback_bind(addr) is local


def test_check_bind_refuses_clear_text_beyond_loopback() -> None:
    check_bind("tcp://127.0.0.1:5555", have_keys=False)
    check_bind("tcp://0.0.0.0:5555", have_keys=True)
    check_bind("tcp://0.0.0.0:5555", have_keys=False, insecure=True)
    with pytest.raises(DairError) as e:
        check_bind("tcp://0.0.0.0:5555", have_keys=False)
    assert "--insecure" in str(e.value) and "dair keys generate" in str(e.value) and "0.0.0.0" in str(e.value)


def test_a_stage_imports_no_gate_nor_asyncio():
    """The gate (pyzmq's ThreadAuthenticator) and zmq.utils.monitor import asyncio and ssl, 7 MB of
    every process that has them: a stage's modules pull in neither; the bus imports dair.gatekeeper."""
    code = ("import sys, dair.stages.main\n"
            "assert not {'asyncio', 'ssl', 'dair.gatekeeper'} & set(sys.modules), sorted(sys.modules)\n"
            "import dair.gatekeeper as g\n"
            "assert g.Gatekeeper.__name__ == 'Gatekeeper' and 'asyncio' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
