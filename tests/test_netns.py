"""What crosses a network: bus, stages and client each on a host of its own (network namespaces
joined by a bridge, tests/netns.py), every host's link limited to 1 Gbit with `tbf`.

- a 3-stage cluster across namespaces generates the in-process engine's greedy tokens, token
  for token (f32 on the wire: the same arithmetic as one process);
- tokens/s and per-hop latency under the 1 Gbit limit are measured and printed (`pytest -s`);
- the rate limit really holds (a bulk TCP transfer between two hosts stays near 1 Gbit/s);
- a lab leaves nothing behind, even when the code inside it raises.

No added delay: the kernels here lack `netem`, and neither the bus nor the stages offer a hook
for a delaying transport, so the 1 ms one-way delay of issue 7 is not emulated (rate only).

Needs root and iproute2; skipped with the reason otherwise.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns import NetnsLab, cleanup_stale, client_command, start_dair_cluster, unavailable_reason

from dair.engine.sampling import SamplingParams

pytestmark = pytest.mark.netns

DATA = Path(__file__).resolve().parent / "data"
REF = json.loads((DATA / "SmolLM2-135M-Instruct.Q4_1.ref.json").read_text())
PROMPT_IDS = REF["prompts"]["capital"]["prompt_ids"]
N_TOKENS = 32
SPLIT = [(0, 9), (10, 19), (20, 29)]


@pytest.fixture(scope="module")
def lab_ok() -> None:
    cleanup_stale()
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def netns_cluster(lab_ok, default_model, cluster_config, tmp_path_factory):
    """bus on host 0, stages on hosts 1-3, host 4 free for the client."""
    log_path = tmp_path_factory.mktemp("netns") / "cluster.log"
    with open(log_path, "w", buffering=1) as log, NetnsLab(5) as lab:
        addr = start_dair_cluster(lab, str(default_model), SPLIT, wire="f32", threads=1,
                                  config=str(cluster_config), log=log)
        lab.log_path = log_path  # type: ignore[attr-defined]
        yield lab, addr


def _client(lab: NetnsLab, addr: str, tokens: int, runs: int) -> dict:
    r = lab.run(lab.hosts[4], client_command(addr, PROMPT_IDS, tokens, runs, wait=45), timeout=120,
                capture_output=True, text=True)
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        out = {"error": f"no JSON from the client (status {r.returncode}): {r.stderr[-2000:]}"}
    if "error" in out:
        log = lab.log_path.read_text()[-3000:]  # type: ignore[attr-defined]
        pytest.fail(f"client on {lab.hosts[4].addr}: {out['error']}\ncluster log:\n{log}")
    return out


def test_greedy_tokens_across_namespaces_equal_in_process_engine(netns_cluster, local_backend):
    lab, addr = netns_cluster
    want = local_backend.generate(PROMPT_IDS, SamplingParams(temperature=0.0), N_TOKENS, set())["ids"]
    got = _client(lab, addr, N_TOKENS, runs=3)
    for run in got["runs"]:
        assert run["ids"] == want
    rates = sorted(r["decode_tok_s"] for r in got["runs"])
    hops = [(n["name"], n["hop_ms_p50"], n["compute_ms_p50"]) for n in got["nodes"]]
    assert all(h is not None and h > 0 for _, h, _ in hops), hops
    # Every hop crossed the rate-limited links: the bus and the first two stages sent activations
    # through their eth0's tbf (the last stage sends token ids only).
    sent = [int(line.split()[1]) for h in lab.hosts[:4] for line in lab.qdisc_stats(h).splitlines()
            if line.strip().startswith("Sent")]
    assert all(s > N_TOKENS * 4 * 576 for s in sent[:3]) and sent[3] > 0, sent
    print(f"\nacross namespaces (1 Gbit tbf, no added delay): decode {rates[len(rates) // 2]:.1f} tok/s "
          f"(median of {len(rates)}), {got['bytes_per_token_hop']:.0f} bytes/token/hop (f32)")
    for name, hop, comp in hops:
        print(f"  {name}: hop p50 {hop:.2f} ms, compute p50 {comp:.2f} ms, added {hop - comp:.2f} ms")


RECV = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5601)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n = 0; t0 = None
while True:
    b = c.recv(1 << 20)
    if not b: break
    if t0 is None: t0 = time.perf_counter()
    n += len(b)
print(n, time.perf_counter() - t0, flush=True)
"""
SEND = """
import socket, sys
s = socket.create_connection((sys.argv[1], 5601)); buf = b"x" * (1 << 20)
for _ in range(int(sys.argv[2])): s.sendall(buf)
s.close()
"""


def test_rate_limit_holds(lab_ok):
    """A bulk transfer between two hosts runs at about the tbf rate, not at veth speed."""
    mib = 96
    with NetnsLab(2) as lab:
        a, b = lab.hosts
        rx = lab.popen(b, [sys.executable, "-c", RECV, b.addr], stdout=subprocess.PIPE, text=True)
        assert rx.stdout is not None and rx.stdout.readline().strip() == "ready"
        lab.run(a, [sys.executable, "-c", SEND, b.addr, str(mib)], timeout=30, check=True)
        n, secs = rx.stdout.readline().split()
        rx.wait(10)
    gbit = int(n) * 8 / float(secs) / 1e9
    print(f"\nbulk TCP through 1 Gbit tbf: {gbit:.2f} Gbit/s ({int(n) >> 20} MiB in {float(secs):.2f} s)")
    assert int(n) == mib << 20
    # tbf's 64 KB burst lets a little through above the rate; a free veth does several Gbit/s.
    assert 0.3 < gbit < 1.15


def test_lab_leaves_nothing_behind_on_error(lab_ok):
    def names() -> str:
        return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout

    with pytest.raises(RuntimeError, match="boom"), NetnsLab(2) as lab:
        p = lab.popen(lab.hosts[0], ["sleep", "60"])
        ns = [h.ns for h in lab.hosts]
        bridge = lab.bridge
        assert all(n in names() for n in ns)
        raise RuntimeError("boom")
    assert p.poll() is not None  # the process inside was stopped
    assert not any(n in names() for n in ns)
    deadline = time.monotonic() + 5
    while subprocess.run(["ip", "link", "show", bridge], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, f"bridge {bridge} still there"
        time.sleep(0.1)
