"""SentencePiece-style ("llama") tokenizer on a small synthetic vocabulary, checked against a
plain-Python transcription of llama.cpp's SPM algorithm."""
from __future__ import annotations

import numpy as np
import pytest
from support.tiny_models import write_tiny_gguf

from dair.tokenizer import load_tokenizer

PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "a", "n", "t", "▁h", "he", "ll", "llo", "▁w", "or", "ld",
          "▁wor", "▁world", "hello", "▁hello", "an", "▁an", "▁and", "d▁", "▁t", "th", "▁the", "!", "."]


def _vocab():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(PIECES)
    # longer pieces score higher, distinct scores so that ties never decide
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-(100.0 - 10 * len(p)) - i * 0.01 for i, p in enumerate(PIECES)]
    return tokens, types, scores


def reference_spm(text: str, tokens: list[str], scores: list[float], add_bos: bool) -> list[int]:
    """llama.cpp llm_tokenizer_spm: space prefix, ▁ for spaces, merge the best-scoring adjacent
    pair (leftmost on ties) while the union is a token, then byte fallback for the rest."""
    ids = {t: i for i, t in enumerate(tokens)}
    out = [1] if add_bos else []
    if not text:
        return out
    syms = list(("▁" + text).replace(" ", "▁"))
    while True:
        best = None
        for k in range(len(syms) - 1):
            u = syms[k] + syms[k + 1]
            if u in ids and (best is None or scores[ids[u]] > best[0]):
                best = (scores[ids[u]], k)
        if best is None:
            break
        k = best[1]
        syms[k:k + 2] = [syms[k] + syms[k + 1]]
    for s in syms:
        if s in ids:
            out.append(ids[s])
        else:
            out += [ids[f"<0x{b:02X}>"] for b in s.encode()]
    return out


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    tokens, types, scores = _vocab()
    p = write_tiny_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", vocab_size=len(tokens), tokenizer={
        "model": "llama", "tokens": tokens, "token_type": types, "scores": scores, "bos": 1, "eos": 2,
        "add_bos": True, "chat_template": "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                                          "{{ eos_token }}{% endfor %}"})
    return load_tokenizer(p), tokens, scores


TEXTS = ["hello world", "hello  world", "the world and hello", "héllo wörld", "日本", "a", " leading",
         "trailing ", "hello\nworld", "world!", "..", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_matches_reference_algorithm(spm, text):
    tok, tokens, scores = spm
    assert tok.encode(text) == reference_spm(text, tokens, scores, add_bos=True)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(spm, text):
    tok, _, _ = spm
    assert tok.decode(tok.encode(text), skip_special=True) == text


def test_byte_fallback_and_specials(spm):
    tok, tokens, _ = spm
    ids = tok.encode("é", add_bos=False)
    assert [tokens[i] for i in ids] == ["▁", "<0xC3>", "<0xA9>"]
    assert tok.bos_id == 1 and tok.add_bos and tok.eos_ids == (2,)
    assert tok.encode("</s>", add_bos=False) == [2]
    dec = tok.stream_decoder()
    assert [dec.feed(i) for i in ids] == [" ", "", "é"]


def test_chat_template_uses_eos_text(spm):
    tok, _, _ = spm
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi</s>"


def test_unsupported_tokenizer_model(tmp_path):
    from dair.errors import DairError

    p = write_tiny_gguf(tmp_path / "x.gguf", tokenizer={"model": "t5", "tokens": ["a"] * 96})
    with pytest.raises(DairError, match="'t5' is not supported"):
        load_tokenizer(p)


def reference_llama_cpp(text: str, tokens: list[str], types: list[int], scores: list[float],
                        parse_special: bool, space_prefix: bool = True) -> list[int]:
    """llama.cpp's tokenize_impl for SPM, transcribed plainly: split on special tokens (longest
    first; control and unknown ones only with parse_special), then each text fragment through
    reference_spm's search (a space prefix after a special token or at the start), every token
    taking part in merges and the last id of a duplicate text standing for it."""
    specials = sorted({t: i for i, (t, ty) in reversed(list(enumerate(zip(tokens, types, strict=True))))
                       if t and ty in ((2, 3, 4) if parse_special else (4,))}.items(), key=lambda kv: -len(kv[0]))
    frags: list = [text]
    for tok, tid in specials:
        out: list = []
        for f in frags:
            if isinstance(f, int):
                out.append(f)
                continue
            while tok in f:
                k = f.index(tok)
                if k:
                    out.append(f[:k])
                out.append(tid)
                f = f[k + len(tok):]
            if f:
                out.append(f)
        frags = out
    ids_of = {t: i for i, t in enumerate(tokens)}  # the last id of a duplicate
    ids: list[int] = []
    prev_special = True
    for f in frags:
        if isinstance(f, int):
            ids.append(f)
            prev_special = True
            continue
        syms = list(((" " if space_prefix and prev_special else "") + f).replace(" ", "▁"))
        prev_special = False
        while True:
            best = None
            for k in range(len(syms) - 1):
                u = syms[k] + syms[k + 1]
                if u in ids_of and (best is None or scores[ids_of[u]] > best[0]):
                    best = (scores[ids_of[u]], k)  # strictly greater: the leftmost on ties
            if best is None:
                break
            k = best[1]
            syms[k:k + 2] = [syms[k] + syms[k + 1]]
        for sym in syms:
            ids += [ids_of[sym]] if sym in ids_of else [ids_of[f"<0x{b:02X}>"] for b in sym.encode()]
    return ids


def test_big_vocabulary_with_ties_and_specials_matches_llama_cpp_algorithm():
    """A random vocabulary with many equal scores, duplicates, control, user-defined and unknown
    tokens, pieces that contain special tokens' text: dair's SPM search (tokenizer/spm.py over
    dair.ops.strings.SpmEncoder), in the background or not, against the plain transcription."""
    from dair.tokenizer import Tokenizer, Vocab

    rng = np.random.default_rng(7)
    letters = "abcdefgh▁é日本\U0001f600"
    head = ["<unk>", "<s>", "</s>", "<start_of_turn>"] + [f"<0x{b:02X}>" for b in range(256)] + ["<mask>", "<ma"]
    pieces = ["".join(letters[j] for j in rng.integers(0, len(letters), int(rng.integers(1, 7))))
              for _ in range(20000)]  # duplicates included
    pieces += ["<s", "s>", "<start", "_of_turn>", "<mask", "k>"]  # pieces that can spell special tokens
    tokens = head + pieces
    types = [2, 3, 3, 3] + [6] * 256 + [4, 1] + [1] * len(pieces)
    scores = [0.0] * len(head) + np.round(rng.standard_normal(len(pieces)), 1).tolist()  # many ties
    vocab = Vocab(kind="llama", tokens=tokens, token_types=types, scores=scores, bos_id=1, eos_id=2,
                  add_bos=True)
    texts = ["abc dé  日本", "  leading and   runs\t of\n\nspace ", "hg▁ab<start_of_turn>cd<mask>e",
             "fé日 ccc</s>", "日本日本 ééé", "x€y", "<s>a<s><s>b<unk>", "<mask<start_of_turn>>", "\U0001f600a",
             "".join(letters[j] for j in rng.integers(0, len(letters), 300))]
    for background in (False, True):
        tok = Tokenizer(vocab, background=background)
        for t in texts:
            for ps in (True, False):
                assert tok.encode(t, parse_special=ps, add_bos=False) == reference_llama_cpp(
                    t, tokens, types, scores, ps), (t, ps)
    assert tok.encode("hg▁ab<start_of_turn>cd<mask>e", add_bos=False).count(3) == 1
    assert 3 not in tok.encode("hg▁ab<start_of_turn>cd<mask>e", parse_special=False)
    assert 260 in tok.encode("a<mask>", parse_special=False)  # user-defined: always parsed


def test_spm_encoder_edges():
    """The C search alone: empty text, a byte without a token (falls back to <unk>, or is
    refused without one), bytes that are no UTF-8, a text stated twice (the last id)."""
    from dair.ops.strings import SpmEncoder

    tokens = ["<unk>", "a", "b", "ab", "ab", "<0x00>"]
    enc = SpmEncoder(tokens, np.zeros(len(tokens), np.float32), 0)
    assert enc.encode(b"") == []
    assert enc.encode(b"ab") == [4] and enc.token_id(b"ab") == 4
    assert enc.encode(b"a\x00zb") == [1, 5, 0, 2]
    assert enc.encode(b"\xe6\x97") == [0, 0]  # a cut-short character: byte by byte
    with pytest.raises(ValueError, match="no <unk>"):
        SpmEncoder(tokens[1:], np.zeros(len(tokens) - 1, np.float32), -1).encode(b"z")
    with pytest.raises(ValueError, match="scores"):
        SpmEncoder(tokens, np.zeros(2, np.float32), 0)
