"""A `dair serve` process for the tests: a real server on a free loopback port, over a real bus."""
from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from dair.bus.local import _command, free_port_pair

KEY = "test-key-123"
MODEL = "SmolLM2-135M-Instruct.Q4_1"


@contextlib.contextmanager
def serve_process(bus: str, model: Path, tmp: Path, api_key: str | None = KEY,
                  extra: list[str] | None = None, want_ready: bool = True) -> Iterator[str]:
    """A `dair serve` process on a free port; yields its base URL once it answers /health."""
    port = free_port_pair()
    log_path = tmp / f"serve-{port}.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    cmd = _command("dair", "dair.cli") + ["serve", "--bus", bus, "--listen", f"127.0.0.1:{port}",
                                          "--model", str(model)] + (["--api-key", api_key] if api_key else []) + (extra or [])
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"dair serve exited: {log_path.read_text()}"
            assert time.monotonic() < deadline, f"dair serve did not answer: {log_path.read_text()}"
            try:
                r = httpx.get(url + "/health", timeout=2.0)
                if r.status_code == 200 or not want_ready:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
