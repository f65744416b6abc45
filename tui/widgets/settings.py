"""Sampling settings (temperature, top-p, max tokens) and the modal that edits them."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label


def _sampling() -> Any:
    from dair.config import SamplingConfig, section

    return section(SamplingConfig)


@dataclass(frozen=True)
class Settings:
    """What the form edits; unset fields take config.toml's [sampling]."""

    temperature: float = field(default_factory=lambda: _sampling().temperature)
    top_p: float = field(default_factory=lambda: _sampling().top_p)
    max_tokens: int = field(default_factory=lambda: _sampling().max_tokens)
    # The rest of config.toml's [sampling] rides along unchanged.
    extra: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_config(cls) -> Settings:
        s = _sampling()
        extra = (("min_p", s.min_p), ("repeat_last_n", s.repeat_last_n), ("repeat_penalty", s.repeat_penalty),
                 ("top_k", s.top_k))
        return cls(s.temperature, s.top_p, s.max_tokens, extra)

    def params(self) -> dict[str, Any]:
        """The `params` map of a `generate` (engine's SamplingParams names)."""
        return {**dict(self.extra), "temperature": self.temperature, "top_p": self.top_p}

    def describe(self) -> str:
        return f"temp {self.temperature:g} · top-p {self.top_p:g} · max {self.max_tokens} tokens"


def parse_settings(base: Settings, temperature: str, top_p: str, max_tokens: str) -> Settings:
    """Settings from the form's text; ValueError names the field that is wrong."""
    try:
        t = float(temperature)
    except ValueError:
        raise ValueError("temperature must be a number") from None
    if not 0.0 <= t <= 5.0:
        raise ValueError("temperature must be between 0 (greedy) and 5")
    try:
        p = float(top_p)
    except ValueError:
        raise ValueError("top-p must be a number") from None
    if not 0.0 < p <= 1.0:
        raise ValueError("top-p must be in (0, 1]")
    try:
        m = int(max_tokens)
    except ValueError:
        raise ValueError("max tokens must be a whole number") from None
    if not 1 <= m <= 1_000_000:
        raise ValueError("max tokens must be at least 1")
    return replace(base, temperature=t, top_p=p, max_tokens=m)


class SettingsScreen(ModalScreen[Settings | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, current: Settings) -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="settings"):
            yield Label("Sampling settings", id="settings-title")
            with Grid(id="settings-grid"):
                yield Label("Temperature (0 = greedy)")
                yield Input(str(self.current.temperature), id="temperature", type="number")
                yield Label("Top-p")
                yield Input(str(self.current.top_p), id="top_p", type="number")
                yield Label("Max tokens")
                yield Input(str(self.current.max_tokens), id="max_tokens", type="integer")
            yield Label("", id="settings-error")
            with Horizontal(id="settings-buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#temperature", Input).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.action_cancel()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_save()

    def action_save(self) -> None:
        try:
            new = parse_settings(self.current, self.query_one("#temperature", Input).value,
                                 self.query_one("#top_p", Input).value,
                                 self.query_one("#max_tokens", Input).value)
        except ValueError as e:
            self.query_one("#settings-error", Label).update(str(e))
            return
        self.dismiss(new)

    def action_cancel(self) -> None:
        self.dismiss(None)
