"""Saved conversations, newest first: reopen (Enter), search (/), rename, delete, export."""

from __future__ import annotations

import time

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static

from edgellm.tui.conversations import Conversations


class HistoryScreen(Screen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Library"),
        Binding("slash", "search", "Search"),
        Binding("r", "rename", "Rename"),
        Binding("d", "delete", "Delete"),
        Binding("e", "export('md')", "Export Markdown"),
        Binding("j", "export('json')", "Export JSON", show=False),
    ]

    def compose(self) -> ComposeResult:
        yield Static("edgellm · conversations", id="title")
        yield Input(placeholder="search the conversations (/)", id="search")
        yield DataTable(id="conversations", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.conversations: Conversations = self.app.conversations
        table = self.query_one(DataTable)
        table.add_columns("WHEN", "MODEL", "MESSAGES", "TITLE")
        self.refresh_list()
        table.focus()

    def refresh_list(self) -> None:
        """The saved conversations as they are now (a chat reopened from here may have grown one),
        those the search finds, the cursor kept on the one it was on."""
        table = self.query_one(DataTable)
        current = self.selected()
        table.clear()
        found = self.conversations.recent(containing=self.query_one("#search", Input).value.strip())
        for cid, model, created, title, count in found:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(created))
            gone = "" if self.app.store.exists(model) else " (deleted)"
            # the title is the first question, as typed: text, never markup
            table.add_row(when, model + gone, str(count), Text(title.replace("\n", " ")[:60]), key=f"{cid}:{model}")
        if current is not None:
            for key in table.rows:
                if str(key.value).startswith(f"{current}:"):
                    table.move_cursor(row=table.get_row_index(key))

    def selected(self) -> int | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        return int(str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value).split(":", 1)[0])

    def on_screen_resume(self) -> None:
        self.refresh_list()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.refresh_list()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one(DataTable).focus()

    def action_search(self) -> None:
        self.query_one("#search", Input).focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        from edgellm.tui.screens.chat import ChatScreen

        cid, model = str(event.row_key.value).split(":", 1)
        # a conversation whose model was deleted can still be read, not continued
        self.app.push_screen(ChatScreen(model, int(cid), read_only=not self.app.store.exists(model)))

    def action_rename(self) -> None:
        from edgellm.tui.screens.dialogs import AskScreen

        cid = self.selected()
        if cid is None:
            return
        row = self.query_one(DataTable).get_row_at(self.query_one(DataTable).cursor_row)

        def named(title: str | None) -> None:
            if title:
                self.conversations.rename(cid, title)
                self.refresh_list()

        self.app.push_screen(AskScreen("A title for this conversation:", value=str(row[3])), named)

    def action_delete(self) -> None:
        from edgellm.tui.screens.dialogs import ConfirmScreen

        cid = self.selected()
        if cid is None:
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.conversations.delete(cid)
                self.app.notify("conversation deleted")
                self.refresh_list()

        self.app.push_screen(ConfirmScreen("Delete this conversation? (y: yes, n or Enter: no)"), confirmed)

    def action_export(self, fmt: str) -> None:
        """Write the conversation to ``$EDGELLM_HOME/exports/`` (Markdown or JSON) and say where."""
        from edgellm.fsutil import atomic_path

        cid = self.selected()
        if cid is None:
            return
        path = self.app.settings.home / "exports" / f"conversation-{cid}.{fmt}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_text(self.conversations.export(cid, fmt), encoding="utf-8")
        except OSError as exc:
            self.app.notify(f"cannot write {path}: {exc.strerror or exc}", severity="error")
            return
        self.app.notify(f"exported to {path}")
