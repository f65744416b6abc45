"""Messages the bus link posts to the app: the only way data reaches the widgets."""
from __future__ import annotations

from typing import Any

from textual.message import Message


class LinkState(Message):
    """The connection changed: `state` is "connecting", "connected" or "reconnecting"."""

    def __init__(self, state: str, detail: str = "", attempt: int = 0) -> None:
        super().__init__()
        self.state = state
        self.detail = detail
        self.attempt = attempt


class Welcome(Message):
    """The bus answered `hello`: `model` as in protocol.md's `welcome`."""

    def __init__(self, model: dict[str, Any], extra: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.extra = extra


class Stats(Message):
    """One stats map from the bus's PUB socket (protocol.md, "Stats")."""

    def __init__(self, data: dict[str, Any], received: float) -> None:
        super().__init__()
        self.data = data
        self.received = received


class PrefillProgress(Message):
    """The running generation's prompt: `done` of `total` tokens prefilled (long prompts)."""

    def __init__(self, req: int, done: int, total: int) -> None:
        super().__init__()
        self.req = req
        self.done = done
        self.total = total


class TokenPiece(Message):
    """A streamed token of the running generation, with the text it completes."""

    def __init__(self, req: int, text: str, pos: int) -> None:
        super().__init__()
        self.req = req
        self.text = text
        self.pos = pos


class GenerationDone(Message):
    def __init__(self, req: int, stop: str, text: str, n_tokens: int, n_prompt: int,
                 timings: dict[str, Any]) -> None:
        super().__init__()
        self.req = req
        self.stop = stop
        self.text = text
        self.n_tokens = n_tokens
        self.n_prompt = n_prompt
        self.timings = timings


class GenerationError(Message):
    """The running request failed (`req` None: an error not tied to a request)."""

    def __init__(self, req: int | None, code: str, msg: str) -> None:
        super().__init__()
        self.req = req
        self.code = code
        self.msg = msg
