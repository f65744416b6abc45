"""Defaults come from config.toml (one source of truth); a user file overrides them."""
from __future__ import annotations

import copy
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

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
