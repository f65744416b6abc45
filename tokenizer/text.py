"""A request's text, both ways: the one place a prompt becomes ids and generated ids become text.

The bus uses these for the requests it is given as text or chat messages and for the text of
every generation it streams; the CLI and `dair serve` use `prompt_ids` for the prompts they
send as ids, and the in-process backend `CompletionText` for what it generates. So a prompt is
encoded, and a completion decoded, once and the same way wherever it runs.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from dair.tokenizer.core import StreamDecoder, Tokenizer


def prompt_ids(tok: Tokenizer, *, text: str | None = None,
               messages: Sequence[dict[str, Any]] | None = None) -> list[int]:
    """The ids of a prompt: chat `messages` rendered by the model's chat template with the
    assistant's turn opened, or raw `text` (special tokens in it are parsed). An empty text is
    the BOS token alone, where the model has one: the first token then has something to follow."""
    if (text is None) == (messages is None):
        raise ValueError("give exactly one of text, messages")
    if messages is not None:
        return tok.encode(tok.apply_chat_template(list(messages), add_generation_prompt=True))
    ids = tok.encode(text)
    if not ids and tok.bos_id is not None:
        ids = [tok.bos_id]
    return ids


class CompletionText:
    """The text of one generation, fed its ids as they come.

    `feed(id)` returns the text that id completes. End-of-generation ids (`stop_ids`: the
    model's end-of-turn tokens, or the request's own) and control tokens add no text, so
    `<|im_end|>` never appears in an answer; a character split across tokens waits for its
    last byte. `finish()` returns the whole text: the pieces fed so far joined, and any
    incomplete character still held at the end (as U+FFFD).
    """

    def __init__(self, tok: Tokenizer, stop_ids: Iterable[int] = ()) -> None:
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self._decoder = StreamDecoder(tok)
        self._pieces: list[str] = []
        self._done: str | None = None

    def feed(self, token_id: int) -> str:
        if self._done is not None:
            raise RuntimeError("the completion has finished")
        if int(token_id) in self.stop_ids:
            return ""
        piece = self._decoder.feed(token_id)
        if piece:
            self._pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        """The pieces fed so far, joined."""
        return "".join(self._pieces)

    def finish(self) -> str:
        """The completion's whole text (idempotent)."""
        if self._done is None:
            self._done = self.text + self._decoder.flush()
        return self._done
