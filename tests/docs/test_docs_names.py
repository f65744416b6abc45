"""docs/internals.md's "life of a token" names functions as module.Class.function: each exists.

A rename that forgets the walk-through fails here, so a reader can trust every name in it."""
from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent.parent / "docs" / "internals.md"


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def _resolve(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):  # the longest importable module prefix
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if hasattr(obj, attr):
                obj = getattr(obj, attr)
            elif dataclasses.is_dataclass(obj) and attr in {f.name for f in dataclasses.fields(obj)}:
                obj = None  # a dataclass field without a class-level default: it exists, and is last
            else:
                return False
        return True
    return False


def test_every_name_in_the_life_of_a_token_exists():
    section = _section(DOC.read_text(encoding="utf-8"), "The life of a token")
    names = sorted(set(re.findall(r"`(dair(?:\.\w+)+)`", section)))
    assert len(names) > 40, names  # the walk names the functions, not a few modules
    missing = [n for n in names if not _resolve(n)]
    assert not missing, f"named in docs/internals.md but not in the code: {missing}"
    # Every arrow of the walk is there, in order.
    arrows = re.findall(r"^\d\. \*\*(.+?)\*\*", section, flags=re.M)
    assert [a.split(",")[0] for a in arrows] == [
        "text → ids", "ids → step", "step → embedding", "embedding → layer ranges",
        "layer ranges → head → token", "token → next step", "token → text"]
