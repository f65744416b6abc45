"""Tokenizer: llama.cpp's exact ids on the default model, decoding, streaming, chat template."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dair.errors import DairError
from dair.tokenizer import load_tokenizer

DATA = Path(__file__).resolve().parent.parent / "data"
STEM = "SmolLM2-135M-Instruct.Q4_1"


def _cases() -> list[tuple[str, list[int]]]:
    tok = json.loads((DATA / f"{STEM}.tokenize.json").read_text())
    assert tok["special_tokens_parsed"] and not tok["add_bos"]
    ref = json.loads((DATA / f"{STEM}.ref.json").read_text())
    return [(c["text"], c["ids"]) for c in tok["cases"]] + \
        [(p["prompt"], p["prompt_ids"]) for p in ref["prompts"].values()]


CASES = _cases()


@pytest.fixture(scope="module")
def tok(default_model):
    return load_tokenizer(default_model)


@pytest.mark.parametrize("text,ids", CASES, ids=[repr(t)[:24] for t, _ in CASES])
def test_llama_cpp_ids(tok, text, ids):
    assert tok.encode(text) == ids


@pytest.mark.parametrize("text,ids", CASES, ids=[repr(t)[:24] for t, _ in CASES])
def test_decode_gives_text_back(tok, text, ids):
    assert tok.decode(ids) == text


def test_case_coverage():
    texts = [t for t, _ in CASES]
    assert "" in texts
    assert any("日本語" in t for t in texts) and any("😀" in t for t in texts)
    assert any("  " in t for t in texts) and any(c.isdigit() for t in texts for c in t)
    assert any("<|im_start|>" in t for t in texts)


def test_special_tokens(tok):
    assert tok.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    plain = tok.encode("<|im_start|>", parse_special=False)
    assert 1 not in plain and len(plain) > 1
    assert tok.decode(plain) == "<|im_start|>"
    assert tok.decode([1, 9690, 2], skip_special=True) == "system"


def test_bos_eos_metadata(tok):
    assert tok.bos_id == 1 and tok.add_bos is False
    assert tok.eos_ids[0] == 2  # llama.cpp stops SmolLM2 at <|im_end|>
    assert 0 in tok.eos_ids  # <|endoftext|> ends a turn too
    assert tok.encode("hi", add_bos=True)[0] == 1 and tok.encode("hi")[0] != 1


def test_whitespace_runs_and_digits(tok):
    for text in ["a  b   c", "\n\n\n", "   ", "x\t\t\ty", "3.14159 2024-01-01 1,000,000"]:
        assert tok.decode(tok.encode(text)) == text
    # SmolLM2 (pre-type smollm) splits numbers into single digits
    assert tok.encode("2024") == [tok.encode(d)[0] for d in "2024"]


def test_stream_decoder_never_emits_partial_characters(tok):
    text = "emoji 😀👍🏽 and 日本語, naïve ünïcödé ✓"
    ids = tok.encode(text)
    assert any(len(tok.token_bytes(i).decode("utf-8", errors="replace")) != len(tok.token_bytes(i))
               or "\ufffd" in tok.token_bytes(i).decode("utf-8", errors="replace") for i in ids)
    dec = tok.stream_decoder()
    parts = [dec.feed(i) for i in ids]
    assert all("\ufffd" not in p for p in parts)
    assert "".join(parts) + dec.flush() == text


def test_stream_decoder_skips_control_tokens(tok):
    dec = tok.stream_decoder()
    out = "".join(dec.feed(i) for i in tok.encode("<|im_start|>assistant\nHi<|im_end|>"))
    assert out == "assistant\nHi"


def test_decode_rejects_out_of_range(tok):
    with pytest.raises(DairError):
        tok.decode([49152])


def test_chat_template(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(text)
    assert ids[0] == 1 and ids.count(2) == 2
    no_gen = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                     add_generation_prompt=False)
    assert no_gen == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"


def test_chat_template_is_sandboxed_and_errors_are_one_line():
    from dair.tokenizer.chat import render_chat

    with pytest.raises(DairError, match="only user"):
        render_chat("{{ raise_exception('only user') }}", [], True, "", "")
    with pytest.raises(DairError):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", [], True, "", "")
    with pytest.raises(DairError):  # immutable: templates cannot mutate what they are given
        render_chat("{% set _ = messages.append(1) %}", [{"role": "u", "content": "c"}], True, "", "")
    assert render_chat(None, [{"role": "user", "content": "x"}], True, "", "").endswith("assistant\n")


def test_cli_tokenize(default_model, capsys):
    from dair.cli import main

    text, ids = CASES[2]
    assert main(["tokenize", "--model", str(default_model), "--json", text]) == 0
    assert json.loads(capsys.readouterr().out) == {"ids": ids}
    assert main(["tokenize", "--model", str(default_model), "Hello, world!"]) == 0
    assert capsys.readouterr().out.split() == ["19556", "28", "905", "17"]
    assert main(["tokenize", "--model", str(default_model), "--no-special", "--json", "<|im_end|>"]) == 0
    assert 2 not in json.loads(capsys.readouterr().out)["ids"]
