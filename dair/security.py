"""CurveZMQ for dair: key pairs, client socket set-up, and the bind check.

The bus is the CURVE *server* on both of its sockets (ROUTER and stats PUB); stages, clients and
the TUI are CURVE *clients* that know the bus's public key. Each peer has a key pair of its own;
the bus admits a peer only if its public key is in one of the allowed-key directories (one per
role: `stage`, `client`), and tells the bus which role a message came from through the ZAP
User-Id (`peer_role(frame)`). How the bus, stages and clients use this: docs/internals.md,
"dair.security".

Key files are ZeroMQ's own certificate format (zmq.auth): `NAME.key` holds the public key and
may be copied anywhere; `NAME.key_secret` holds both keys and stays on its machine (mode 0600).

The server side (the gate, server sockets, `peer_role`) is dair/gatekeeper.py, which only the
bus imports: a stage or client does not load the authenticator's thread and asyncio machinery.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import zmq
import zmq.auth
from zmq.utils import z85

from dair.errors import DairError

# Every dair server socket uses this ZAP domain, and the authenticator answers for it only.
ZAP_DOMAIN = "dair"
ROLES = ("stage", "client")
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"



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
def client_socket_setup(sock: zmq.Socket, secret_path: str | os.PathLike[str],
                        server_public: str | bytes | os.PathLike[str]) -> KeyPair:
    """Make `sock` a CURVE client of the server whose public key is given. Call before connect()."""
    kp = load_secret(secret_path)
    sock.curve_secretkey = kp.secret
    sock.curve_publickey = kp.public
    sock.curve_serverkey = load_public(server_public)
    return kp


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

