"""Widgets of the app's own."""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea


class PromptArea(TextArea):
    """The chat's message box: Enter sends; Ctrl+J (or Shift+Enter or Alt+Enter, where the
    terminal tells them from Enter) starts a new line; pasted text keeps its lines. It grows with
    its text up to a few lines, then scrolls."""

    BINDINGS = [Binding("ctrl+j,shift+enter,alt+enter", "newline", "New line", show=False)]

    @dataclass
    class Submitted(Message):
        prompt: PromptArea
        value: str

    def __init__(self, placeholder: str = "", id: str | None = None, disabled: bool = False) -> None:
        super().__init__(id=id, disabled=disabled, placeholder=placeholder, soft_wrap=True, tab_behavior="focus")

    @property
    def value(self) -> str:
        """The message as typed (an Input's name for it, which the screens use)."""
        return self.text

    @value.setter
    def value(self, text: str) -> None:
        self.load_text(text)
        self.move_cursor(self.document.end)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        await super()._on_key(event)

    def action_newline(self) -> None:
        self.replace("\n", *self.selection)
