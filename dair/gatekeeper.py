"""The allowed-keys gate of dair.security: a ZAP handler on pyzmq's ThreadAuthenticator.

Apart from dair.security because pyzmq's zmq.auth.thread imports asyncio and ssl: the bus needs
the gate, a stage or a client never does. `dair.security.Gatekeeper` names this class.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from dair.security import ZAP_DOMAIN, Refusal, _running, load_allowed, log


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
