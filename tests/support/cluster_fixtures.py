"""Local clusters for the pipeline tests: real dair-bus and dair-stage processes on 127.0.0.1.

Starting a cluster costs a few seconds (each process maps the model), so the common layouts are
session-scoped and shared by every test module that needs them.
"""
from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from dair.bus import protocol as P
from dair.bus.local import LocalCluster, _command, free_port_pair

# Frames above this are dropped by ZeroMQ; small enough for a test to send a bigger one cheaply.
TEST_MAX_FRAME = 4 << 20
TEST_CONFIG = f"""
[bus]
max_frame_bytes = {TEST_MAX_FRAME}
heartbeat_interval_ms = 300
heartbeat_liveness = 10
"""


def start_cluster(model: Path, split: list[tuple[int, int]], tmp: Path, wire: str = "f32",
                  config: Path | None = None, threads: int = 1, keys_dir: Path | None = None) -> LocalCluster:
    """Start and wait until ready; on failure the assertion shows the processes' log."""
    log_path = tmp / f"cluster-{'_'.join(f'{a}-{b}' for a, b in split)}-{wire}.log"
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed with the cluster
    c = LocalCluster(str(model), split, threads=threads, wire=wire, config=str(config) if config else None, log=log,
                     keys_dir=str(keys_dir) if keys_dir else None)
    c.log_path = log_path  # type: ignore[attr-defined]
    c.start()
    try:
        c.wait_ready(120)
    except Exception as e:
        c.stop()
        log.close()
        raise AssertionError(f"cluster {split} not ready: {e}\n{log_path.read_text()[-3000:]}") from None
    return c


def stop_cluster(c: LocalCluster) -> None:
    c.stop()
    if c.log is not None:
        c.log.close()


@pytest.fixture(scope="session")
def cluster_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cluster-config") / "config.toml"
    path.write_text(TEST_CONFIG)
    return path


@pytest.fixture(scope="session")
def cluster3(default_model: Path, cluster_config: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[LocalCluster]:
    """Three even stages (0-9, 10-19, 20-29), f32 on the wire, test config (small max frame)."""
    c = start_cluster(default_model, [(0, 9), (10, 19), (20, 29)], tmp_path_factory.mktemp("cluster3"),
                      wire="f32", config=cluster_config)
    yield c
    stop_cluster(c)


@contextlib.contextmanager
def stage_behind_fake_bus(model: Path, tmp: Path, layer: int, stage_config: str = ""
                          ) -> Iterator[tuple[zmq.Socket, bytes, subprocess.Popen, Path]]:
    """A dair-stage owning one layer, connected to a ROUTER played by the test (a fake bus that
    has already answered its registration): (router, the stage's identity, process, log path)."""
    cfg = tmp / "config.toml"
    cfg.write_text("[bus]\nheartbeat_interval_ms = 500\nheartbeat_liveness = 100000\n" + stage_config)
    port = free_port_pair()
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.SNDHWM, 0)  # floods from the test must not block it
    router.bind(f"tcp://127.0.0.1:{port}")
    log_path = tmp / "stage.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(_command("dair-stage", "dair.stages.main") + [
        "--layers", f"{layer}-{layer}", "--model", str(model), "--bus", f"tcp://127.0.0.1:{port}",
        "--threads", "1", "--wire", "f32", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        assert router.poll(60_000), log_path.read_text()
        ident, *frames = router.recv_multipart()
        reg, _ = P.decode(frames)
        assert reg["type"] == P.REGISTER and (reg["first"], reg["last"]) == (layer, layer)
        router.send_multipart([ident, *P.encode({"type": P.ASSIGN, "node": "n1", "first": layer, "last": layer,
                                                  "heartbeat_ms": 500, "liveness": 100000})])
        yield router, ident, proc, log_path
    finally:
        proc.terminate()
        proc.wait(10)
        router.close()
        log.close()
