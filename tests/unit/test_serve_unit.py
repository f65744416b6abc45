"""The HTTP API's pure parts, without a cluster: stop strings over streamed pieces, request schemas,
the Prometheus text, the listen-address check."""
from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dair.errors import DairError
from dair.serve.errors import APIError
from dair.serve.metrics import render
from dair.serve.schemas import ChatCompletionRequest, CompletionRequest
from dair.serve.service import Metrics
from dair.serve.stops import StopMatcher


def _run(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces)
    return out + m.flush(), m.stopped


@given(st.lists(st.text(alphabet="ab,. ", max_size=4), max_size=12),
       st.lists(st.text(alphabet="ab,. ", min_size=1, max_size=3), min_size=1, max_size=3))
def test_stop_strings_cut_the_text_where_the_first_stop_begins(pieces: list[str], stops: list[str]) -> None:
    text = "".join(pieces)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    out, stopped = _run(pieces, stops)
    # Independent of how the text was split into pieces: the text up to the earliest stop.
    assert out == (text[:min(hits)] if hits else text)
    assert stopped == bool(hits)


def test_text_is_held_back_only_while_it_may_begin_a_stop() -> None:
    m = StopMatcher(["\nUser:"])
    assert m.feed("Paris.") == "Paris."
    assert m.feed("\nUs") == ""  # could be the stop
    assert m.feed("ually") == "\nUsually"  # was not
    assert m.feed("\nUser: hi") == "" and m.stopped


def test_schema_refusals_name_the_parameter() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for extra, param in [({"n": 2}, "n"), ({"tools": [{}]}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
                         ({"response_format": {"type": "json_object"}}, "response_format"),
                         ({"frequency_penalty": 1.0}, "frequency_penalty"),
                         ({"top_logprobs": 2}, "top_logprobs"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop")]:
        req = ChatCompletionRequest(**base, **extra)
        with pytest.raises(APIError) as e:
            req.refuse_unsupported()
            req.stop_list()
        assert e.value.status == 400 and e.value.param == param
        assert e.value.openai_body()["error"]["param"] == param
    ok = ChatCompletionRequest(**base, n=1, tool_choice="none", response_format={"type": "text"}, stop="x")
    ok.refuse_unsupported()
    assert ok.stop_list() == ["x"] and ok.token_limit() is None
    assert ChatCompletionRequest(**base, max_tokens=5, max_completion_tokens=7).token_limit() == 7
    with pytest.raises(APIError) as e:
        CompletionRequest(model="m", prompt="x", echo=True).refuse_unsupported()
    assert e.value.param == "echo"


def test_metrics_are_prometheus_text() -> None:
    m = Metrics()
    m.count("/v1/chat/completions", 200)
    m.count("/v1/chat/completions", 429)
    stats = {"ready": True, "sessions": [{"state": "decode", "tok_s": 12.5}], "totals": {"tokens": 7},
             "counters": {"busy": 1},
             "nodes": [{"node": "n1", "name": 'st"a\\ge', "first": 0, "last": 9, "state": "ready", "rss": 10,
                        "hop_ms_p50": 1.5},
                       {"node": "n2", "name": "b", "first": 10, "last": 29, "state": "dead", "rss": 20,
                        "hop_ms_p50": None}]}
    text = render(m, stats)
    sample = re.compile(r'^[a-z_][a-z0-9_]*(\{([a-z_]+="([^"\\]|\\.)*",?)+\})? -?[0-9.e+]+$')
    families: list[str] = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            families.append(line.split()[2])
        elif not line.startswith("#"):
            assert sample.match(line), line
            assert line.split("{")[0].split(" ")[0] == families[-1], f"{line} outside its family"
    assert len(families) == len(set(families))
    assert 'dair_http_requests_total{route="/v1/chat/completions",status="429"} 1' in text
    assert 'dair_stage_up{node="n1",name="st\\"a\\\\ge",layers="0-9",state="ready"} 1' in text
    assert 'dair_stage_up{node="n2",name="b",layers="10-29",state="dead"} 0' in text
    assert "dair_tokens_per_second 12.5" in text
    assert 'dair_stage_hop_ms_p50{node="n2"' not in text  # no figure yet: no sample
    assert "dair_bus_stats_available 0" in render(Metrics(), None)


def test_listen_addresses() -> None:
    from dair.commands.serve import check_listen, parse_listen

    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:9") == ("::1", 9)
    for bad in ("8080", "host:", "h:99999"):
        with pytest.raises(DairError):
            parse_listen(bad)
    check_listen("127.0.0.1", None, False)
    check_listen("0.0.0.0", "key", False)
    check_listen("0.0.0.0", None, True)
    with pytest.raises(DairError, match="refusing to listen on 0.0.0.0"):
        check_listen("0.0.0.0", None, False)


def test_routes_auth_and_error_shapes_in_process() -> None:
    """The app's routing and error shapes (no bus needed for these routes)."""
    from fastapi.testclient import TestClient

    from dair.serve.app import create_app
    from dair.serve.service import Service

    svc = Service(bus=None, tokenizer=None, model_info={"file": "m.gguf", "name": "M", "max_context": 64})
    c = TestClient(create_app(svc, api_key="k"))
    auth = {"Authorization": "Bearer k"}
    assert c.get("/v1/models", headers=auth).json()["data"][0]["id"] == "m"
    assert c.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert c.get("/v1/models").json()["error"]["code"] == "invalid_api_key"
    assert c.get("/api/tags").json() == {"error": "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'"}
    missing = c.get("/v1/nothing", headers=auth)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert c.get("/v1/chat/completions", headers=auth).status_code == 405
    bad = c.post("/v1/chat/completions", headers=auth, json={"model": "m", "messages": [{"role": "user", "content": 5}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages.0.content", bad.json()
    wrong_model = c.post("/v1/chat/completions", headers=auth, json={"model": "x", "messages": [
        {"role": "user", "content": "hi"}]})
    assert wrong_model.status_code == 404 and wrong_model.json()["error"]["param"] == "model"
    assert c.get("/", headers={}).status_code == 200  # the page itself is public; its API calls are not
    counted = dict(svc.metrics.requests)
    assert counted[("/v1/models", 401)] == 2 and counted[("/v1/models", 200)] == 1
