"""The server side of CurveZMQ, for the bus only: the allowed-keys gate (a ZAP handler),
server socket set-up, and the role of the peer a frame came from. Stages and clients use
dair/security.py alone, so they do not import the authenticator's thread and asyncio machinery."""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from dair.errors import DairError
from dair.security import ROLES, ZAP_DOMAIN, KeyPair, load_allowed, load_secret

log = logging.getLogger("dair.security")
_running: weakref.WeakSet[Gatekeeper] = weakref.WeakSet()


def server_socket_setup(sock: zmq.Socket, secret_path: str | os.PathLike[str]) -> KeyPair:
    """Make `sock` a CURVE server with the key pair in secret_path. Call before bind().

    A CURVE server consults the ZAP handler of its context for every peer. Without one libzmq
    would accept *any* client key, so the socket is set to fail closed (ZAP_ENFORCE_DOMAIN: no
    handler, no peer) and this refuses outright unless a Gatekeeper already runs on the
    socket's context, to say so at start-up rather than by silence."""
    if not any(g.context is sock.context and g.is_alive() for g in list(_running)):
        raise DairError("start a Gatekeeper on this socket's context before setting up a CURVE "
                        "server socket (it decides which client keys are admitted)")
    kp = load_secret(secret_path)
    sock.curve_secretkey = kp.secret
    sock.curve_publickey = kp.public
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN.encode()
    try:
        # Fail closed if the ZAP handler goes away (libzmq >= 4.3; older ones lack the option).
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    except (AttributeError, zmq.ZMQError):
        pass
    return kp


def peer_user(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id of a received frame (`role:name` for an admitted CURVE peer), if any.
    Only frames received with copy=False carry it."""
    try:
        return frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):
        return None


def peer_role(frame: zmq.Frame) -> str | None:
    """`stage` or `client` for a frame from an admitted peer; None on a socket without CURVE."""
    user = peer_user(frame)
    if not user or ":" not in user:
        return None
    role = user.split(":", 1)[0]
    return role if role in ROLES else None


# --- the gate -------------------------------------------------------------------------------------
@dataclass
class Refusal:
    t: float
    address: str
    key: str  # z85 public key the peer presented
    reason: str


class Gatekeeper(ThreadAuthenticator):
    """ZAP handler admitting only the public keys found in the allowed-key directories.

    Refusals are logged (logger `dair.security`, WARNING, with the peer's address and key) and
    counted in `refused`; the most recent ones are kept in `refusals`. Admitted peers get the
    User-Id `role:name` (name: the key file's stem), which the server reads with `peer_role`.
    `reload()` rereads the directories (after adding or removing a key file)."""

    def __init__(self, context: zmq.Context, allowed: dict[str, str | os.PathLike[str]],
                 logger: logging.Logger | None = None) -> None:
        super().__init__(context, log=logger or log)
        self.allowed_dirs = dict(allowed)
        self.keys = load_allowed(self.allowed_dirs)
        self.refused = 0
        self.refusals: deque[Refusal] = deque(maxlen=100)
        self._address = ""
        self._keys_lock = threading.Lock()

    def start(self) -> None:
        self.configure_curve_callback(ZAP_DOMAIN, self)
        super().start()
        _running.add(self)

    def stop(self) -> None:
        _running.discard(self)
        super().stop()

    def __enter__(self) -> Gatekeeper:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reload(self) -> None:
        keys = load_allowed(self.allowed_dirs)
        with self._keys_lock:
            self.keys = keys

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # The credentials callback is not told who is asking; remember it for the refusal log.
        # ZAP requests are handled one at a time on the authenticator's thread.
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        """Credentials provider (zmq.auth): is this z85 public key allowed?"""
        with self._keys_lock:
            ok = key in self.keys
        if not ok:
            self.refused += 1
            k = key.decode("ascii", "replace")
            self.refusals.append(Refusal(time.time(), self._address, k, "unknown key"))
            self.log.warning("refused a peer at %s: public key %s is not in the allowed keys (%s)",
                             self._address or "?", k, ", ".join(f"{r}: {d}" for r, d in self.allowed_dirs.items()))
        return ok

    def curve_user_id(self, client_public_key: bytes) -> str:
        z = z85.encode(client_public_key)
        with self._keys_lock:
            role, name = self.keys.get(z, ("?", z.decode("ascii")))
        return f"{role}:{name}"
