"""`dair serve` against a real 3-stage cluster (bus + stage processes) and a real server process on a
free loopback port, driven by the official `openai` package and by plain HTTP (Ollama, SSE framing).

Expected values come from other paths through the cluster: `dair generate --bus` / `dair score
--bus` (the CLI's synchronous client, tokenizing itself) and the bus's own chat template
(`BusClient.generate(messages=...)`), never from the server under test.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from support.serve_fixtures import KEY, MODEL, serve_process

from dair.bus.client import BusClient, BusTimeout
from dair.bus.local import LocalCluster, _command

openai = pytest.importorskip("openai", reason="the openai package is in the [test] extra")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _dair(*args: str, timeout: float = 120.0, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_command("dair", "dair.cli") + list(args), capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def server(cluster3: LocalCluster, default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve_process(cluster3.addr, default_model, tmp_path_factory.mktemp("serve")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tokenizer(default_model: Path):
    from dair.model import open_model
    from dair.tokenizer import load_tokenizer

    return load_tokenizer(open_model(default_model))


def _decode_logprobs(model_file, prompt_ids: list[int], gen: list[int]) -> list[np.ndarray]:
    """Per generated token, log-softmax of the logits it was sampled from, computed here as the
    stages compute them (one prefill of the prompt, then one decode step per token; the config's
    KV cache type) with the in-process engine and numpy's log-softmax.

    Not `dair score`'s: score prefills prompt + answer in one pass, and rows computed in another
    order differ by ~1e-6, which the Q8 rounding of activations (and the f16 KV cache) can flip
    into a whole quantization step: 0.01-0.15 in a logprob within a few tokens of this model. Only
    the first token's row is computed the same way by both, and is compared with score below."""
    from dair.config import defaults
    from dair.engine.forward import RangeEngine

    eng = RangeEngine(model_file, 0, model_file.config.n_layers - 1, threads=1,
                      kv_type=defaults("stage").get("kv_type", "f16"))
    eng.open_session("ref")
    rows, pos, chunk = [], 0, list(prompt_ids)
    for tok in gen:
        y = eng.run_layers(eng.embed(np.array(chunk, dtype=np.int32)),
                           [("ref", np.arange(pos, pos + len(chunk), dtype=np.int32))])
        z = eng.head(y[-1:])[0].astype(np.float64)
        rows.append(z - z.max() - np.log(np.exp(z - z.max()).sum()))
        pos, chunk = pos + len(chunk), [tok]
    eng.close()
    return rows


def _check_entries(content, rows: list[np.ndarray], gen: list[int], tokenizer, top_n: int) -> None:
    for j, (entry, row) in enumerate(zip(content, rows, strict=True)):
        assert math.isclose(entry.logprob, row[gen[j]], abs_tol=1e-4), (j, entry.logprob, row[gen[j]])
        best = np.argsort(-row, kind="stable")[:top_n]
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([int(i)]) for i in best], j
        for t, i in zip(entry.top_logprobs, best, strict=True):
            assert math.isclose(t.logprob, row[i], abs_tol=1e-4)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def _generate_cli(bus: str, prompt: str, n: int) -> dict:
    r = _dair("generate", "--bus", bus, "--temperature", "0", "-n", str(n), "--json", prompt)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- OpenAI ------------------------------------------------------------------------------------
def test_models_lists_the_cluster_model(client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_equals_dair_generate(client, cluster3: LocalCluster) -> None:
    prompt, n = "The three primary colours are", 12
    want = _generate_cli(cluster3.addr, prompt, n)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)
    assert r.choices[0].text == want["text"]
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(want["prompt_ids"])
    assert r.usage.completion_tokens == len(want["ids"]) == n
    assert r.usage.total_tokens == len(want["prompt_ids"]) + n


def test_chat_equals_the_bus_template_answer(client, cluster3: LocalCluster) -> None:
    with BusClient(cluster3.addr, timeout=120) as bc:
        done = [ev for ev in bc.generate(messages=QUESTION, params={"temperature": 0}, max_tokens=16)][-1]
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16)
    assert r.choices[0].message.content == done["text"]
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == done["n_prompt"]
    assert r.usage.completion_tokens == len(done["ids"]) - (done["stop"] == "eos")


def test_greedy_chat_follows_llama_cpp(client, tokenizer) -> None:
    """llama.cpp's greedy answer to the same question in the same template (tests/data/chat.ref.json):
    the same prompt tokens, and the same answer token for token up to the first near-tie of the
    reference's logits (top-2 within 0.75, the reference data's rule), where Q4_1 rounding may pick
    the other one; there the answer must pick one of the tied tokens."""
    ref = json.loads((Path(__file__).parent.parent / "data" / "chat.ref.json").read_text())
    msgs = [{"role": "user", "content": ref["question"]}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=len(ref["ids"]),
                                       logprobs=True)
    assert r.usage.prompt_tokens == len(ref["prompt_ids"])
    got = [e.token for e in r.choices[0].logprobs.content]
    compared = 0
    for j, (want, top5) in enumerate(zip(ref["ids"], ref["top5"], strict=False)):
        tied = [tokenizer.decode([t]) for t, v in top5 if top5[0][1] - v < 0.75]
        if len(tied) > 1:
            assert got[j] in tied, (j, got[j], tied)
            if got[j] != tokenizer.decode([want]):
                break
        else:
            assert got[j] == tokenizer.decode([want]), (j, got[:j + 1], tokenizer.decode(ref["ids"][:j + 1]))
        compared += 1
    assert compared >= 5


def test_streamed_chat_equals_non_streamed(client) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16)
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert len([p for p in pieces if p]) > 1, "the answer must arrive in several pieces"
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_logprobs_are_those_the_tokens_were_sampled_from(client, cluster3: LocalCluster, tokenizer,
                                                         model_file) -> None:
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=6,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True))
    with BusClient(cluster3.addr, timeout=120) as bc:
        gen = [ev for ev in bc.generate(messages=QUESTION, params={"temperature": 0}, max_tokens=6)][-1]["ids"]
    assert [e.token for e in content] == [tokenizer.decode([i]) for i in gen]
    _check_entries(content, _decode_logprobs(model_file, prompt_ids, gen), gen, tokenizer, 3)
    # Every token's row equals `dair score` of prompt + answer: attention computes a row alike
    # whether it is decoded alone or prefilled in a batch (ops/attn.h), so teacher forcing and
    # decoding see the same logits.
    s = _dair("score", "--bus", cluster3.addr, "--ids", ",".join(map(str, prompt_ids + gen)), "--top", "5", "--json")
    assert s.returncode == 0, s.stderr
    positions = json.loads(s.stdout)["positions"]
    for k, entry in enumerate(content):
        pos = positions[len(prompt_ids) - 1 + k]
        assert math.isclose(entry.logprob, pos["logprob_next"], abs_tol=1e-5), k
        lse = pos["top"][0][1] - pos["logprob_next"]  # greedy: the chosen id is the top one
        assert pos["top"][0][0] == gen[k]
        for t, (_, logit) in zip(entry.top_logprobs, pos["top"][:3], strict=True):
            assert math.isclose(t.logprob, logit - lse, abs_tol=1e-4), k


def test_stop_strings_are_honoured(client, cluster3: LocalCluster) -> None:
    prompt = "One, two, three, four,"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    cut = full.index(",", 3)  # a stop in the middle of the answer
    stop = full[cut - 2:cut + 2]  # spans two tokens (the end of a word and the comma after it)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == full[:cut - 2]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == full[:cut - 2]


def test_streamed_logprobs_are_on_each_tokens_chunk(client, cluster3: LocalCluster, tokenizer, model_file) -> None:
    """Sampled (not greedy), so the chosen token is not simply the top one: each streamed chunk
    carries the log-probabilities of its own tokens, those of the distribution each was drawn from."""
    n, seed = 8, 1234
    content, texts, usage = [], [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0.9, seed=seed,
                                                max_tokens=n, stream=True, logprobs=True, top_logprobs=3,
                                                stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                assert c.logprobs is not None and c.logprobs.content, "a content chunk without its logprobs"
                # The chunk's tokens are the chunk's text (plain ASCII here: nothing held back).
                assert "".join(e.token for e in c.logprobs.content) == c.delta.content
            if c.logprobs is not None:
                content += c.logprobs.content
            texts.append(c.delta.content or "")
    assert usage is not None and len(content) == usage.completion_tokens == n
    with BusClient(cluster3.addr, timeout=120) as bc:
        gen = [ev for ev in bc.generate(messages=QUESTION, params={"temperature": 0.9, "seed": seed},
                                        max_tokens=n)][-1]["ids"]
    assert [e.token for e in content] == [tokenizer.decode([i]) for i in gen]
    assert "".join(texts) == tokenizer.decode(gen)
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True))
    rows = _decode_logprobs(model_file, prompt_ids, gen)
    _check_entries(content, rows, gen, tokenizer, 3)
    assert any(int(np.argmax(row)) != g for row, g in zip(rows, gen, strict=True)), \
        "the test wants at least one sampled token that is not the most likely"


def test_streamed_completion_logprobs_count_the_token_that_completes_a_stop(client) -> None:
    """A stop string ending inside a token: that token is counted in completion_tokens, so it has
    its logprobs entry too (streamed and not), and text_offset runs over the tokens' text."""
    prompt = "One, two, three, four,"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    cut = full.index(",", 3)
    stop = full[cut - 2:cut + 2]  # ends after the space that begins the next word's token
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=stop, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == full[:cut - 2]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    joined = "".join(lp.tokens)
    assert joined.startswith(r.choices[0].text) and stop in joined and not joined.endswith(stop)  # mid-token
    assert stop not in "".join(lp.tokens[:-1])  # the last token is the one that completed it
    assert lp.text_offset == [len("".join(lp.tokens[:j])) for j in range(len(lp.tokens))]
    tokens, logprobs, offsets, text, usage = [], [], [], [], None
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=stop,
                                           logprobs=2, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text.append(c.text)
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                logprobs += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert "".join(text) == r.choices[0].text
    assert tokens == lp.tokens and offsets == lp.text_offset and usage.completion_tokens == len(tokens)
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(logprobs, lp.token_logprobs, strict=True))


def test_concurrent_streams_get_the_answers_they_get_alone(server: str) -> None:
    prompts = [f"List {k} animals:" for k in ("three", "four", "five", "six")] * 2

    async def one(c, prompt: str) -> str:
        out = []
        async for chunk in await c.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                                      stream=True):
            out += [ch.text for ch in chunk.choices]
        return "".join(out)

    async def run() -> tuple[list[str], list[str]]:
        c = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)
        alone = [await one(c, p) for p in prompts[:4]]
        together = await asyncio.gather(*(one(c, p) for p in prompts))
        await c.close()
        return alone, list(together)

    alone, together = asyncio.run(run())
    assert all(alone)
    assert together == alone + alone


def test_unsupported_parameters_are_400_naming_them(client) -> None:
    cases = [{"n": 3}, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
             {"presence_penalty": 0.5}, {"logit_bias": {"1": 5}}]
    for extra in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=QUESTION, **extra)
        assert e.value.status_code == 400
        assert e.value.body["param"] == next(iter(extra)), e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, extra_body={"mirostat": 2})
    assert e.value.body["param"] == "mirostat"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=7)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)


def test_api_key_is_required(server: str) -> None:
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(server + "/v1/chat/completions", json={"model": MODEL, "messages": QUESTION})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server + "/api/tags").status_code == 401
    assert httpx.get(server + "/metrics").status_code == 401
    assert httpx.get(server + "/health").status_code == 200  # readiness probes carry no key


def test_sse_framing(server: str) -> None:
    body = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1


def _stage_sessions(bus: str) -> tuple[list[int], int]:
    """KV caches each live stage holds (from its heartbeats), and the bus's open sessions."""
    with BusClient(bus, timeout=10) as bc:
        st = bc.status()
    sessions = [n["sessions"] for n in st["nodes"] if n["state"] != "dead"]
    assert len(sessions) == 3, st["nodes"]
    return sessions, len(st["sessions"])


def test_disconnect_cancels_the_generation_on_the_stages(server: str, cluster3: LocalCluster) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
            "max_tokens": 1500, "stream": True, "temperature": 0.8, "seed": 1}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()  # kept: dropping a half-read iterator would close the connection now
        got = 0
        while got < 4:
            got += next(lines).startswith("data: ")
        deadline = time.monotonic() + 20  # stages report their sessions with their heartbeats
        while time.monotonic() < deadline:
            sessions, bus_sessions = _stage_sessions(cluster3.addr)
            if bus_sessions >= 1 and min(sessions) >= 1:
                break
            time.sleep(0.2)
        assert bus_sessions >= 1 and min(sessions) >= 1, ("the stream's session should be on the stages",
                                                          sessions, bus_sessions)
    # The connection is closed: the server must close the session (its KV caches) on every stage.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        sessions, bus_sessions = _stage_sessions(cluster3.addr)
        if bus_sessions == 0 and not any(sessions):
            break
        time.sleep(0.3)
    assert bus_sessions == 0 and not any(sessions), (sessions, bus_sessions)


def test_health_and_metrics(server: str) -> None:
    h = httpx.get(server + "/health").json()
    assert h == {"ready": True, "problems": [], "model": MODEL}
    auth = {"Authorization": f"Bearer {KEY}"}
    httpx.post(server + "/v1/completions", headers=auth, timeout=120,
               json={"model": MODEL, "prompt": "Hello", "max_tokens": 3}).raise_for_status()
    deadline = time.monotonic() + 10  # the bus publishes its stats once a second
    while True:
        text = httpx.get(server + "/metrics", headers=auth).text
        lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
        if any(ln.startswith("dair_stage_hop_ms_p50{") for ln in lines) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    up = [ln for ln in lines if ln.startswith("dair_stage_up{")]
    assert len(up) == 3 and all(ln.endswith(" 1") for ln in up), up
    assert any(ln.startswith("dair_stage_hop_ms_p50{") and 'layers="20-29"' in ln for ln in lines)
    assert "dair_pipeline_ready 1" in lines
    assert any(ln.startswith("dair_completion_tokens_total ") for ln in lines)
    for ln in lines:  # every sample is NAME{labels} VALUE
        name_labels, _, value = ln.rpartition(" ")
        float(value)
        assert name_labels.startswith("dair_")
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


# --- Ollama ------------------------------------------------------------------------------------
def test_ollama_endpoints(server: str, client) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    tags = httpx.get(server + "/api/tags", headers=auth).json()
    assert [m["name"] for m in tags["models"]] == [MODEL]
    want = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8)
    opts = {"temperature": 0, "num_predict": 8}
    # Ollama's own examples post with `curl -d` (no JSON content type): accepted.
    r = httpx.post(server + "/api/chat", headers=auth, timeout=120,
                   content=json.dumps({"model": MODEL, "messages": QUESTION, "options": opts}))
    lines = [json.loads(ln) for ln in r.text.splitlines()]
    assert r.headers["content-type"].startswith("application/x-ndjson")
    assert r.text.endswith("\n") and all(not ln["done"] for ln in lines[:-1]) and lines[-1]["done"]
    assert "".join(ln["message"]["content"] for ln in lines) == want.choices[0].message.content
    assert lines[-1]["eval_count"] == want.usage.completion_tokens
    assert lines[-1]["prompt_eval_count"] == want.usage.prompt_tokens
    assert lines[-1]["done_reason"] == "length"
    g = httpx.post(server + "/api/generate", headers=auth, timeout=120,
                   json={"model": MODEL, "prompt": QUESTION[0]["content"], "stream": False, "options": opts}).json()
    assert g["response"] == want.choices[0].message.content and g["done"] is True
    raw = httpx.post(server + "/api/generate", headers=auth, timeout=120,
                     json={"model": MODEL + ":latest", "prompt": "The three primary colours are", "raw": True,
                           "options": opts})
    assert "".join(json.loads(ln)["response"] for ln in raw.text.splitlines())
    bad = httpx.post(server + "/api/generate", headers=auth, json={"model": MODEL, "options": {"mirostat": 1}})
    assert bad.status_code == 400 and "mirostat" in bad.json()["error"]


def _gguf_facts(path: Path) -> tuple[dict, int, str]:
    """The file's metadata, parameter count and quantization as the `gguf` package reads them."""
    from gguf import GGUFReader, GGUFValueType, LlamaFileType

    r = GGUFReader(str(path))
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        if f.types[0] == GGUFValueType.ARRAY:
            meta[k] = ("array", len(f.data))
        elif f.types[0] == GGUFValueType.STRING:
            meta[k] = bytes(f.parts[-1]).decode()
        else:
            meta[k] = f.parts[-1][0].item()
    params = sum(int(t.n_elements) for t in r.tensors)
    ftype = LlamaFileType(meta["general.file_type"]).name.removeprefix("MOSTLY_")
    return meta, params, ftype


def test_ollama_show_describes_the_model_file(server: str, default_model: Path, tokenizer) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    meta, params, ftype = _gguf_facts(default_model)
    r = httpx.post(server + "/api/show", headers=auth, content=json.dumps({"model": MODEL}))
    assert r.status_code == 200, r.text
    show = r.json()
    d = show["details"]
    assert d["format"] == "gguf" and d["family"] == meta["general.architecture"] == "llama"
    assert d["families"] == ["llama"] and d["quantization_level"] == ftype == "Q4_1"
    assert d["parameter_size"] == f"{params / 1e6:.0f}M"
    info = show["model_info"]
    assert info["general.parameter_count"] == params
    for k, v in meta.items():  # every key, scalars with the value the gguf package reads
        if isinstance(v, tuple):  # long arrays (the vocabulary) only when verbose, as Ollama sends them
            assert len(info[k]) == (v[1] if v[1] <= 64 else 0), k
        else:
            assert info[k] == pytest.approx(v) if isinstance(v, float) else info[k] == v, k
    verbose = httpx.post(server + "/api/show", headers=auth, timeout=60,
                         json={"model": MODEL, "verbose": True}).json()["model_info"]
    assert len(verbose["tokenizer.ggml.tokens"]) == meta["tokenizer.ggml.tokens"][1] == tokenizer.vocab_size
    assert verbose["tokenizer.ggml.tokens"][:3] == [tokenizer.decode([i]) for i in range(3)]
    assert show["template"] == meta["tokenizer.chat_template"]
    eos = tokenizer.decode([meta["tokenizer.ggml.eos_token_id"]])
    assert f'"{eos}"' in show["parameters"] and "num_ctx" in show["parameters"]
    assert show["capabilities"] == ["completion"] and show["license"] == meta["general.license"]
    # Older clients send "name"; an unknown model is Ollama's 404 with an "error" string.
    assert httpx.post(server + "/api/show", headers=auth, json={"name": MODEL + ":latest"}).json()["details"] == d
    bad = httpx.post(server + "/api/show", headers=auth, json={"model": "no-such-model"})
    assert bad.status_code == 404 and "no-such-model" in bad.json()["error"]


@pytest.mark.slow
def test_ollama_ps_lists_the_model_the_stages_hold(server: str, cluster3: LocalCluster, default_model: Path) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    _, params, ftype = _gguf_facts(default_model)
    ps = httpx.get(server + "/api/ps", headers=auth).json()
    [m] = ps["models"]
    assert m["name"] == m["model"] == MODEL and m["size_vram"] == 0
    assert m["details"]["quantization_level"] == ftype and m["details"]["family"] == "llama"
    with BusClient(cluster3.addr, timeout=10) as c:
        st, info = c.status(), c.hello()["model"]
    assert m["digest"] == info["fingerprint"] and m["context_length"] == info["max_context"]
    held = sum(n["resident_bytes"] + n.get("kv_bytes", 0) for n in st["nodes"] if n["state"] not in ("standby", "dead"))
    from gguf import GGUFReader

    tensors = GGUFReader(str(default_model)).tensors
    weights = sum(int(t.n_bytes) for t in tensors)
    embedding = next(int(t.n_bytes) for t in tensors if t.name == "token_embd.weight")
    # Every weight is held by the stage that owns it; the tied output (this model has no
    # output.weight) is the embedding, held by the first stage and by the last one for its head.
    kv = sum(n.get("kv_bytes", 0) for n in st["nodes"])
    assert m["size"] == held == weights + embedding + kv
    assert m["expires_at"] > "2200"  # loaded for as long as the cluster runs (Ollama's keep_alive < 0)


# --- faults and security -------------------------------------------------------------------------
def test_missing_layer_range_is_503_with_retry_after(default_model: Path, tmp_path: Path) -> None:
    """A keyed cluster whose stages cover only layers 0-9: not ready. The server joins it with
    its CurveZMQ keys and answers 503 + Retry-After at once instead of hanging."""
    from dair.security import make_cluster_keys

    keys = tmp_path / "keys"
    make_cluster_keys(str(keys))
    log = open(tmp_path / "cluster.log", "w")  # noqa: SIM115 - closed below
    cluster = LocalCluster(str(default_model), [(0, 9)], threads=1, log=log, keys_dir=str(keys)).start()
    try:
        with serve_process(cluster.addr, default_model, tmp_path, extra=["--keys", str(keys)],
                           want_ready=False) as url:
            auth = {"Authorization": f"Bearer {KEY}"}
            t0 = time.monotonic()
            r = httpx.post(url + "/v1/chat/completions", headers=auth, timeout=60,
                           json={"model": MODEL, "messages": QUESTION})
            assert time.monotonic() - t0 < 30
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) > 0
            assert r.json()["error"]["code"] == "not_ready" and "10-29" in r.json()["error"]["message"]
            h = httpx.get(url + "/health")
            assert h.status_code == 503 and not h.json()["ready"]
            o = httpx.post(url + "/api/chat", headers=auth, timeout=60, json={"model": MODEL, "messages": QUESTION})
            assert o.status_code == 503 and "not covered" in o.json()["error"]
            # The bus gone: once it has been silent for a heartbeat timeout (0.5 s x 6 here), a
            # request is refused at once rather than left waiting for it.
            cluster.bus.kill()
            cluster.bus.wait()
            time.sleep(4)
            t0 = time.monotonic()
            gone = httpx.post(url + "/v1/chat/completions", headers=auth, timeout=60,
                              json={"model": MODEL, "messages": QUESTION})
            # "At once" as against waiting out the request (60 s): a bound loose enough for a loaded
            # machine, not a speed check.
            assert time.monotonic() - t0 < 20
            assert gone.status_code == 503 and gone.json()["error"]["code"] == "bus_unreachable", gone.text
            assert int(gone.headers["retry-after"]) > 0
    finally:
        cluster.stop()
        log.close()


@pytest.mark.slow
def test_busy_is_429_and_bus_restart_and_failover_are_pauses(default_model: Path, tmp_path: Path) -> None:
    """One stage holding every layer and a standby, a bus allowing one session per client: a second
    request while one streams is refused with 429 + Retry-After; then the bus is restarted
    mid-stream, and in a second stream the stage is killed (the standby takes its range): both
    streams go on after a pause with the tokens an uninterrupted run gives."""
    from support.cluster_fixtures import TEST_CONFIG, start_cluster, stop_cluster

    cfg = tmp_path / "config.toml"
    cfg.write_text(TEST_CONFIG.replace("[bus]\n", "[bus]\nmax_sessions_per_client = 1\n"))
    c = start_cluster(default_model, [(0, 29)], tmp_path, config=cfg)
    c.add_standby()
    auth = {"Authorization": f"Bearer {KEY}"}
    prompt, n = "The history of the Roman Empire began", 48
    try:
        want = _generate_cli(c.addr, prompt, n)["text"]
        _wait_status(c.addr, lambda st: any(nd["state"] == "standby" for nd in st["nodes"]))
        with serve_process(c.addr, default_model, tmp_path) as url:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth, timeout=120) as r:
                lines = r.iter_lines()
                events = []
                while len(events) < 4:
                    line = next(lines)
                    if line.startswith("data: "):
                        events.append(line)
                busy = httpx.post(url + "/v1/completions", headers=auth, timeout=60,
                                  json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
                assert busy.status_code == 429, busy.text
                assert int(busy.headers["retry-after"]) > 0 and busy.json()["error"]["code"] == "busy"
                c.bus.terminate()
                c.bus.wait(10)
                c.bus = c._spawn(c.bus_command())
                events += [ln for ln in lines if ln.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
            assert all("error" not in ch for ch in chunks), chunks[-1]
            assert "".join(ch["choices"][0]["text"] for ch in chunks) == want
            metrics = httpx.get(url + "/metrics", headers=auth).text
            assert "dair_requests_resumed_total 1" in metrics.splitlines(), "the restart was not mid-stream"
            # Failover: the stages registered again with the new bus, the standby as a standby.
            _wait_status(c.addr, lambda st: st["ready"] and any(nd["state"] == "standby" for nd in st["nodes"]))
            stage = c.stages[0]
            with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth, timeout=120) as r:
                lines = r.iter_lines()
                events = []
                while len(events) < 4:
                    line = next(lines)
                    if line.startswith("data: "):
                        events.append(line)
                stage.kill()
                events += [ln for ln in lines if ln.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
            assert all("error" not in ch for ch in chunks), chunks[-1]
            assert "".join(ch["choices"][0]["text"] for ch in chunks) == want
            st = _wait_status(c.addr, lambda st: st["ready"])
            serving = [(nd["name"], nd["first"], nd["last"]) for nd in st["nodes"] if nd["state"] in ("ready", "busy")]
            assert serving == [("stage1", 0, 29)], "the standby (stage1) should hold the killed stage0's range"
            assert "dair_requests_resumed_total 1" in httpx.get(url + "/metrics", headers=auth).text.splitlines()
    finally:
        stop_cluster(c)


def _wait_status(addr: str, cond, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    st: dict = {}
    while time.monotonic() < deadline:
        try:
            with BusClient(addr, timeout=2) as bc:
                st = bc.status()
        except BusTimeout:
            continue
        if cond(st):
            return st
        time.sleep(0.2)
    raise AssertionError(f"condition not met: {st}")


def test_non_loopback_listen_without_key_is_refused(tmp_path: Path) -> None:
    r = _dair("serve", "--bus", "tcp://127.0.0.1:1", "--listen", "0.0.0.0:1", timeout=60,
              env={"DAIR_API_KEY": ""})
    assert r.returncode == 2
    assert "refusing to listen on 0.0.0.0" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    import socket

    with socket.socket() as taken:  # a port in use: one line too, before the bus is even asked
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = _dair("serve", "--bus", "tcp://127.0.0.1:1", "--listen", f"127.0.0.1:{taken.getsockname()[1]}",
                  timeout=60)
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr and "in use" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_dair_up_http_starts_the_api_with_the_cluster(default_model: Path, tmp_path: Path) -> None:
    import signal

    from dair.bus.local import free_port_pair

    port, http_port = free_port_pair(), free_port_pair()
    url = f"http://127.0.0.1:{http_port}"
    out = open(tmp_path / "up.out", "w")  # noqa: SIM115 - closed below
    env = {k: v for k, v in os.environ.items() if k != "DAIR_API_KEY"}
    proc = subprocess.Popen(_command("dair", "dair.cli") + [
        "up", "--stages", "1", "--port", str(port), "--threads", "1", "--model", str(default_model),
        "--http", f"127.0.0.1:{http_port}", "--log", str(tmp_path / "cluster.log")],
        stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while "HTTP API and web page on" not in (tmp_path / "up.out").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "up.out").read_text()
            time.sleep(0.3)
        assert f"on {url}/" in (tmp_path / "up.out").read_text()
        assert httpx.get(url + "/health", timeout=10).json()["ready"] is True
        r = httpx.post(url + "/v1/completions", timeout=120, json={"model": MODEL, "prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        out.close()
    # Stopping the cluster stops its API too.
    deadline = time.monotonic() + 15
    while True:
        try:
            httpx.get(url + "/health", timeout=1)
        except httpx.TransportError:
            break
        assert time.monotonic() < deadline, "dair serve outlived its cluster"
        time.sleep(0.3)
    # ... gracefully: SIGTERM, and it finished its shutdown (a SIGKILL would leave no line).
    assert "dair serve: stopped" in (tmp_path / "cluster.log").read_text()
