"""Saved conversations, newest first; Enter reopens one with its model."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from edgellm.tui.conversations import Conversations


class HistoryScreen(Screen):
    BINDINGS = [("escape", "app.pop_screen", "Library")]

    def compose(self) -> ComposeResult:
        yield Static("edgellm · conversations", id="title")
        yield DataTable(id="conversations", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("WHEN", "MODEL", "MESSAGES", "FIRST QUESTION")
        self.refresh_list()
        table.focus()

    def refresh_list(self) -> None:
        """The saved conversations as they are now (a chat reopened from here may have grown one),
        the cursor kept on the one it was on."""
        table = self.query_one(DataTable)
        current = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value if table.row_count else None
        table.clear()
        for cid, model, created, first, count in Conversations(self.app.settings.home / "conversations.db").recent():
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(created))
            gone = "" if self.app.store.exists(model) else " (deleted)"
            table.add_row(when, model + gone, str(count), first.replace("\n", " ")[:60], key=f"{cid}:{model}")
        if current in table.rows:
            table.move_cursor(row=table.get_row_index(current))

    def on_screen_resume(self) -> None:
        self.refresh_list()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        from edgellm.tui.screens.chat import ChatScreen

        cid, model = str(event.row_key.value).split(":", 1)
        # a conversation whose model was deleted can still be read, not continued
        self.app.push_screen(ChatScreen(model, int(cid), read_only=not self.app.store.exists(model)))
