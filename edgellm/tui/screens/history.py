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
        for cid, model, created, first, count in Conversations(self.app.settings.home / "conversations.db").recent():
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(created))
            table.add_row(when, model, str(count), first.replace("\n", " ")[:60], key=f"{cid}:{model}")
        table.focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        from edgellm.tui.screens.chat import ChatScreen

        cid, model = str(event.row_key.value).split(":", 1)
        if not self.app.store.exists(model):
            self.app.notify(f"{model} is no longer in the store", severity="error")
            return
        self.app.push_screen(ChatScreen(model, int(cid)))
