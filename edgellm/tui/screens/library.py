"""The library: the store's models, whether each fits this machine, and what to do with them."""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from edgellm.errors import ConfigError
from edgellm.gguf.header import format_params, human_bytes
from edgellm.tui.messages import Imported, ImportFailed, Judged


class LibraryScreen(Screen):
    #: the footer shows the keys that fit 80 columns; ? (or F1) and Ctrl+P show them all
    BINDINGS = [
        Binding("enter", "chat", "Chat"),
        Binding("s", "settings", "Settings"),
        Binding("k", "quantize", "Quantize"),
        Binding("g", "get_model", "Get a model"),
        Binding("d", "delete", "Delete"),
        Binding("h", "history", "Conversations", show=False),
        Binding("f", "finetune", "Fine-tune", show=False),
        Binding("i", "import_model", "Import a .gguf", show=False),
        Binding("r", "refresh", "Refresh", show=False),
        Binding("question_mark,f1", "app.help", "Help", key_display="?"),
        Binding("q", "app.quit", "Quit"),
    ]

    def compose(self) -> ComposeResult:
        yield Static("edgellm · library", id="title")
        yield DataTable(id="models", cursor_type="row", zebra_stripes=True)
        yield Static("", id="details")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        # FITS second: on a narrow terminal the verdict stays in view, the architecture scrolls off
        for label, key in (("NAME", "name"), ("FITS", "fits"), ("QUANT", "quant"), ("SIZE", "size"),
                           ("PARAMS", "params"), ("ARCH", "arch"), ("CTX", "ctx")):
            table.add_column(label, key=key)
        if not self.app.store.list():  # a first start: offer the bundled model, as `edgellm chat` does
            from edgellm.models.bundled import ensure_bundled

            try:
                ensure_bundled(self.app.store)
            except Exception as exc:
                self.app.report(exc)
        self.action_refresh()

    def action_refresh(self) -> None:
        """List the store again, the cursor staying on the model it was on (a refresh after a dialog
        must never move it: the next key may be a delete), or, when that model is gone, on the row
        that took its place (never back at the top, where a second delete would take another)."""
        table = self.query_one(DataTable)
        current, row = self.selected(), table.cursor_row
        table.clear()
        for entry in self.app.store.list():
            m = entry.manifest  # the folder names the model; the rest is the manifest's (untrusted) data
            table.add_row(entry.name, "…", Text(m.quantization), human_bytes(m.size), format_params(m.parameters),
                          Text(m.architecture), str(m.context_length or "-"), key=entry.name)
        if current in table.rows:
            table.move_cursor(row=table.get_row_index(current))
        elif table.row_count:
            table.move_cursor(row=min(row, table.row_count - 1))
        self._fill_fits()

    @work(thread=True, exclusive=True, group="fits")
    def _fill_fits(self) -> None:
        """The planner's verdict per model at the current settings (off the UI thread: it probes)."""
        from edgellm.gguf.header import read_header
        from edgellm.plan.fit import fit_load
        from edgellm.presets import load_presets

        try:
            presets = load_presets(self.app.settings.home)  # once, for every model
        except ConfigError:
            presets = None  # a broken presets file: no verdicts (opening a chat says why)
        for entry in self.app.store.list():
            verdict = "?"
            if presets is not None:
                try:  # at the model's preset, if it has one
                    verdict = fit_load(read_header(entry.gguf_path), self.app.hardware,
                                       self.app.settings_for(entry.name, presets).load).verdict()
                except Exception:
                    pass  # a file the planner cannot read: no verdict, and the library goes on
            self.post_message(Judged({entry.name: verdict}))

    @on(Imported)
    @on(ImportFailed)
    def _imported(self) -> None:
        self.action_refresh()  # the app says how it went

    @on(Judged)
    def _judged(self, message: Judged) -> None:
        table = self.query_one(DataTable)
        for name, verdict in message.verdicts.items():
            if name in table.rows:
                table.update_cell(name, "fits", verdict, update_width=True)

    def selected(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        name = event.row_key.value if event.row_key else None
        details = self.query_one("#details", Static)
        if not name:
            details.update("")
            return
        try:
            from edgellm.gguf.header import read_header

            info = read_header(self.app.store.get(name).gguf_path).summary()
            details.update(Text(
                f"{info['name'] or name} · {info['layers']} layers · {info['heads']} heads / {info['kv_heads']} KV heads · "
                f"embedding {info['embedding_length']} · vocab {info['vocab_size']} · "
                f"template: {'yes' if info['chat_template'] else 'fallback'}"
            ))
        except Exception as exc:
            details.update(Text(f"cannot read {name}: {exc}"))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_chat()

    def action_chat(self) -> None:
        name = self.selected()
        if name:
            from edgellm.tui.screens.chat import ChatScreen

            self.app.push_screen(ChatScreen(name))

    def action_settings(self) -> None:
        name = self.selected()
        if name:
            from edgellm.tui.screens.settings import SettingsScreen

            self.app.push_screen(SettingsScreen(name))

    def action_quantize(self) -> None:
        name = self.selected()
        if name:
            from edgellm.tui.screens.quantize import QuantizeScreen

            self.app.push_screen(QuantizeScreen(name), lambda _made: self.action_refresh())

    def action_finetune(self) -> None:
        from edgellm.tui.screens.finetune import FinetuneScreen

        self.app.push_screen(FinetuneScreen(), lambda _done: self.action_refresh())

    def action_history(self) -> None:
        from edgellm.tui.screens.history import HistoryScreen

        self.app.push_screen(HistoryScreen())

    def action_delete(self) -> None:
        name = self.selected()
        if not name:
            return
        from edgellm.tui.screens.dialogs import ConfirmScreen

        def confirmed(yes: bool | None) -> None:
            if yes:
                from edgellm.workflows import remove_model

                try:
                    _, cached = remove_model(self.app.store, name)
                    self.app.notify(f"removed {name}" + (" and its copy in the Hugging Face cache" if cached else ""))
                except Exception as exc:
                    self.app.report(exc)
                self.action_refresh()

        self.app.push_screen(ConfirmScreen(f"Delete {name} from the store? (y: yes, n or Enter: no)"), confirmed)

    def action_get_model(self) -> None:
        from edgellm.tui.screens.get_model import GetModelScreen

        self.app.push_screen(GetModelScreen())

    def on_screen_resume(self) -> None:
        self.action_refresh()  # back from another screen: the store may have changed

    def action_import_model(self) -> None:
        from edgellm.tui.screens.dialogs import AskScreen

        def chosen(path: str | None) -> None:
            if path:
                self.app.import_file(path, self)

        self.app.push_screen(AskScreen("Path to a .gguf file to add to the store:", "~/Downloads/model.gguf"), chosen)
