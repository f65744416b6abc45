"""Stop strings over a stream of text pieces: text is released only once it cannot be the start
of a stop string, so a stop that spans several tokens is never half-streamed."""
from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Text that may be shown now; after a stop string, `stopped` is set and the rest is dropped."""
        if self.stopped:
            return ""
        buf = self._held + piece
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        keep = 0  # the longest tail of buf that begins some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if s.startswith(buf[-n:]):
                    keep = n
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """What is held back when the stream ends without a stop."""
        out, self._held = self._held, ""
        return "" if self.stopped else out
