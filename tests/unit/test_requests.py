"""bus/requests.py in one process: the requests' rules without sockets.

`Requests` owns the sessions and talks only through callbacks; here they record what would go
on the wire, and the test plays the last stage by handing back results. The expected values
come from the rules themselves (positions, chunk sizes, message order), not from the code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from dair.bus import protocol as P
from dair.bus.registry import Node, Registry
from dair.bus.requests import Requests
from dair.config import defaults, load_config

PREFILL_CHUNK = defaults("bus")["prefill_chunk"]

STAGES = (b"s0", b"s1")


@dataclass
class Wire:
    to_stages: list[tuple[bytes, dict[str, Any]]] = field(default_factory=list)
    to_clients: list[tuple[bytes, dict[str, Any]]] = field(default_factory=list)
    routed: list[list[P.Step]] = field(default_factory=list)
    busy: set[bytes] = field(default_factory=set)

    def of_type(self, t: str) -> list[dict[str, Any]]:
        return [h for _, h in self.to_clients if h["type"] == t]


@pytest.fixture(scope="module")
def tokenizer(model_file):
    from dair.tokenizer import load_tokenizer

    return load_tokenizer(model_file)


def _requests(model_file, tokenizer, **bus: Any) -> tuple[Requests, Wire]:
    cfg = load_config(None)
    cfg["bus"].update(bus)
    reg = Registry(model_file.config.n_layers)
    for ident, (a, b) in zip(STAGES, [(0, 14), (15, 29)], strict=True):
        reg.add(Node(ident=ident, node=ident.decode(), name=ident.decode(), host="h", pid=1, first=a, last=b,
                     threads=1, wire="f32", state="ready"))
    w = Wire()
    r = Requests(cfg, model_file, tokenizer, reg, send=lambda i, h: w.to_stages.append((i, h)),
                 tell=lambda c, h: w.to_clients.append((c, h)), route=lambda layer, q, f, segs: w.routed.append(segs),
                 busy_at=lambda i: i in w.busy, count=lambda code: None, log=lambda msg: None)
    return r, w


def _answer(r: Requests, seg: P.Step, token: int) -> P.Step | None:
    """The last stage's result for step `seg` (sampled token `token`), as on_tokens passes it."""
    s = r.sessions[seg.sid]
    s.qs.pop(seg.step_id)
    return r.on_token(s, {"sid": seg.sid, "q": seg.step_id, "pos": seg.pos + len(seg.ids), "id": token})


def test_generate_streams_each_token_and_ends_at_max_tokens(model_file, tokenizer):
    r, w = _requests(model_file, tokenizer)
    r.on_generate(b"c", {"type": P.GENERATE, "req": 1, "ids": [1, 2, 3], "max_tokens": 2, "stop_ids": []})
    [seg] = w.routed.pop()
    assert (seg.pos, seg.ids, seg.out) == (0, [1, 2, 3], "sample")
    sid = seg.sid
    assert [(i, h["type"]) for i, h in w.to_stages] == [(b"s0", P.OPEN), (b"s1", P.OPEN)]
    nxt = _answer(r, seg, 42)
    assert (nxt.pos, nxt.ids) == (3, [42]) and nxt.step_id != seg.step_id
    assert _answer(r, nxt, 43) is None  # the second token is the last
    assert [h["id"] for h in w.of_type(P.TOKEN)] == [42, 43]
    [done] = w.of_type(P.DONE)
    assert done["ids"] == [42, 43] and done["stop"] == "length" and done["sid"] == sid
    assert not r.sessions  # ephemeral: closed on every stage
    assert [(i, h["type"]) for i, h in w.to_stages[-2:]] == [(b"s0", P.CLOSE), (b"s1", P.CLOSE)]


def test_max_tokens_zero_is_zero_and_bad_values_leave_no_session(model_file, tokenizer):
    r, w = _requests(model_file, tokenizer)
    r.on_generate(b"c", {"type": P.GENERATE, "req": 1, "ids": [1, 2], "max_tokens": 0})
    assert not w.routed and w.of_type(P.DONE)[0]["ids"] == [] and not r.sessions
    for bad in ({"max_tokens": -1}, {"max_tokens": 1 << 31}, {"params": {"seed": -1}},
                {"params": {"seed": 1 << 64}}, {"params": {"seed": 1.5}}):
        with pytest.raises(P.ProtocolError) as e:
            r.on_generate(b"c", {"type": P.GENERATE, "req": 2, "ids": [1, 2], **bad})
        assert e.value.code == P.E_BAD_FIELD
        assert not r.sessions and not w.routed


def test_a_long_prompt_goes_as_chunks_and_only_the_last_samples(model_file, tokenizer):
    r, w = _requests(model_file, tokenizer)
    n = 2 * PREFILL_CHUNK + 88
    r.on_generate(b"c", {"type": P.GENERATE, "req": 1, "ids": [5] * n, "max_tokens": 4})
    segs = [s for (s,) in w.routed]
    assert [(s.pos, len(s.ids), s.out) for s in segs] == [
        (0, PREFILL_CHUNK, "none"), (PREFILL_CHUNK, PREFILL_CHUNK, "none"), (2 * PREFILL_CHUNK, 88, "sample")]
    assert segs[-1].params is not None and segs[0].params is None


def test_prefill_progress_only_for_steps_in_flight(model_file, tokenizer):
    """A client that asked for progress hears of each prefill chunk that passed the last stage, as
    tokens done of the prompt's; a step number that is not in flight in its session (made up by a
    confused last stage, or forgotten by a replay) tells nobody anything."""
    r, w = _requests(model_file, tokenizer)
    n = 2 * PREFILL_CHUNK + 88
    r.on_generate(b"c", {"type": P.GENERATE, "req": 1, "ids": [5] * n, "max_tokens": 4, "progress": True})
    first, second, _last = [s for (s,) in w.routed]
    r.on_prefill_step(first.step_id + second.step_id + 1000)  # no such step
    assert w.of_type(P.PROGRESS) == []
    r.on_prefill_step(first.step_id)
    [p] = w.of_type(P.PROGRESS)
    assert (p["req"], p["done"], p["total"]) == (1, PREFILL_CHUNK, n)
    r.on_prefill_step(first.step_id)  # once per step
    assert len(w.of_type(P.PROGRESS)) == 1
    r.forget_kv()  # a lost range: the steps in flight are forgotten and replayed
    r.on_prefill_step(second.step_id)
    assert len(w.of_type(P.PROGRESS)) == 1


def test_prefill_chunks_before_the_last_are_the_silent_steps(model_file, tokenizer):
    """The steps that ask nothing of the last stage are known as such while in flight: their
    result (that they passed it) ends them there, not the request's end; the last chunk samples.
    Replay forgets them with the rest."""
    r, w = _requests(model_file, tokenizer)
    n = 2 * PREFILL_CHUNK + 88
    r.on_generate(b"c", {"type": P.GENERATE, "req": 1, "ids": [5] * n, "max_tokens": 4})
    first, second, last = [s for (s,) in w.routed]
    [sess] = r.sessions.values()
    assert sess.silent == {first.step_id, second.step_id} and last.step_id not in sess.silent
    assert set(sess.qs) == {first.step_id, second.step_id, last.step_id}
    r.on_silent_result(sess, first.step_id)  # its result came from the stage that holds it
    assert first.step_id not in sess.qs and sess.silent == {second.step_id}
    r.forget_kv()
    assert sess.silent == set() and sess.qs == {}


def test_a_silent_result_sends_progress_once(model_file, tokenizer):
    r, w = _requests(model_file, tokenizer)
    n = 2 * PREFILL_CHUNK + 88
    r.on_generate(b"c", {"type": P.GENERATE, "req": 1, "ids": [5] * n, "max_tokens": 4, "progress": True})
    first, _second, _last = [s for (s,) in w.routed]
    [sess] = r.sessions.values()
    r.on_silent_result(sess, first.step_id)
    r.on_silent_result(sess, first.step_id)  # a second result for it is stale
    [p] = w.of_type(P.PROGRESS)
    assert (p["done"], p["total"]) == (PREFILL_CHUNK, n)


def test_a_lost_range_pauses_then_replays_the_history_from_zero(model_file, tokenizer):
    r, w = _requests(model_file, tokenizer)
    r.on_generate(b"c", {"type": P.GENERATE, "req": 1, "ids": [1, 2, 3], "max_tokens": 5, "stop_ids": []})
    [seg] = w.routed.pop()
    nxt = _answer(r, seg, 42)
    s = r.sessions[seg.sid]
    r.forget_kv()
    assert s.paused and not s.qs and s.kv_len == 0
    r.resume_paused()
    [replay] = w.routed.pop()
    # The whole history again (prompt + the token so far), sampling where the request left off.
    assert (replay.pos, replay.ids, replay.out) == (0, [1, 2, 3, 42], "sample")
    assert nxt.step_id not in s.qs and replay.step_id in s.qs and not s.paused


def test_session_limits_and_silent_clients(model_file, tokenizer):
    r, w = _requests(model_file, tokenizer, max_sessions_per_client=2)
    for i in range(2):
        r.on_session_open(b"c", {"type": P.SESSION_OPEN, "req": i})
    with pytest.raises(P.ProtocolError) as e:
        r.on_session_open(b"c", {"type": P.SESSION_OPEN, "req": 9})
    assert e.value.code == P.E_BUSY and len(r.sessions) == 2
    r.expire_idle(now=1e9, silence=3.0, client_seen={b"c": 1e9 - 10})  # silent for 10 s
    assert not r.sessions
    assert sum(h["type"] == P.CLOSE for _, h in w.to_stages) == 2 * len(STAGES)


def test_decode_steps_wait_for_a_group_at_the_last_stage(model_file, tokenizer):
    r, w = _requests(model_file, tokenizer)
    r.on_generate(b"c", {"type": P.GENERATE, "req": 1, "ids": [1, 2], "max_tokens": 9, "stop_ids": []})
    r.on_generate(b"c", {"type": P.GENERATE, "req": 2, "ids": [3, 4], "max_tokens": 9, "stop_ids": []})
    [a], [b] = w.routed
    w.routed.clear()
    last = r.registry.get(b"s1")
    w.busy.add(b"s1")  # b's step is still at the last stage: a's next step waits for it
    r.hold_or_send(last, [_answer(r, a, 7)])
    assert not w.routed and len(r.held) == 1
    w.busy.clear()
    r.hold_or_send(last, [_answer(r, b, 8)])  # b's comes back: both go as one batch
    [batch] = w.routed
    assert sorted((s.sid, s.ids[0]) for s in batch) == sorted([(a.sid, 7), (b.sid, 8)])
    assert not r.held


def test_logprobs_ride_on_every_sample_step_and_are_checked(model_file, tokenizer):
    r, w = _requests(model_file, tokenizer)
    r.on_generate(b"c", {"type": P.GENERATE, "req": 1, "ids": [1, 2, 3], "max_tokens": 3, "stop_ids": [],
                         "logprobs": 2})
    [seg] = w.routed.pop()
    assert seg.top_k == 2
    s = r.sessions[seg.sid]
    s.qs.pop(seg.step_id)
    top = [[42, -0.1], [7, -2.5]]
    nxt = r.on_token(s, {"sid": s.sid, "q": seg.step_id, "pos": 3, "id": 42, "lp": -0.1, "top": top})
    assert nxt.top_k == 2  # decode steps ask too, not only the prompt's
    [tok] = w.of_type(P.TOKEN)
    assert (tok["lp"], tok["top"]) == (-0.1, top)
    P.validate({"v": 1, **tok})
    # A stage is trusted to compute the numbers, not to send more alternatives than asked or ids
    # beyond the vocabulary; the broker turns ValueError/KeyError into bad_field for the request.
    s.qs.pop(nxt.step_id)
    for bad in ({"lp": -1.0, "top": top * 2}, {"lp": -1.0, "top": [[1 << 30, -1.0]]},
                {"lp": float("nan"), "top": []}, {"lp": "x", "top": []}, {"top": []}):
        with pytest.raises((ValueError, KeyError)):
            r.on_token(s, {"sid": s.sid, "q": nxt.step_id, "pos": 4, "id": 5, **bad})
    # Without logprobs no step carries k and tokens carry none.
    r2, w2 = _requests(model_file, tokenizer)
    r2.on_generate(b"c", {"type": P.GENERATE, "req": 1, "ids": [1, 2, 3], "max_tokens": 2, "stop_ids": []})
    [seg] = w2.routed.pop()
    assert seg.top_k is None
    # logprobs 0 (the token's own only) still asks the stage for k=1 and sends no alternatives.
    r3, w3 = _requests(model_file, tokenizer)
    r3.on_generate(b"c", {"type": P.GENERATE, "req": 1, "ids": [1, 2, 3], "max_tokens": 2, "stop_ids": [],
                          "logprobs": 0})
    [seg] = w3.routed.pop()
    assert seg.top_k == 1
    s = r3.sessions[seg.sid]
    s.qs.pop(seg.step_id)
    r3.on_token(s, {"sid": s.sid, "q": seg.step_id, "pos": 3, "id": 42, "lp": -0.1, "top": [[42, -0.1]]})
    assert w3.of_type(P.TOKEN)[0]["top"] == []


def test_generate_logprobs_and_sample_k_are_bounded():
    for bad in (21, -1, True):
        with pytest.raises(P.ProtocolError):
            P.validate({"v": 1, "type": P.GENERATE, "req": 1, "ids": [1], "logprobs": bad})
    seg = {"sid": "s", "pos": 0, "ids": [1], "q": 1, "out": "sample"}
    act = {"v": 1, "type": P.ACT, "layer": 0, "dtype": "ids", "shape": [1]}
    P.validate({**act, "segs": [{**seg, "k": 20}]})
    P.validate({**act, "segs": [{**seg, "out": "score", "k": 500}]})
    with pytest.raises(P.ProtocolError) as e:
        P.validate({**act, "segs": [{**seg, "k": 21}]})
    assert "1..20" in str(e.value)


def test_sample_steps_bring_the_repeat_penalty_its_window_of_the_bus_history(model_file, tokenizer):
    """The bus owns a session's tokens: a sample step carries the ids before it that the repeat
    penalty looks back on (repeat_last_n of them), so the last stage keeps no history."""
    r, w = _requests(model_file, tokenizer)
    r.on_generate(b"c", {"type": P.GENERATE, "req": 1, "ids": [1, 2, 3, 4, 5, 6], "max_tokens": 3,
                         "stop_ids": [], "params": {"repeat_penalty": 1.3, "repeat_last_n": 4}})
    [seg] = w.routed.pop()
    assert seg.recent == [] and seg.params["repeat_last_n"] == 4  # the prompt is all in `ids`
    nxt = _answer(r, seg, 42)
    assert (nxt.recent, nxt.ids) == ([3, 4, 5, 6], [42])  # with ids: the last 4 of 1..6, 42
    assert _answer(r, nxt, 43).recent == [4, 5, 6, 42]
    # A long prompt: only the sampling chunk carries a window, the tokens just before it.
    n = PREFILL_CHUNK + 10
    r.on_generate(b"c", {"type": P.GENERATE, "req": 2, "ids": list(range(n)), "max_tokens": 3,
                         "params": {"repeat_penalty": 1.3, "repeat_last_n": 4}})
    first, last = [s for (s,) in w.routed[-2:]]
    assert first.recent is None and last.recent == list(range(PREFILL_CHUNK - 4, PREFILL_CHUNK))
    # No penalty (repeat_penalty 1): no window at all, nothing extra on the wire.
    r.on_generate(b"c", {"type": P.GENERATE, "req": 3, "ids": [1, 2, 3], "max_tokens": 3,
                         "params": {"repeat_penalty": 1.0}})
    [seg] = w.routed[-1]
    assert seg.recent is None and _answer(r, seg, 9).recent is None


def test_done_text_is_the_streamed_pieces_and_has_no_stop_token(model_file, tokenizer):
    """The bus decodes each generation once (its CompletionText): the `token` pieces joined are
    `done.text`, which is the answer without the end-of-turn token that ended it."""
    answer = "Blue, like the sky 🎉"
    ids = tokenizer.encode(answer, add_bos=False)
    eot = tokenizer.eos_ids[0]
    r, w = _requests(model_file, tokenizer)
    r.on_generate(b"c", {"type": P.GENERATE, "req": 1, "messages": [{"role": "user", "content": "A colour?"}],
                         "max_tokens": 64})
    [step] = w.routed.pop()
    assert step.ids == tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": "A colour?"}], add_generation_prompt=True))  # encoded on the bus
    for i in ids + [eot]:
        step = _answer(r, step, i)
    assert step is None
    [done] = w.of_type(P.DONE)
    pieces = [h["text"] for h in w.of_type(P.TOKEN)]
    assert done["stop"] == "eos" and done["ids"] == ids + [eot]  # the stop id is kept in ids
    assert "".join(pieces) == done["text"] == answer == tokenizer.decode(ids)
    assert "<|im_end|>" not in done["text"] and len(pieces) == len(ids)


def test_the_repeat_window_follows_the_settings_and_bad_ones_stay_errors():
    """Worked out once per settings (it is asked for every decode step), it still follows them:
    the window of repeat_last_n while the penalty is on, none at 1.0, and a setting that is not a
    number is refused every time it is asked, not remembered as an answer."""
    from dair.bus.requests import repeat_window
    from dair.engine.sampling import SamplingParams

    default_n = SamplingParams().repeat_last_n
    assert repeat_window({"repeat_penalty": 1.1}) == default_n
    assert repeat_window({"repeat_penalty": 1.1, "repeat_last_n": 8}) == 8
    assert repeat_window({"repeat_penalty": 1.0, "repeat_last_n": 8}) == 0
    assert repeat_window({"repeat_penalty": 1.1, "repeat_last_n": 8, "top_k": None}) == 8
    for _ in range(2):
        with pytest.raises(Exception):  # noqa: B017 - from_dict's own error, whatever its type
            repeat_window({"repeat_penalty": "high"})
        with pytest.raises(Exception):  # noqa: B017
            repeat_window({"repeat_penalty": [1.1]})  # unhashable: not cached, checked as before
