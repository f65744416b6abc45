"""Throughput: a tokens/s sparkline and the totals beside it."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.reactive import reactive
from textual.widgets import Label, Sparkline

from dair.tui import fmt


class Throughput(Vertical):
    tok_s: reactive[float] = reactive(0.0)
    tokens: reactive[int] = reactive(0)
    bytes_per_token: reactive[float | None] = reactive(None)
    sessions: reactive[int] = reactive(0)
    hops: reactive[int] = reactive(0)

    def compose(self) -> ComposeResult:
        yield Label("", id="tp-label")
        yield Sparkline([0.0], summary_function=max, id="tp-spark")
        yield Label("", id="tp-totals")

    def show(self, history: list[float], tok_s: float, tokens: int, bytes_per_token: float | None,
             sessions: int, hops: int = 0) -> None:
        self.query_one(Sparkline).data = history or [0.0]
        self.tok_s, self.tokens, self.bytes_per_token, self.sessions = tok_s, tokens, bytes_per_token, sessions
        self.hops = hops

    def on_mount(self) -> None:
        self._refresh_labels()

    def watch_tok_s(self) -> None:
        self._refresh_labels()

    def watch_tokens(self) -> None:
        self._refresh_labels()

    def watch_bytes_per_token(self) -> None:
        self._refresh_labels()

    def watch_hops(self) -> None:
        self._refresh_labels()

    def watch_sessions(self) -> None:
        self._refresh_labels()

    def _refresh_labels(self) -> None:
        if not self.is_mounted:
            return
        self.query_one("#tp-label", Label).update(f"{self.tok_s:5.1f} tok/s now · {self.sessions} session{'' if self.sessions == 1 else 's'}")
        bpt = "-" if self.bytes_per_token is None else fmt.human_bytes(self.bytes_per_token)
        hops = f" ({self.hops} hops)" if self.hops else ""
        self.query_one("#tp-totals", Label).update(f"{self.tokens} tokens · {bpt}/token on wire{hops}")
