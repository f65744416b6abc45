"""The conversation: a transcript that streams the answer, and the prompt under it."""
from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.reactive import reactive
from textual.widgets import Input, Static


class ChatMessage(Static):
    """One turn. The model's text is shown literally (markup off): it is data, not markup."""

    text: reactive[str] = reactive("", layout=True)
    note: reactive[str] = reactive("")
    streaming: reactive[bool] = reactive(False)

    def __init__(self, role: str, text: str = "") -> None:
        super().__init__("", markup=False, classes=f"msg {role}")
        self.role = role
        self.set_reactive(ChatMessage.text, text)

    def on_mount(self) -> None:
        self._render_text()

    def watch_text(self) -> None:
        self._render_text()

    def watch_note(self) -> None:
        self._render_text()

    def watch_streaming(self) -> None:
        self._render_text()

    def _render_text(self) -> None:
        who = {"user": ("you", "bold cyan"), "assistant": ("model", "bold green")}.get(
            self.role, (self.role, "bold yellow"))
        t = Text(f"{who[0]}: ", style=who[1]) + Text(self.text)
        if self.streaming:
            t.append("▌", style="blink")
        if self.note:
            t.append(f"\n{self.note}", style="dim italic")
        self.update(t)


class Transcript(VerticalScroll):
    """Scrolls to the newest text unless the user has scrolled up to read."""

    def add(self, role: str, text: str = "") -> ChatMessage:
        msg = ChatMessage(role, text)
        self.mount(msg)
        self.scroll_end(animate=False)
        return msg

    def follow(self) -> None:
        if self.max_scroll_y - self.scroll_y <= 3:
            self.scroll_end(animate=False)

    def reset(self) -> None:
        self.remove_children()

    @property
    def plain(self) -> str:
        """The whole conversation as text (for tests and screen readers)."""
        return "\n".join(f"{m.role}: {m.text}" for m in self.query(ChatMessage))


class ChatPanel(Vertical):
    def compose(self) -> ComposeResult:
        yield Transcript(id="transcript")
        yield Input(placeholder="Ask the model…  (Enter sends · Esc stops · Ctrl+N new chat · F2 settings)",
                    id="prompt")
