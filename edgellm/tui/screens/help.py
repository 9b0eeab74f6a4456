"""The keys of the screen you are on, every one of them (the footer shows only the common ones)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Label


def screen_keys(screen: Screen) -> list[tuple[str, str, str]]:
    """(key as shown, what it does, the action) for each of a screen's bindings with a description,
    its own and the app's, in the order they are declared."""
    seen, keys = set(), []
    for node in (screen, screen.app):
        for binding in node.BINDINGS:
            binding = binding if isinstance(binding, Binding) else Binding(*binding)
            action = binding.action.removeprefix("app.")
            if not binding.description or action in seen:
                continue
            seen.add(action)
            shown = screen.app.get_key_display(binding)
            keys.append((shown, binding.description, action))
    return keys


class HelpScreen(ModalScreen[None]):
    """? or F1: the keys of the screen below. Esc, ? or q closes."""

    BINDINGS = [("escape", "dismiss", "Close"), ("question_mark", "dismiss", "Close"), ("q", "dismiss", "Close")]

    def __init__(self, under: Screen) -> None:
        super().__init__()
        self.under = under

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(f"Keys · {self.under.__class__.__name__.removesuffix('Screen').lower()}", id="question")
            yield DataTable(id="keys", cursor_type="none", show_header=False)
            yield Label("Ctrl+P: every command by name · Esc closes")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("key", "what")
        for key, what, _ in screen_keys(self.under):
            table.add_row(key, what)

    def action_dismiss(self) -> None:
        self.dismiss(None)
