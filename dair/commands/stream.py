"""Streaming generated tokens as text, with stop strings, shared by generate and chat."""
from __future__ import annotations

import sys
from typing import TextIO

from dair.backend import Backend
from dair.engine.sampling import SamplingParams

STDOUT = "stdout"  # the default `out`: sys.stdout as it is when the stream starts (main may wrap it)


class TextStream:
    """Shows a generation's text pieces as they come; stops at a stop string (not printed).

    The pieces are the backend's (the bus's, or the in-process CompletionText's): text is
    decoded in one place, not again here."""

    def __init__(self, stops: list[str], out: TextIO | str | None = STDOUT) -> None:
        if out == STDOUT:
            out = sys.stdout
        self.stops = [s for s in stops if s]
        self.out = out
        self.text = ""
        self._fed = 0  # characters of the backend's text fed so far
        self._shown = 0
        self.stopped = False

    def feed(self, tok: int, piece: str) -> bool:
        """on_token for Backend.generate: False once a stop string has appeared."""
        self._fed += len(piece)
        self.text += piece
        # Cut where the earliest stop string begins (not where the first one listed does).
        cuts = [c for c in (self.text.find(s) for s in self.stops) if c >= 0]
        if cuts:
            self.text = self.text[:min(cuts)]
            self.stopped = True
        # hold back a tail that could still grow into a stop string
        hold = max((len(s) - 1 for s in self.stops), default=0)
        upto = len(self.text) if self.stopped else max(self._shown, len(self.text) - hold)
        self._emit(upto)
        return not self.stopped

    def finish(self, whole: str = "") -> str:
        """The text shown in the end; `whole` is the backend's text of the generation, whose
        tail beyond the pieces (a character left incomplete) is shown too."""
        if not self.stopped and len(whole) > self._fed:
            self.feed(-1, whole[self._fed:])
        self._emit(len(self.text))
        return self.text

    def _emit(self, upto: int) -> None:
        if self.out is not None and upto > self._shown:
            self.out.write(self.text[self._shown:upto])
            self.out.flush()
        self._shown = max(self._shown, upto)


PROGRESS_MIN_TOKENS = 1024  # prompts at least this long show prefill progress on stderr


def _prefill_progress(done: int, total: int) -> None:
    end = "\n" if done >= total else ""
    print(f"\r[prefill {done}/{total} tokens]", end=end, file=sys.stderr, flush=True)


def run_generation(backend: Backend, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                   stops: list[str], out: TextIO | str | None = STDOUT) -> tuple[dict, str]:
    stream = TextStream(stops, out)
    if hasattr(backend, "on_prefill"):  # in-process, or the bus's `progress` (BusBackend)
        backend.on_prefill = _prefill_progress if len(prompt_ids) >= PROGRESS_MIN_TOKENS else None
    result = backend.generate(prompt_ids, params, max_tokens, set(backend.tokenizer.eos_ids), stream.feed)
    text = stream.finish(result.get("text") or "")
    if stream.stopped:
        result["stop"] = "stop_string"
    return result, text
