"""A peer trusted only for its role: a hostile stage cannot change anyone's answer.

A hostile peer here is a real ZeroMQ DEALER registered with the bus as a standby stage (with
keys: holding the cluster's stage key). It injects `tokens` results for another session's steps,
floods the bus with one huge message, and tries to take a live stage's range by registering
with that stage's pid and host. Each greedy answer must equal the in-process engine's, and the
bus must keep serving a concurrent client. Also here: a stage declared dead while a session was
closed drops that session's KV when it comes back; max_tokens 0 and out-of-range seeds over the
bus; what a stage key used as a client, and a client key used by dair-stage, are told.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import zmq
from support.cluster_fixtures import TEST_CONFIG, start_cluster, stop_cluster

from dair import security
from dair.bus import protocol as P
from dair.bus.client import BusClient, BusError
from dair.engine.sampling import SamplingParams

PROMPT = [504, 3575, 282, 4649, 314]
N_TOKENS = 24
N_LAYERS = 30
FORGED_ID = 13  # a token the greedy answer does not contain (checked below)


@pytest.fixture(scope="module")
def reference(local_backend) -> list[int]:
    ids = local_backend.generate(PROMPT, SamplingParams(temperature=0), N_TOKENS, set())["ids"]
    assert FORGED_ID not in ids
    return ids


@pytest.fixture(scope="module", params=["plain", "keys"])
def trust_cluster(request, default_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"trust-{request.param}")
    keys = security.make_cluster_keys(tmp / "keys") if request.param == "keys" else None
    (tmp / "config.toml").write_text(TEST_CONFIG)
    c = start_cluster(default_model, [(0, 14), (15, 29)], tmp, config=tmp / "config.toml", keys_dir=keys)
    c.stage_keys = security.peer_keys("stage", {}, str(keys)) if keys else None  # type: ignore[attr-defined]
    yield c
    stop_cluster(c)


def _client(c, timeout: float = 60.0) -> BusClient:
    return BusClient(c.addr, timeout=timeout, keys=c.client_keys())


def _dealer(c, keys: security.PeerKeys | None) -> zmq.Socket:
    d = zmq.Context.instance().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.setsockopt(zmq.SNDHWM, 0)
    d.setsockopt(zmq.RCVHWM, 0)
    security.apply_client_keys(d, keys)
    d.connect(c.addr)
    return d


def _register(d: zmq.Socket, fp: str, **fields) -> dict:
    """Register (a standby unless fields say otherwise); the bus's first non-heartbeat answer."""
    reg = {"type": P.REGISTER, "name": "evil", "first": -1, "last": -1, "n_layers": N_LAYERS, "fingerprint": fp,
           "host": "evil", "pid": 4242, "rss": 0, "threads": 1, "wire": "f32", "state": "standby",
           "standby": True, **fields}
    d.send_multipart(P.encode(reg))
    return _answer(d)


def _answer(d: zmq.Socket, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while d.poll(max(0.0, deadline - time.monotonic()) * 1000):
        h, _ = P.decode(d.recv_multipart())
        if h["type"] not in (P.HEARTBEAT, P.OPEN, P.CLOSE):
            return h
    raise AssertionError("no answer from the bus")


def _drain(d: zmq.Socket) -> list[dict]:
    out = []
    while d.poll(0):
        out.append(P.decode(d.recv_multipart())[0])
    return out


def _status(c) -> dict:
    with _client(c, 30) as cl:
        return cl.status()


def _greedy(cl: BusClient) -> list[int]:
    done = list(cl.generate(ids=PROMPT, max_tokens=N_TOKENS, stop_ids=[], params={"temperature": 0}))[-1]
    assert done["type"] == P.DONE
    return done["ids"]


def _forged(sid: str, qs: range, pos: int) -> dict:
    return {"type": P.TOKENS, "q": qs.start,
            "results": [{"sid": sid, "q": q, "pos": pos + i, "id": FORGED_ID} for i, q in enumerate(qs)]}


def test_injected_results_change_no_answer(trust_cluster, reference):
    """A standby sends `tokens` for every step number of a running session (the worst case:
    it knows the session id), in small messages and in one covering them all; the answer is
    the untouched one, and the refusals are counted for that peer."""
    c = trust_cluster
    with _client(c) as cl:
        fp = cl.hello()["model"]["fingerprint"]
        evil = _dealer(c, c.stage_keys)
        try:
            assert _register(evil, fp)["type"] == P.ASSIGN
            req = cl.start_generate(ids=PROMPT, max_tokens=N_TOKENS, stop_ids=[], params={"temperature": 0})
            events = cl.events(req)
            first = next(events)
            assert first["type"] == P.TOKEN
            sid, pos = first["sid"], first["pos"] + 1
            # Step numbers are a counter from 1: these cover every step of this generation.
            for lo in range(0, 4000, 32):
                evil.send_multipart(P.encode(_forged(sid, range(lo, lo + 32), pos)))
            evil.send_multipart(P.encode(_forged(sid, range(0, 4000), pos)))
            rest = list(events)
            answers = _drain(evil)
        finally:
            evil.close()
        assert [first["id"]] + [e["id"] for e in rest if e["type"] == P.TOKEN] == reference
        assert rest[-1]["ids"] == reference
        assert answers and all(a["type"] in (P.ERROR, P.HEARTBEAT, P.OPEN, P.CLOSE) for a in answers)
        assert any(a["type"] == P.ERROR and a["code"] == P.E_REFUSED for a in answers), answers[:5]
        st = cl.status()
        mine = [n for n in st["nodes"] if n["name"] == "evil"]
        assert mine and mine[0]["refused"] >= 1, mine
        assert st["counters"].get("stage_refused", 0) >= 1
        assert _greedy(cl) == reference


def test_a_huge_tokens_message_does_not_stall_the_bus(trust_cluster, reference):
    """One `tokens` message of 100,000 results (and a flood after it) costs the bus bounded
    work: a client generating at the same time gets its whole, untouched answer."""
    c = trust_cluster
    with _client(c, timeout=120) as cl:
        fp = cl.hello()["model"]["fingerprint"]
        evil = _dealer(c, c.stage_keys)
        try:
            assert _register(evil, fp, name="flood", pid=4343)["type"] == P.ASSIGN
            req = cl.start_generate(ids=PROMPT, max_tokens=N_TOKENS, stop_ids=[], params={"temperature": 0})
            events = cl.events(req)
            first = next(events)
            huge = _forged(first["sid"], range(0, 100_000), first["pos"] + 1)
            frames = P.encode(huge)
            assert len(frames[0]) < P.MAX_HEADER_BYTES
            evil.send_multipart(frames)
            for _ in range(200):  # and more of them: dropped unread once its budget is spent
                evil.send_multipart(frames)
            got = [first["id"]] + [e["id"] for e in events if e["type"] == P.TOKEN]
        finally:
            evil.close()
        assert got == reference
        st = cl.status()
        flood = [n for n in st["nodes"] if n["name"] == "flood"][0]
        assert flood["refused"] >= 1 and flood["rate_limited"] >= 1, flood
        assert _greedy(cl) == reference


def test_registering_with_a_stages_pid_and_host_takes_nothing(trust_cluster, reference):
    """A peer registering with the pid, host and name of the live 15-29 stage (all shown by
    `status`) is refused for the overlap; the live stage keeps its range and its answers."""
    c = trust_cluster
    before = _status(c)
    victim = [n for n in before["nodes"] if n["first"] == 15][0]
    fp = before["model"]["fingerprint"]
    evil = _dealer(c, c.stage_keys)
    try:
        r = _register(evil, fp, name=victim["name"], pid=victim["pid"], host=victim["host"], first=15, last=29,
                      state="ready", standby=False)
        assert r["type"] == P.ERROR and r["code"] == P.E_OVERLAP and r.get("fatal"), r
        # As a standby with the same claims: admitted as a standby, and nothing else changes.
        r = _register(evil, fp, name=victim["name"], pid=victim["pid"], host=victim["host"])
        assert r["type"] == P.ASSIGN and r["first"] == -1, r
        with _client(c) as cl:
            st = cl.status()
            owner = [n for n in st["nodes"] if n["first"] == 15 and n["state"] != "dead"]
            assert [(n["node"], n["pid"]) for n in owner] == [(victim["node"], victim["pid"])], st["nodes"]
            assert st["ready"]
            assert _greedy(cl) == reference
        got = [h for h in _drain(evil) if h["type"] == P.ACT]
        assert not got, "the impostor was sent activations"
    finally:
        evil.close()


def test_no_session_outlives_its_bus_session(trust_cluster, reference):
    """A stage declared dead (stopped) misses the `close` of a session; when it comes back the
    bus's heartbeats name the sessions it holds, and the stage drops the other one."""
    c = trust_cluster
    victim = c.stages[1]
    with _client(c) as cl:
        sid = cl.open_session({"temperature": 0})
        list(cl.generate(ids=PROMPT, sid=sid, max_tokens=2, stop_ids=[]))

        def stage_sessions() -> list[int]:
            return [n["sessions"] for n in cl.status()["nodes"] if n["first"] >= 0 and n["state"] != "dead"]

        assert _wait(lambda: stage_sessions() == [1, 1], 20), cl.status()["nodes"]
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            assert _wait(lambda: any(n["first"] == 15 and n["state"] == "dead" for n in cl.status()["nodes"]), 60)
            cl.close_session(sid)
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        assert _wait(lambda: cl.status()["ready"], 60), cl.status()
        assert _wait(lambda: cl.status()["sessions"] == [] and stage_sessions() == [0, 0], 30), cl.status()["nodes"]
        assert _greedy(cl) == reference


def _wait(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return False


def test_max_tokens_zero_and_seed_range(trust_cluster, reference):
    """max_tokens 0 gives the prompt only (as in-process), not the default; a negative one and
    a seed outside 0..2^64-1 are clear `bad_field` errors; the largest seed works."""
    c = trust_cluster
    if c.keys_dir:
        pytest.skip("the same bus code with keys: the plain run covers it")
    with _client(c) as cl:
        done = list(cl.generate(ids=PROMPT, max_tokens=0))[-1]
        assert done["type"] == P.DONE and done["ids"] == [] and done["stop"] == "length"
        with pytest.raises(BusError) as e:
            list(cl.generate(ids=PROMPT, max_tokens=-1))
        assert e.value.code == P.E_BAD_FIELD and "max_tokens" in str(e.value)
        for seed in (-1, -2**63):
            with pytest.raises(BusError) as e:
                list(cl.generate(ids=PROMPT, max_tokens=2, params={"seed": seed}))
            assert e.value.code == P.E_BAD_FIELD and "seed" in str(e.value)
        done = list(cl.generate(ids=PROMPT, max_tokens=2, params={"seed": 2**64 - 1, "temperature": 0.7}))[-1]
        assert done["type"] == P.DONE and len(done["ids"]) == 2
        assert cl.status()["sessions"] == []
        assert _greedy(cl) == reference


def test_a_key_of_the_wrong_role_is_told_so(trust_cluster, tmp_path):
    """With keys: a stage key used by a client gets the bus's `forbidden` answer (not "no
    answer"); dair-stage with a client key prints the refusal and exits non-zero."""
    c = trust_cluster
    if not c.keys_dir:
        pytest.skip("roles exist only with keys")
    with BusClient(c.addr, timeout=10, keys=c.stage_keys) as cl, pytest.raises(BusError) as e:
        cl.hello()
    assert e.value.code == P.E_FORBIDDEN and "stage key" in str(e.value)
    client_secret = os.path.join(c.keys_dir, "clients", "client.key_secret")
    p = c.add_stage(0, 0, ["--secret-key", client_secret, "--name", "wrong-key"])
    try:
        assert p.wait(60) == 2
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        c.stages.remove(p)
    log = c.log_path.read_text()
    assert "refused by the bus" in log and "client key" in log, log[-2000:]
    assert _status(c)["ready"]


def test_concurrent_clients_keep_the_pipeline_during_a_refused_flood(trust_cluster, reference):
    """Several clients generate while a standby floods refused results: every answer is the
    untouched one, and no stage is declared dead."""
    c = trust_cluster
    if c.keys_dir:
        pytest.skip("the plain run covers it")
    dead0 = _status(c)["counters"].get("stages_declared_dead", 0)
    stop = threading.Event()
    fp = _status(c)["model"]["fingerprint"]

    def flood() -> None:
        evil = _dealer(c, None)
        try:
            _register(evil, fp, name="flood2", pid=4444)
            msg = P.encode(_forged("nobody", range(0, 50), 0))
            while not stop.is_set():
                evil.send_multipart(msg)
                time.sleep(0.001)
        finally:
            evil.close()

    results: list[list[int]] = []

    def one() -> None:
        with _client(c, 180) as cl:
            results.append(_greedy(cl))

    t = threading.Thread(target=flood)
    t.start()
    try:
        workers = [threading.Thread(target=one) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(240)
    finally:
        stop.set()
        t.join(10)
    assert results == [reference] * 4
    assert _status(c)["counters"].get("stages_declared_dead", 0) == dead0


@pytest.mark.slow
def test_load_of_many_clients_causes_no_failover(cluster3):
    """A heavy load on this machine's cores: 12 `dair generate --bus` processes and 3
    `dair score --bus` at once. Every one succeeds and the bus declares no stage dead (busy
    is not dead)."""
    import subprocess

    from dair.bus.local import _command

    with BusClient(cluster3.addr, timeout=30) as cl:
        dead0 = cl.status()["counters"].get("stages_declared_dead", 0)
    log = cluster3.log_path.read_text()
    log0, again0 = log.count("declared dead"), log.count("reconnecting") + log.count("registering again")
    dair = _command("dair", "dair")
    text = "The history of the city of Paris begins with a small settlement on an island in the Seine. " * 3
    procs = [subprocess.Popen(dair + ["generate", "--bus", cluster3.addr, "-n", "24", "--temperature", "0",
                                      f"Tell me about the number {i}."],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(12)]
    procs += [subprocess.Popen(dair + ["score", "--bus", cluster3.addr, "--text", text, "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * len(procs), [e[-500:] for _, e in outs]
    with BusClient(cluster3.addr, timeout=30) as cl:
        st = cl.status()
    assert st["counters"].get("stages_declared_dead", 0) == dead0, st["counters"]
    log = cluster3.log_path.read_text()
    assert log.count("declared dead") == log0
    assert log.count("reconnecting") + log.count("registering again") == again0  # nor a stage lost the bus
    assert st["ready"] and all(n["state"] != "dead" for n in st["nodes"])


def test_a_client_header_inflating_beyond_4_mib_is_refused_undecoded(trust_cluster):
    """Decoding costs time in proportion to the inflated header: from a peer that is not a
    registered stage, a header may inflate to 4 MiB at most (it is a few KiB on the wire)."""
    import lz4.block
    import msgpack

    c = trust_cluster
    if c.keys_dir:
        pytest.skip("the plain run covers it")
    d = _dealer(c, None)
    try:
        rest = msgpack.packb({"req": 1, "ids": [1] * (5 << 20)})
        d.send_multipart([msgpack.packb({"v": 1, "type": P.GENERATE, "z": lz4.block.compress(rest)})])
        r = _answer(d)
        assert r["type"] == P.ERROR and r["code"] == P.E_TOO_LARGE, r
    finally:
        d.close()
    assert _status(c)["ready"]
