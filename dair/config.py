"""Defaults come from config.toml (one source of truth); a user file overrides them."""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from dair.errors import DairError


def _packaged_config() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "config.toml", here.parent / "config.toml"):
        if candidate.is_file():
            return candidate
    raise DairError(f"config.toml not found next to {here}: reinstall dair")


@lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    with open(_packaged_config(), "rb") as f:
        return tomllib.load(f)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """The defaults, overlaid with the TOML file at `path` if given."""
    cfg = copy.deepcopy(_defaults())
    if path:
        try:
            with open(path, "rb") as f:
                user = tomllib.load(f)
        except FileNotFoundError:
            raise DairError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise DairError(f"{path}: not valid TOML: {e}") from None
        cfg = _merge(cfg, user)
    return cfg


def defaults(section: str) -> dict[str, Any]:
    return copy.deepcopy(_defaults()[section])


# --- typed views of the sections ---------------------------------------------------------------
# One dataclass per section, its fields named as in config.toml and without defaults of their
# own: the values always come from config.toml (overlaid by the user's file), so a default is
# written in one place only.

@dataclass(frozen=True)
class BusConfig:
    bind: str
    stats_interval_ms: int
    heartbeat_interval_ms: int
    heartbeat_liveness: int
    max_sessions: int
    max_sessions_per_client: int
    session_idle_timeout_s: float
    max_context: int
    max_frame_bytes: int
    max_pending_per_client: int
    max_stages: int
    max_queued_msgs: int
    prefill_chunk: int

    @property
    def heartbeat_s(self) -> float:
        return self.heartbeat_interval_ms / 1000.0

    @property
    def stats_s(self) -> float:
        return self.stats_interval_ms / 1000.0

    @property
    def dead_after_s(self) -> float:
        """Silence after which a peer counts as gone (heartbeat interval x liveness)."""
        return self.heartbeat_interval_ms * self.heartbeat_liveness / 1000.0


@dataclass(frozen=True)
class StageConfig:
    threads: int
    wire: str
    lz4_min_bytes: int
    max_batch: int
    max_queued_acts: int
    max_ram: str
    kv_type: str


@dataclass(frozen=True)
class ReconnectConfig:
    initial_ms: int
    max_ms: int
    jitter: float


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    max_tokens: int


@dataclass(frozen=True)
class UpConfig:
    restart_delay_s: float
    restart_delay_max_s: float
    give_up_deaths: int
    give_up_window_s: float


T = TypeVar("T")
_SECTIONS: dict[type, str] = {BusConfig: "bus", StageConfig: "stage", ReconnectConfig: "reconnect",
                              SamplingConfig: "sampling", UpConfig: "up"}


def section(cls: type[T], cfg: dict[str, Any] | None = None) -> T:
    """The typed view `cls` (BusConfig, StageConfig, ...) of its section of `cfg` (a dict from
    load_config; None: the packaged defaults). An unknown or mistyped setting is a DairError."""
    name = _SECTIONS[cls]
    raw = (cfg if cfg is not None else _defaults()).get(name) or {}
    if cfg is not None:
        # A dict built by hand (tests, embedding programs) may give only some settings.
        raw = {**_defaults()[name], **raw}
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise DairError(f"config [{name}]: unknown setting(s) {', '.join(unknown)}")
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for key in known:
        want, value = hints[key], raw[key]
        try:
            if want is int and (isinstance(value, bool) or isinstance(value, float) and not value.is_integer()):
                raise ValueError
            values[key] = want(value) if want in (int, float) else value
            if want is str and not isinstance(value, str):
                raise ValueError
        except (TypeError, ValueError):
            raise DairError(f"config [{name}] {key} = {value!r}: expected {want.__name__}") from None
    return cls(**values)
