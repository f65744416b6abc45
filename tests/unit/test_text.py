"""dair.tokenizer.text: the one encoder of prompts and decoder of completions, on the real
SmolLM2 vocabulary. The expected text is what was encoded (byte-level BPE round-trips exactly),
or Tokenizer.decode of the ids before the stop token."""
from __future__ import annotations

import pytest

from dair.tokenizer import CompletionText, load_tokenizer, prompt_ids


@pytest.fixture(scope="module")
def tok(model_file):
    return load_tokenizer(model_file)


def test_pieces_joined_are_the_text_and_a_stop_token_has_none(tok):
    answer = "Hi 🎉, naïve café"
    ids = tok.encode(answer, add_bos=False)
    eot = tok.eos_ids[0]
    assert tok.decode([eot]) == "<|im_end|>"
    c = CompletionText(tok, {eot})
    pieces = [c.feed(i) for i in ids + [eot]]
    assert "".join(pieces) == c.finish() == answer
    assert pieces[-1] == ""
    # The emoji is split across byte tokens: no piece carries half of it (no U+FFFD mid-stream).
    assert all("\ufffd" not in p for p in pieces)


def test_control_tokens_and_any_stop_id_add_no_text(tok):
    ids = tok.encode("A<|im_start|>B", add_bos=False)
    assert tok.decode(ids) == "A<|im_start|>B"
    c = CompletionText(tok)  # no stop ids: <|im_start|> is a control token all the same
    assert "".join(c.feed(i) for i in ids) == c.finish() == "AB"
    # A request's own stop id (an ordinary token) ends the text too.
    word = tok.encode(" stop", add_bos=False)
    c = CompletionText(tok, set(word))
    assert [c.feed(i) for i in word] == [""] * len(word) and c.finish() == ""


def test_a_character_cut_at_the_end_is_one_replacement_character(tok):
    ids = tok.encode("ok 🎉", add_bos=False)
    c = CompletionText(tok)
    streamed = "".join(c.feed(i) for i in ids[:-1])  # the emoji's last byte never comes
    assert streamed == "ok " and c.finish() == "ok \ufffd"
    with pytest.raises(RuntimeError):
        c.feed(ids[-1])


def test_prompt_ids_of_text_messages_and_nothing(tok):
    assert prompt_ids(tok, text="The capital of France is") == tok.encode("The capital of France is")
    msgs = [{"role": "user", "content": "Name a colour."}]
    want = tok.encode("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_ids(tok, messages=msgs)[-len(want):] == want
    assert prompt_ids(tok, text="") == ([tok.bos_id] if tok.bos_id is not None else [])
    with pytest.raises(ValueError):
        prompt_ids(tok, text="a", messages=msgs)


def test_the_in_process_backend_streams_the_same_text_it_returns(local_backend):
    tok = local_backend.tokenizer
    from dair.engine.sampling import SamplingParams

    got: list[tuple[int, str]] = []
    r = local_backend.generate(prompt_ids(tok, messages=[{"role": "user", "content": "Say hi."}]),
                               SamplingParams(temperature=0), 48, set(tok.eos_ids),
                               lambda i, piece: got.append((i, piece)))
    assert [i for i, _ in got] == [i for i in r["ids"] if i not in tok.eos_ids]
    assert "".join(p for _, p in got) == r["text"] and "<|im_end|>" not in r["text"]
    want_ids = r["ids"][:-1] if r["stop"] == "eos" else r["ids"]
    assert r["text"] == tok.decode(want_ids, skip_special=True)


def test_the_cli_stream_shows_the_pieces_up_to_the_earliest_stop_string():
    import io

    from dair.commands.stream import TextStream

    out = io.StringIO()
    ts = TextStream([",", " ,,"], out)
    assert ts.feed(1, "a") and not ts.feed(2, " ,,b")  # " ,," begins before ","
    assert ts.finish("a ,,b") == "a" == out.getvalue()
    # A tail the pieces never carried (a character cut at the end) is shown at the finish.
    out = io.StringIO()
    ts = TextStream([], out)
    ts.feed(1, "ok ")
    assert ts.finish("ok \ufffd") == "ok \ufffd" == out.getvalue()
