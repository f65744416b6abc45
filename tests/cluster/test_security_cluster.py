"""CurveZMQ wired into a real cluster: bus, stages and clients on 127.0.0.1 with keys.

The building blocks are tested in tests/cluster/test_security.py; here the processes use them: allowed
keys work end to end, unknown keys and plain sockets get nothing, and a key's role limits what
its holder may send.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from support.cluster_fixtures import start_cluster, stop_cluster

from dair import security
from dair.bus import protocol as P
from dair.bus.client import BusBackend, BusClient, BusTimeout
from dair.bus.local import free_port_pair
from dair.engine.sampling import SamplingParams

DATA = Path(__file__).parent.parent / "data"
REF = json.loads((DATA / "SmolLM2-135M-Instruct.Q4_1.ref.json").read_text())
PROMPT = REF["prompts"]["capital"]["prompt_ids"]
CONFIG = "[bus]\nheartbeat_interval_ms = 300\nheartbeat_liveness = 10\n"


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def keyed(default_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keyed")
    keys = security.make_cluster_keys(tmp / "keys")
    intruder = tmp / "intruder"
    security.generate_keys(intruder, "intruder")
    (tmp / "config.toml").write_text(CONFIG)
    c = start_cluster(default_model, [(0, 14), (15, 29)], tmp, config=tmp / "config.toml", keys_dir=keys)
    c.keys = keys  # type: ignore[attr-defined]
    c.intruder = intruder / "intruder.key_secret"  # type: ignore[attr-defined]
    yield c
    stop_cluster(c)


def bus_public(c) -> bytes:
    return security.load_public(c.keys / "bus.key")


def test_keyed_cluster_generates_like_the_engine(keyed, local_backend):
    want = local_backend.generate(PROMPT, SamplingParams(temperature=0), 12, {REF["eos"]})["ids"]
    b = BusBackend(keyed.addr, timeout=60, keys=keyed.client_keys())
    try:
        got = b.generate(PROMPT, SamplingParams(temperature=0), 12, {REF["eos"]})["ids"]
    finally:
        b.close()
    assert got == want
    with BusClient(keyed.addr, timeout=10, keys=keyed.client_keys()) as cl:
        st = cl.status()
    assert st["ready"] and [n["key"] for n in st["nodes"]] == ["stage:stage", "stage:stage"]


def test_stage_with_unknown_key_cannot_register(keyed):
    before = BusClient(keyed.addr, timeout=10, keys=keyed.client_keys())
    try:
        n0 = before.status()["counters"].get("refused_keys", 0)
        p = keyed.add_stage(0, 0, ["--secret-key", str(keyed.intruder), "--name", "intruder"])
        try:
            wait_for(lambda: "refused a peer at 127.0.0.1" in keyed.log_path.read_text(), 60, "the refusal in the log")
            st = wait_for(lambda: (s := before.status())["counters"].get("refused_keys", 0) > n0 and s, 10,
                          "the refusal counted")
            assert [n["name"] for n in st["nodes"]] == ["stage0", "stage1"]
            assert p.poll() is None  # it hears nothing, so it keeps trying
        finally:
            p.terminate()
            p.wait(10)
            keyed.stages.remove(p)
    finally:
        before.close()


def test_client_with_unknown_key_gets_nothing(keyed):
    intruder = security.PeerKeys(str(keyed.intruder), bus_public(keyed))
    with BusClient(keyed.addr, timeout=1.5, keys=intruder) as c, pytest.raises(BusTimeout):
        c.hello()


def test_plain_client_cannot_talk_to_the_bus(keyed):
    with BusClient(keyed.addr, timeout=1.5) as c, pytest.raises(BusTimeout):
        c.hello()


def _dealer(addr: str, keys: security.PeerKeys) -> zmq.Socket:
    d = zmq.Context.instance().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    security.apply_client_keys(d, keys)
    d.connect(addr)
    return d


def _ask(d: zmq.Socket, header: dict, buffers: list = ()) -> dict:
    d.send_multipart(P.encode(header, buffers))
    assert d.poll(10_000), f"no answer to {header['type']}"
    return P.decode(d.recv_multipart())[0]


def test_roles_client_key_cannot_register_or_send_activations(keyed, model_file):
    client_keys = keyed.client_keys()
    d = _dealer(keyed.addr, client_keys)
    try:
        reg = {"type": P.REGISTER, "name": "sneaky", "first": 0, "last": 0, "n_layers": 30,
               "fingerprint": model_file.fingerprint, "host": "x", "pid": 1, "rss": 0, "threads": 1,
               "wire": "f32", "state": "ready"}
        r = _ask(d, reg)
        assert r["type"] == P.ERROR and r["code"] == P.E_FORBIDDEN, r
        act = {"type": P.ACT, "layer": 5, "dtype": "f32", "shape": [1, 576],
               "segs": [{"sid": "x", "pos": 0, "ids": [1], "q": 1}]}
        r = _ask(d, act, [np.zeros(576, np.float32)])
        assert r["type"] == P.ERROR and r["code"] == P.E_FORBIDDEN, r
    finally:
        d.close(linger=0)
    # A stage key, for its part, cannot generate.
    stage_keys = security.peer_keys("stage", {}, str(keyed.keys))
    d = _dealer(keyed.addr, stage_keys)
    try:
        r = _ask(d, {"type": P.GENERATE, "req": 1, "ids": PROMPT})
        assert r["type"] == P.ERROR and r["code"] == P.E_FORBIDDEN, r
    finally:
        d.close(linger=0)
    with BusClient(keyed.addr, timeout=10, keys=client_keys) as c:
        st = c.status()
    assert st["ready"] and [n["name"] for n in st["nodes"]] == ["stage0", "stage1"]


def _bus(args: list[str], model: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dair.bus.main", "--model", str(model), *args],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _until_listening(p: subprocess.Popen) -> str:
    lines = []
    for line in p.stderr:
        lines.append(line)
        if "listening on" in line:
            return line
    raise AssertionError("bus exited: " + "".join(lines))


def test_bind_beyond_loopback_needs_keys_or_insecure(default_model, tmp_path):
    port = free_port_pair("0.0.0.0")
    p = _bus(["--bind", f"tcp://0.0.0.0:{port}"], default_model)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "refusing to bind" in err and "--insecure" in err and "dair keys generate" in err
    for extra in (["--insecure"], ["--keys", str(security.make_cluster_keys(tmp_path / "k"))]):
        p = _bus(["--bind", f"tcp://0.0.0.0:{port}", *extra], default_model)
        try:
            line = _until_listening(p)
            assert ("no keys" in line) == (extra == ["--insecure"])
        finally:
            p.terminate()
            p.wait(10)


def test_up_with_keys_generates_and_keys_are_made(default_model, tmp_path):
    keys = tmp_path / "upkeys"
    r = subprocess.run([sys.executable, "-m", "dair", "up", "--stages", "2", "--port", str(free_port_pair()),
                        "--threads", "1", "--model", str(default_model), "--keys", str(keys), "--generate",
                        "The capital of France is", "--raw", "-n", "3", "--temperature", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "generated at" in r.stderr and r.stdout.strip()
    assert f"--keys {keys}" in r.stderr  # the hint tells how to talk to it
    for f in ("bus.key_secret", "stages/stage0.key", "stages/stage1.key", "clients/client.key_secret"):
        assert (keys / f).exists(), f
    assert not (keys / "stages" / "stage.key").exists()  # a key pair per stage, none shared
    assert (keys / "bus.key_secret").stat().st_mode & 0o077 == 0
