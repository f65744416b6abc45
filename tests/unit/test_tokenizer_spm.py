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


def test_spm_merges_equal_the_plain_loop():
    """The search for splits in C (dair.ops.strings.spm_splits, through tokenizer/spm_merges.py)
    against its definition, on pieces that test its edges: duplicates in the vocabulary, NULs,
    characters beyond the BMP, ties in score, pieces of one character."""
    from dair.tokenizer.spm_merges import _splits_loop, spm_merges

    rng = np.random.default_rng(5)
    alphabet = ["a", "b", "▁", "é", "日", "\U0001f600", "\x00"]
    pieces: dict[str, int] = {}
    for i in range(3000):
        n = int(rng.integers(1, 7))
        pieces.setdefault("".join(alphabet[j] for j in rng.integers(0, len(alphabet), n)), i)
    scores = np.round(rng.standard_normal(3000), 1).tolist()  # rounded: many ties
    got = spm_merges(pieces, scores)
    u, a, b = _splits_loop(pieces, pieces)
    want = sorted(zip((-np.asarray(scores)[u]).tolist(), a.tolist(), b.tolist(), strict=True))
    assert len(got[0]) > 1000 and any("\x00" in t for t in pieces)
    assert got == ([x for _, x, _ in want], [y for _, _, y in want])


def test_pairs_are_zip_of_the_gathered_items():
    from dair.ops.strings import pairs

    items = ["a", "▁b", "\U0001f600", ""]
    a, b = np.array([0, 3, 2, 2], np.int64), np.array([1, 1, 0, 2], np.int64)
    assert pairs(items, a, b) == list(zip([items[i] for i in a], [items[i] for i in b], strict=True))
    assert pairs(items, a[:0], b[:0]) == []
    with pytest.raises(IndexError, match="out of range"):
        pairs(items, np.array([4], np.int64), np.array([0], np.int64))
    with pytest.raises(ValueError, match="left and"):
        pairs(items, a, b[:2])


def test_spm_merges_cache_round_trips_and_survives_damage(tmp_path, monkeypatch):
    from dair.tokenizer import spm_merges as mod
    from dair.tokenizer.spm_merges import CACHE_MIN_PIECES, _splits_loop, spm_merges

    rng = np.random.default_rng(6)
    letters = "abcdefgh▁"
    pieces: dict[str, int] = {}
    while len(pieces) < CACHE_MIN_PIECES:
        pieces.setdefault("".join(letters[j] for j in rng.integers(0, len(letters), int(rng.integers(1, 7)))),
                          len(pieces))
    scores = rng.standard_normal(len(pieces)).tolist()
    u, a, b = _splits_loop(pieces, pieces)
    want = sorted(zip((-np.asarray(scores)[u]).tolist(), a.tolist(), b.tolist(), strict=True))
    want = ([x for _, x, _ in want], [y for _, _, y in want])
    assert spm_merges(pieces, scores, cache=tmp_path) == want  # searched, then stored
    (stored,) = tmp_path.glob("spm-merges-*.npz")
    search = mod._search

    def no_search(*_):
        raise AssertionError("searched although the cache holds this vocabulary")

    monkeypatch.setattr(mod, "_search", no_search)
    assert spm_merges(pieces, scores, cache=tmp_path) == want  # read back, not searched
    monkeypatch.setattr(mod, "_search", search)
    stored.write_bytes(stored.read_bytes()[:-100] + b"\0" * 100)  # damaged: searched again
    assert spm_merges(pieces, scores, cache=tmp_path) == want
    other = scores[:-1] + [scores[-1] + 1.0]  # another vocabulary: another file
    spm_merges(pieces, other, cache=tmp_path)
    assert len(list(tmp_path.glob("spm-merges-*.npz"))) == 2


def test_cached_merges_give_the_ids_of_a_fresh_search_and_damage_is_rebuilt(tmp_path, monkeypatch):
    """A vocabulary big enough for the merges cache (tokenizer/spm_merges.py): the encoder built
    from cached merges, in the background or not, encodes as the one that searched them, and as
    llama.cpp's algorithm; a damaged cache file is searched again and rewritten whole."""
    from dair.tokenizer import Tokenizer, Vocab
    from dair.tokenizer import spm_merges as mod

    rng = np.random.default_rng(7)
    letters = "abcdefgh▁é日本"
    head = ["<unk>", "<s>", "</s>", "<start_of_turn>"] + [f"<0x{b:02X}>" for b in range(256)] + ["<mask>"]
    seen = set(head)
    pieces = []
    while len(head) + len(pieces) < mod.CACHE_MIN_PIECES + 100:
        p = "".join(letters[j] for j in rng.integers(0, len(letters), int(rng.integers(1, 7))))
        if p not in seen:
            seen.add(p)
            pieces.append(p)
    tokens = head + pieces
    types = [2, 3, 3, 3] + [6] * 256 + [4] + [1] * len(pieces)
    scores = [0.0] * len(head) + rng.permutation(len(pieces)).astype(float).tolist()  # distinct
    vocab = Vocab(kind="llama", tokens=tokens, token_types=types, scores=scores, bos_id=1, eos_id=2,
                  add_bos=True)
    monkeypatch.setenv("DAIR_HOME", str(tmp_path))
    searches = []
    search = mod._search
    monkeypatch.setattr(mod, "_search", lambda *a: searches.append(1) or search(*a))
    texts = ["abc dé  日本", "  leading and   runs\t of\n\nspace ", "hg▁ab<start_of_turn>cd<mask>e",
             "fé日 ccc</s>", "日本日本 ééé", "x€y", ""]

    fresh = Tokenizer(vocab)
    want = {t: fresh.encode(t) for t in texts}
    want_plain = {t: fresh.encode(t, parse_special=False) for t in texts}
    (stored,) = (tmp_path / "tokenizers").glob("spm-vocab-merges-*.npz")
    assert len(searches) == 1
    for background in (False, True):
        cached = Tokenizer(vocab, background=background)
        assert {t: cached.encode(t) for t in texts} == want
        assert {t: cached.encode(t, parse_special=False) for t in texts} == want_plain
    assert len(searches) == 1  # both read the cache
    for t in texts:
        if "<" not in t:
            assert want[t] == reference_spm(t, tokens, scores, add_bos=True)
    assert want["hg▁ab<start_of_turn>cd<mask>e"].count(3) == 1 and 3 not in want_plain["hg▁ab<start_of_turn>cd<mask>e"]

    for n, damage in enumerate((lambda b: b[:-100] + b"\0" * 100,  # cut short
                                lambda b: b[:len(b) // 2] + bytes([b[len(b) // 2] ^ 1]) + b[len(b) // 2 + 1:])):
        stored.write_bytes(damage(stored.read_bytes()))  # damaged: searched again
        assert {t: Tokenizer(vocab).encode(t) for t in texts} == want
        assert len(searches) == 2 + n
        assert {t: Tokenizer(vocab).encode(t) for t in texts} == want  # rewritten whole: read back
        assert len(searches) == 2 + n
