"""CurveZMQ for dair: key pairs, socket set-up, the allowed-keys gate, and the bind check.

The bus is the CURVE *server* on both of its sockets (ROUTER and stats PUB); stages, clients and
the TUI are CURVE *clients* that know the bus's public key. Each peer has a key pair of its own;
the bus admits a peer only if its public key is in one of the allowed-key directories (one per
role: `stage`, `client`), and tells the bus which role a message came from through the ZAP
User-Id (`peer_role(frame)`). How the bus, stages and clients use this: docs/internals.md,
"dair.security".

Key files are ZeroMQ's own certificate format (zmq.auth): `NAME.key` holds the public key and
may be copied anywhere; `NAME.key_secret` holds both keys and stays on its machine (mode 0600).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import stat
import tempfile
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from dair.errors import DairError

# Every dair server socket uses this ZAP domain, and the authenticator answers for it only.
ZAP_DOMAIN = "dair"
ROLES = ("stage", "client")
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"

log = logging.getLogger("dair.security")
_running: weakref.WeakSet[Gatekeeper] = weakref.WeakSet()


# --- keys ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyPair:
    public: bytes  # z85, 40 bytes
    secret: bytes | None  # z85, 40 bytes; None for a public-only file


def generate_keys(out_dir: str | os.PathLike[str], name: str, force: bool = False) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (mode 0600) into out_dir; returns their paths.

    Refuses to overwrite an existing pair unless `force`: a replaced secret key silently locks
    its node out of every cluster that allowed the old public key."""
    if not name or "/" in name or name.startswith("."):
        raise DairError(f"key name {name!r}: expected a plain file name, e.g. bus or stage-a")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public, secret = out / f"{name}{PUBLIC_SUFFIX}", out / f"{name}{SECRET_SUFFIX}"
    if not force and (public.exists() or secret.exists()):
        raise DairError(f"{public} or {secret} exists already (pass --force to replace the pair)")
    # Written in a private (0700) directory first, so the secret is never readable by others,
    # not even for the moment before its chmod; then moved into place on the same filesystem.
    with tempfile.TemporaryDirectory(dir=out, prefix=".dair-keys-") as tmp:
        pub_tmp, sec_tmp = zmq.auth.create_certificates(tmp, name)
        os.chmod(sec_tmp, 0o600)
        os.chmod(pub_tmp, 0o644)
        os.replace(sec_tmp, secret)
        os.replace(pub_tmp, public)
    return public, secret


def _check_private(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise DairError(f"{path}: secret key readable by others (mode {stat.S_IMODE(mode):04o}); "
                        f"run `chmod 600 {path}`")


def load_secret(path: str | os.PathLike[str]) -> KeyPair:
    """Both keys of a NAME.key_secret file (refused if group/others may read it)."""
    p = Path(path)
    try:
        public, secret = zmq.auth.load_certificate(p)
    except FileNotFoundError:
        raise DairError(f"{p}: secret key file not found (make one with `dair keys generate`)") from None
    except (ValueError, OSError) as e:
        raise DairError(f"{p}: not a key file: {e}") from None
    if not secret:
        raise DairError(f"{p}: holds no secret key (is it the public NAME.key?)")
    _check_private(p)
    return KeyPair(public, secret)


def load_public(key: str | bytes | os.PathLike[str]) -> bytes:
    """A public key given as a NAME.key (or NAME.key_secret) file, or as the 40-character z85 text."""
    if isinstance(key, bytes | str) and len(key) == 40 and not os.path.exists(key):
        raw = key.encode() if isinstance(key, str) else key
        try:
            z85.decode(raw)
        except (ValueError, KeyError, AssertionError):
            raise DairError(f"{key!r}: not a z85 public key") from None
        return raw
    p = Path(os.fsdecode(key))
    try:
        public, _ = zmq.auth.load_certificate(p)
    except FileNotFoundError:
        raise DairError(f"{p}: public key file not found") from None
    except (ValueError, OSError) as e:
        raise DairError(f"{p}: not a key file: {e}") from None
    return public


def load_allowed(dirs: dict[str, str | os.PathLike[str]]) -> dict[bytes, tuple[str, str]]:
    """{z85 public key: (role, name)} from directories of NAME.key files, one directory per role.

    A key in two roles' directories gets the first role listed."""
    keys: dict[bytes, tuple[str, str]] = {}
    for role, d in dirs.items():
        if role not in ROLES:
            raise DairError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        path = Path(d)
        if not path.is_dir():
            raise DairError(f"{path}: allowed-keys directory for {role}s not found")
        for f in sorted(path.glob(f"*{PUBLIC_SUFFIX}")):
            keys.setdefault(load_public(f), (role, f.name[: -len(PUBLIC_SUFFIX)]))
    return keys


# --- who uses which keys --------------------------------------------------------------------------
# A keys directory as `dair up --keys DIR` makes it (and as `--keys DIR` reads it everywhere):
#   DIR/bus.key, DIR/bus.key_secret          the bus's pair (bus.key goes to every peer)
#   DIR/stages/NAME.key[_secret]             allowed stage keys (a stage uses stages/stage.key_secret)
#   DIR/clients/NAME.key[_secret]            allowed client keys (a client uses clients/client.key_secret)
BUS_KEY_NAME = "bus"


@dataclass(frozen=True)
class PeerKeys:
    """What a stage, client or TUI needs to talk to a CURVE bus."""
    secret_path: str
    server_key: bytes  # the bus's z85 public key

    @property
    def public(self) -> bytes:
        return load_secret(self.secret_path).public


def make_cluster_keys(keys_dir: str | os.PathLike[str], stage_names: list[str] | None = None) -> Path:
    """The bus's pair, a client pair and stage pairs under keys_dir, those missing only.

    Without stage_names, one `stage` pair that every stage shares. With them (`dair up`), one pair
    per name, and stages/ is made to hold exactly those: the pairs an earlier layout left there
    (the shared `stage`, or `stageN` names not asked for now) are removed, so the bus admits no
    stage key but these. Any other key file there is the user's and stays (dair up refuses to run
    with one: see foreign_stage_keys)."""
    d = Path(keys_dir)
    names = ["stage"] if stage_names is None else list(stage_names)
    for sub, name in [("", BUS_KEY_NAME), ("clients", "client"), *(("stages", n) for n in names)]:
        if not (d / sub / f"{name}{SECRET_SUFFIX}").exists():
            generate_keys(d / sub, name, force=True)
    if stage_names is not None:
        for f in (d / "stages").glob(f"*{PUBLIC_SUFFIX}"):
            stem = f.name[: -len(PUBLIC_SUFFIX)]
            if _is_made_stage_name(stem) and stem not in names:
                f.unlink()
                (d / "stages" / f"{stem}{SECRET_SUFFIX}").unlink(missing_ok=True)
    return d


def _is_made_stage_name(stem: str) -> bool:
    """Names dair itself gives stage keys: `stage` (shared) and `stageN` (one per dair up stage)."""
    return stem == "stage" or (stem.startswith("stage") and stem[5:].isdigit())


def foreign_stage_keys(keys_dir: str | os.PathLike[str]) -> list[Path]:
    """Public keys in keys_dir/stages that dair did not make (a bus on keys_dir admits them too)."""
    return sorted(f for f in (Path(keys_dir) / "stages").glob(f"*{PUBLIC_SUFFIX}")
                  if not _is_made_stage_name(f.name[: -len(PUBLIC_SUFFIX)]))


def stage_secret_path(keys_dir: str | os.PathLike[str], name: str) -> str:
    return str(Path(keys_dir) / "stages" / f"{name}{SECRET_SUFFIX}")


def bus_keys(sec: dict, keys_dir: str | None = None, secret: str | None = None,
             stage_keys: str | None = None, client_keys: str | None = None) -> tuple[str, dict[str, str]] | None:
    """(secret key path, {role: allowed-keys dir}) for the bus, or None for CURVE off.

    Flags win over the config's [security] values; a keys directory (flag, else config `keys`)
    fills in whatever is left with its standard layout."""
    d = keys_dir or sec.get("keys") or ""
    secret = secret or sec.get("bus_secret_key") or (os.path.join(d, BUS_KEY_NAME + SECRET_SUFFIX) if d else "")
    if not secret:
        return None
    allowed = {"stage": stage_keys or sec.get("stage_keys") or (os.path.join(d, "stages") if d else ""),
               "client": client_keys or sec.get("client_keys") or (os.path.join(d, "clients") if d else "")}
    load_secret(secret)  # a missing or world-readable key fails at start-up, not at the first peer
    return secret, {r: p for r, p in allowed.items() if p}


def peer_keys(role: str, sec: dict, keys_dir: str | None = None, secret: str | None = None,
              server: str | None = None) -> PeerKeys | None:
    """A stage's or client's keys (flags over the config's [security]), or None for CURVE off."""
    d = keys_dir or sec.get("keys") or ""
    server = server or sec.get("server_key") or (os.path.join(d, BUS_KEY_NAME + PUBLIC_SUFFIX) if d else "")
    if not server:
        return None
    secret = secret or sec.get("secret_key") or (os.path.join(d, f"{role}s", role + SECRET_SUFFIX) if d else "")
    if not secret:
        raise DairError(f"the bus's public key is set but this {role}'s own secret key is not "
                        "(--secret-key, or [security] secret_key)")
    load_secret(secret)
    return PeerKeys(str(secret), load_public(server))


def apply_client_keys(sock: zmq.Socket, keys: PeerKeys | None) -> None:
    if keys is not None:
        client_socket_setup(sock, keys.secret_path, keys.server_key)


# --- sockets --------------------------------------------------------------------------------------
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


def client_socket_setup(sock: zmq.Socket, secret_path: str | os.PathLike[str],
                        server_public: str | bytes | os.PathLike[str]) -> KeyPair:
    """Make `sock` a CURVE client of the server whose public key is given. Call before connect()."""
    kp = load_secret(secret_path)
    sock.curve_secretkey = kp.secret
    sock.curve_publickey = kp.public
    sock.curve_serverkey = load_public(server_public)
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


# --- binding --------------------------------------------------------------------------------------
def _host_is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in ("lo", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host in ("*", ""):
        return False
    try:  # a host name: loopback only if every address it names is
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def is_loopback_bind(addr: str) -> bool:
    """Whether a ZeroMQ bind address is reachable from this machine only.

    ipc:// and inproc:// are local; tcp:// is local for 127.0.0.0/8, ::1, `localhost`, the `lo`
    interface, and host names that resolve only to loopback. `*`, 0.0.0.0 and anything else is not."""
    u = urlparse(addr)
    if u.scheme in ("ipc", "inproc"):
        return True
    if u.scheme != "tcp":
        return False
    host = u.netloc.rsplit(":", 1)[0] if u.netloc else ""
    # tcp://eth0;192.168.1.2:5555 binds via a source spec: what matters is the part after ';'.
    host = host.split(";")[-1]
    return _host_is_loopback(host)


def check_bind(addr: str, have_keys: bool, insecure: bool = False) -> None:
    """Refuse to bind a non-loopback address in clear, unless `insecure`.

    Raises DairError with the remedy; a loopback address, or any address with keys, passes."""
    if have_keys or insecure or is_loopback_bind(addr):
        return
    raise DairError(
        f"refusing to bind {addr}: it is reachable from other machines, and without keys anyone "
        "there could join the cluster and read prompts, tokens and activations in clear. "
        "Make keys with `dair keys generate` and set them in the config's [security] section, "
        "or pass --insecure to bind without them (trusted network only)")

