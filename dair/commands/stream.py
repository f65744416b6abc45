"""Streaming generated tokens as text, with stop strings, shared by generate and chat."""
from __future__ import annotations

import sys
from typing import TextIO

from dair.backend import Backend
from dair.engine.sampling import SamplingParams

STDOUT = "stdout"  # the default `out`: sys.stdout as it is when the stream starts (main may wrap it)


class TextStream:
    """Turns token ids into text as they come; stops at a stop string (which is not printed)."""

    def __init__(self, tokenizer, stops: list[str], out: TextIO | str | None = STDOUT) -> None:
        from dair.tokenizer import StreamDecoder

        if out == STDOUT:
            out = sys.stdout
        self.decoder = StreamDecoder(tokenizer)
        self.stops = [s for s in stops if s]
        self.out = out
        self.text = ""
        self._shown = 0
        self.stopped = False

    def feed(self, tok: int) -> bool:
        self.text += self.decoder.feed(tok)
        for s in self.stops:
            cut = self.text.find(s)
            if cut >= 0:
                self.text = self.text[:cut]
                self.stopped = True
        # hold back a tail that could still grow into a stop string
        hold = max((len(s) - 1 for s in self.stops), default=0)
        upto = len(self.text) if self.stopped else max(self._shown, len(self.text) - hold)
        self._emit(upto)
        return not self.stopped

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.decoder.flush()
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
    stream = TextStream(backend.tokenizer, stops, out)
    if hasattr(backend, "on_prefill"):  # in-process, or the bus's `progress` (BusBackend)
        backend.on_prefill = _prefill_progress if len(prompt_ids) >= PROGRESS_MIN_TOKENS else None
    result = backend.generate(prompt_ids, params, max_tokens, set(backend.tokenizer.eos_ids), stream.feed)
    if stream.stopped:
        result["stop"] = "stop_string"
    return result, stream.finish()
