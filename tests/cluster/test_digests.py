"""Per-tensor digests (model/digests.py): every byte a stage's range uses is compared by the bus.

The failure they prevent: 64 KiB of random bytes written a third of the way into
blk.15.ffn_down.weight left the model's fingerprint unchanged, and a stage on that file was
admitted and answered junk.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import xxhash
from support.tiny_models import write_tiny_gguf

from dair.engine.residency import MADV_DONTNEED, PAGE, _addr, _madvise
from dair.model import open_model
from dair.model.digests import FileDigests, check_range, range_tensor_names

CORRUPT_TENSOR = "blk.15.ffn_down.weight"
PROMPT = [504, 3575, 282, 4649, 314, 7042, 30]
N_TOKENS = 6


def corrupt_copy(src: Path, dst: Path, model, tensor: str = CORRUPT_TENSOR) -> Path:
    """A copy of src (opened as `model`) with 64 KiB of random bytes a third of the way into
    `tensor`'s data."""
    shutil.copy(src, dst)
    t = model.tensors[tensor]
    at, size = t.offset + t.nbytes // 3, 64 << 10
    assert at + size <= t.offset + t.nbytes
    with open(dst, "r+b") as f:
        f.seek(at)
        f.write(np.random.default_rng(15).integers(0, 256, size, dtype=np.uint8).tobytes())
    return dst


@pytest.fixture(scope="module")
def copies(default_model: Path, model_file, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("digest-copies")
    clean = d / "clean.gguf"
    shutil.copy(default_model, clean)
    return {"clean": clean, "bad": corrupt_copy(default_model, d / "bad.gguf", model_file)}


@pytest.fixture(scope="module")
def opened(copies) -> dict:
    return {k: open_model(p) for k, p in copies.items()}


def _independent_digests(path: Path, reader_tensors) -> dict[str, str]:
    """XXH3-128 of each tensor's bytes, located by the gguf package and read with plain file reads."""
    out = {}
    with open(path, "rb") as f:
        for t in reader_tensors:
            f.seek(int(t.data_offset))
            out[t.name] = xxhash.xxh3_128(f.read(int(t.n_bytes))).hexdigest()
    return out


# --- the digests themselves -----------------------------------------------------------------------
def test_the_fingerprint_misses_the_corruption_and_the_digests_name_it(opened, tmp_path):
    """The reproduction: same header fingerprint; the digests differ in exactly that tensor."""
    clean, bad = opened["clean"], opened["bad"]
    assert bad.fingerprint == clean.fingerprint
    a = FileDigests(clean, cache=tmp_path / "a").for_range(0, 29)
    b = FileDigests(bad, cache=tmp_path / "b").for_range(0, 29)
    assert [n for n in a if a[n] != b[n]] == [CORRUPT_TENSOR]


def test_digests_equal_an_independent_computation(default_model, model_file, numpy_model, tmp_path):
    m = model_file
    ours = FileDigests(m, cache=tmp_path).for_range(0, m.config.n_layers - 1)
    # numpy_model holds the gguf package's own reader's tensors (tests/support/numpy_reference.py).
    want = _independent_digests(default_model, numpy_model._tensors.values())
    assert len(want) == 272 and set(want) <= set(ours)
    assert {n: ours[n] for n in want} == want
    # The head is tied to the embedding in this file: the same bytes under its second name.
    assert "output.weight" not in want and ours["output.weight"] == want["token_embd.weight"]


def test_a_range_names_only_the_tensors_it_uses(model_file):
    middle = range_tensor_names(model_file, 10, 19)
    assert len(middle) == 90 and all(n.startswith("blk.1") for n in middle)
    assert "token_embd.weight" in range_tensor_names(model_file, 0, 0)
    assert {"output_norm.weight", "output.weight"} <= set(range_tensor_names(model_file, 29, 29))
    assert "token_embd.weight" not in range_tensor_names(model_file, 29, 29)


def test_check_range_names_tensor_and_layer(opened, tmp_path):
    bus = FileDigests(opened["clean"], cache=tmp_path / "bus")
    stage = FileDigests(opened["bad"], cache=tmp_path / "stage")
    assert check_range(bus, 0, 9, stage.for_range(0, 9), "stage s") is None
    msg = check_range(bus, 10, 19, stage.for_range(10, 19), "stage s")
    assert msg is not None and f"{CORRUPT_TENSOR} (layer 15)" in msg and "stage s" in msg and "\n" not in msg
    theirs = {**bus.for_range(0, 0), "token_embd.weight": "0" * 32}
    assert "token_embd.weight (embedding)" in check_range(bus, 0, 0, theirs, "stage s")
    assert "sent no tensor digests" in check_range(bus, 3, 4, None, "stage s")


def test_hashing_maps_no_page_of_the_file(default_model, tmp_path):
    """Digests are read with pread, not through the model's map: hashing layers 10-19 (or the
    whole file, as the bus does) leaves no page of the file mapped in the process."""
    mf = open_model(default_model)  # a map of its own
    base, n_pages = _addr(mf._map), -(-mf._map.nbytes // PAGE)
    assert _madvise(base, base + mf._map.nbytes, MADV_DONTNEED, outward=True) == 0
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(base // PAGE * 8)
        before = np.frombuffer(f.read(n_pages * 8), dtype=np.uint64) >> np.uint64(63)
    assert before.sum() == 0
    d = FileDigests(mf, cache=tmp_path)
    d.for_range(10, 19)
    d.warm()
    assert d.hashed_bytes > 90e6
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(base // PAGE * 8)
        after = np.frombuffer(f.read(n_pages * 8), dtype=np.uint64) >> np.uint64(63)
    assert int(after.sum()) == 0, f"{int(after.sum())} pages of the map became present while hashing"


def test_opening_a_model_maps_no_weight_page(default_model):
    """The fingerprint reads the header and tensor table only; sampling tensor data (as it did)
    mapped pages of every tensor at open."""
    mf = open_model(default_model)
    base, n_pages = _addr(mf._map), -(-mf._map.nbytes // PAGE)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(base // PAGE * 8)
        present = (np.frombuffer(f.read(n_pages * 8), dtype=np.uint64) >> np.uint64(63)).astype(bool)
    # Reading the header's last page may map the rest of its page-cache folio (fault-around, large
    # folios: up to 2 MiB aligned): allow up to the next 2 MiB boundary past the header, nothing beyond.
    header_end = min(t.offset for t in mf.tensors.values())
    beyond = present[-(-header_end // (2 << 20)) * (2 << 20) // PAGE:]
    assert int(beyond.sum()) == 0, f"{int(beyond.sum())} weight pages mapped by open_model"


# --- the cache -----------------------------------------------------------------------------------------
def test_cache_miss_then_hit(tmp_path):
    m = open_model(write_tiny_gguf(tmp_path / "t.gguf", n_layers=4))
    first = FileDigests(m, cache=tmp_path / "c")
    assert first.cache_state == "miss"
    got = first.for_range(1, 2)
    assert first.hashed_bytes > 0
    [cache_file] = (tmp_path / "c").glob("*.json")
    data = json.loads(cache_file.read_text())
    assert data["fingerprint"] == m.fingerprint and data["algo"] == "xxh3_128" and len(data["tensors"]) == 18
    again = FileDigests(m, cache=tmp_path / "c")
    assert again.cache_state == "hit"
    assert again.for_range(1, 2) == got and again.hashed_bytes == 0
    # Lazy: another range hashes only its own tensors, and joins the same cache file.
    again.for_range(3, 3)
    assert again.hashed_bytes == sum(m.tensors[n].nbytes for n in range_tensor_names(m, 3, 3))
    assert again.hashed_bytes < sum(t.nbytes for t in m.tensors.values()) / 2
    assert len(json.loads(cache_file.read_text())["tensors"]) == 18 + 9 + 2  # + final norm, output


def test_cache_stale_by_mtime(tmp_path):
    path = write_tiny_gguf(tmp_path / "t.gguf")
    m = open_model(path)
    old = FileDigests(m, cache=tmp_path / "c").for_range(1, 1)
    t = m.tensors["blk.1.ffn_down.weight"]
    with open(path, "r+b") as f:  # rewritten in place: same size, header and inode, new mtime
        f.seek(t.offset + t.nbytes // 3)
        f.write(b"\xa5" * 64)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # whatever the clock's resolution
    fresh = FileDigests(open_model(path), cache=tmp_path / "c")
    assert fresh.cache_state == "stale"
    new = fresh.for_range(1, 1)
    assert fresh.hashed_bytes > 0
    assert [n for n in new if new[n] != old[n]] == ["blk.1.ffn_down.weight"]


def test_cache_stale_by_header_fingerprint(tmp_path):
    """A cache file whose recorded fingerprint is not the file's header's is not trusted."""
    m = open_model(write_tiny_gguf(tmp_path / "t.gguf"))
    FileDigests(m, cache=tmp_path / "c").for_range(0, 0)
    [cache_file] = (tmp_path / "c").glob("*.json")
    data = json.loads(cache_file.read_text())
    cache_file.write_text(json.dumps({**data, "fingerprint": "0" * 64,
                                      "tensors": {k: "f" * 32 for k in data["tensors"]}}))
    d = FileDigests(m, cache=tmp_path / "c")
    assert d.cache_state == "stale"
    assert d.for_range(0, 0)["blk.0.attn_q.weight"] != "f" * 32 and d.hashed_bytes > 0


# --- admission on a real cluster -------------------------------------------------------------------
def _stage_cmd(model: Path, addr: str, config: Path, *where: str) -> list[str]:
    from dair.bus.local import _command

    return _command("dair-stage", "dair.stages.main") + [*where, "--model", str(model), "--bus", addr,
                                                         "--threads", "1", "--wire", "f32", "--config", str(config)]


def _wait(cond, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{log.read_text()[-3000:]}")


def test_the_bus_admits_only_ranges_whose_bytes_match(default_model, copies, cluster_config, local_backend,
                                                      tmp_path):
    """A stage on the corrupted copy is refused by tensor and layer for a range with layer 15,
    as a registering stage and as a standby given that range; for layers 0-9 it is admitted,
    since it uses none of the damaged bytes, and answers exactly as the intact file does."""
    from dair.bus.client import BusClient
    from dair.bus.local import LocalCluster
    from dair.engine.sampling import SamplingParams

    env = {"DAIR_HOME": str(tmp_path / "home")}  # a cold digest cache, not the user's
    log = tmp_path / "cluster.log"
    with open(log, "a", buffering=1) as out:
        c = LocalCluster(str(default_model), [], config=str(cluster_config), log=out, env=env, threads=1, wire="f32")
        c.start()
        try:
            # 1. Registering with layers 10-19 from the corrupted file: refused by name, and it exits.
            r = subprocess.run(_stage_cmd(copies["bad"], c.addr, cluster_config, "--layers", "10-19"),
                               capture_output=True, text=True, timeout=120, env={**os.environ, **env})
            assert r.returncode == 2, r.stderr
            assert "refused by the bus" in r.stderr and f"{CORRUPT_TENSOR} (layer 15)" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr
            # 2. The same file for layers 0-9, clean copies for the rest, and a standby on the bad file.
            def spawn(model: Path, *where: str) -> subprocess.Popen:
                p = c._spawn(_stage_cmd(model, c.addr, cluster_config, *where))
                c.stages.append(p)
                return p

            spawn(copies["bad"], "--layers", "0-9")
            middle = spawn(copies["clean"], "--layers", "10-19")
            spawn(default_model, "--layers", "20-29")
            c.wait_ready(120)
            bad_standby = spawn(copies["bad"], "--standby")
            with BusClient(c.addr, timeout=10) as bc:
                _wait(lambda: sum(n["state"] == "standby" for n in bc.status()["nodes"]) == 1, 60, "the standby", log)
                got = list(bc.generate(ids=PROMPT, params={"temperature": 0}, max_tokens=N_TOKENS,
                                       stop_ids=[]))[-1]["ids"]
            want = local_backend.generate(PROMPT, SamplingParams(temperature=0), N_TOKENS, set())["ids"]
            assert got == want
            # 3. The intact 10-19 dies: its range goes to the standby, whose copy is refused for it.
            middle.send_signal(signal.SIGKILL)
            bad_standby.wait(60)
            assert bad_standby.returncode == 2
            text = log.read_text()
            assert f"{CORRUPT_TENSOR} (layer 15)" in text.split("assigning layers 10-19", 1)[1], text[-3000:]
            with BusClient(c.addr, timeout=10) as bc:
                st = bc.status()
                assert not st["ready"] and any("10-19" in p for p in st["problems"]), st["problems"]
                # 4. An intact standby takes the range, and the pipeline answers as before.
                spawn(copies["clean"], "--standby")
                bc.wait_ready(120)
                got = list(bc.generate(ids=PROMPT, params={"temperature": 0}, max_tokens=N_TOKENS,
                                       stop_ids=[]))[-1]["ids"]
            assert got == want
        finally:
            c.stop()


def test_dllama_files_have_digests_too(tmp_path):
    """A distributed-llama .m has no tensor table of its own; its tensors (laid out by the header)
    are digested the same way: each one's bytes read at the offset the reader derives."""
    from dair.model.convert import convert_gguf_to_dllama

    m_path, _ = convert_gguf_to_dllama(write_tiny_gguf(tmp_path / "t.gguf"), tmp_path / "t.m", "f32")
    m = open_model(m_path)
    d = FileDigests(m, cache=tmp_path / "c").for_range(0, m.config.n_layers - 1)
    assert set(d) == set(m.tensors)
    raw = Path(m_path).read_bytes()
    for name, t in m.tensors.items():
        assert d[name] == xxhash.xxh3_128(raw[t.offset:t.offset + t.nbytes]).hexdigest(), name


def test_the_gate_waits_for_its_own_hash_then_admits_or_refuses(opened, tmp_path):
    """The bus's side, without the bus: a range it has not hashed yet is "wait" (its loop never
    hashes), then matching digests are admitted and others refused; a heartbeat counts only with
    digests for the very range the bus assigned (stats first/last)."""
    from dair.model.digests import RangeGate

    gate = RangeGate(opened["clean"], progress=None, cache=tmp_path / "bus", wait_s=0.0)
    good = FileDigests(opened["clean"], cache=tmp_path / "good").for_range(10, 19)
    bad = FileDigests(opened["bad"], cache=tmp_path / "bad").for_range(10, 19)
    verdict, why = gate.admit(b"a", 10, 19, good, "stage a")
    assert verdict == "wait" and "still hashing" in why
    gate.start()._worker.join(120)
    assert gate.admit(b"a", 10, 19, good, "stage a") == ("ok", "")
    verdict, why = gate.admit(b"b", 10, 19, bad, "stage b")
    assert verdict == "refused" and f"{CORRUPT_TENSOR} (layer 15)" in why and gate.refused(b"b")
    beat = {"state": "ready", "stats": {"first": 10, "last": 19}}
    assert gate.beat(b"c", 10, 19, beat, "stage c")[0] == "wait"
    assert gate.beat(b"c", 10, 19, {**beat, "stats": {"first": 0, "last": 9}, "digests": good}, "c")[0] == "wait"
    assert gate.beat(b"c", 10, 19, {**beat, "digests": good}, "stage c") == ("ok", "")
    assert gate.beat(b"c", 10, 19, beat, "stage c") == ("ok", "")  # later beats carry none
    assert gate.beat(b"c", 20, 29, beat, "stage c")[0] == "wait"  # moved: the new range needs its own
    assert gate.beat(b"d", 10, 19, {**beat, "digests": bad}, "stage d")[0] == "refused"
