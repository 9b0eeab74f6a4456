"""Get a model: a Hub repo's GGUF files with their quant and size, or a local .gguf file."""

from __future__ import annotations

from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, ProgressBar, Static

from edgellm.errors import EdgeLLMError
from edgellm.models.header import human_bytes


class Cancelled(EdgeLLMError):
    pass


class GetModelScreen(Screen):
    BINDINGS = [("escape", "cancel", "Cancel / back")]

    def __init__(self) -> None:
        super().__init__()
        self.repo: str | None = None
        self.busy = False
        self.cancelled = False

    def compose(self) -> ComposeResult:
        yield Static("edgellm · get a model", id="title")
        yield Input(placeholder="Hub repo id (owner/name) or a local .gguf path, then Enter", id="source")
        yield DataTable(id="files", cursor_type="row")
        yield ProgressBar(id="progress", show_eta=True)
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns("QUANT", "SIZE", "FILES")
        self.query_one("#progress", ProgressBar).display = False

    def on_input_submitted(self, event: Input.Submitted) -> None:
        source = event.value.strip()
        if not source or self.busy:
            return
        if Path(source).expanduser().exists() or source.lower().endswith(".gguf"):
            self.app.import_file(source, lambda entry: self._status(f"imported {entry.name}"))
        else:
            self._list(source)

    def _status(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    @work(thread=True, exclusive=True, group="get")
    def _list(self, ref: str) -> None:
        from edgellm.models.hub import list_repo, parse_ref

        try:
            repo, _ = parse_ref(ref)
            listing = list_repo(repo, None, self.app.store)
            choices, refused = listing.gguf, list(listing.refused)
        except Exception as exc:
            self.app.call_from_thread(self.app.report, exc)
            return
        self.app.call_from_thread(self._show, repo, choices, refused)

    def _show(self, repo: str, choices: dict, refused: list[str]) -> None:
        self.repo = repo
        table = self.query_one(DataTable)
        table.clear()
        for quant, choice in sorted(choices.items()):
            table.add_row(quant, human_bytes(choice.size), str(len(choice.files)), key=quant)
        note = f" ({len(refused)} unsafe file names ignored)" if refused else ""
        self._status(f"{repo}: {len(choices)} GGUF quantizations{note}; pick one and press Enter" if choices
                     else f"{repo} has no GGUF files{note}")
        table.focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if self.repo and not self.busy:
            self._pull(f"{self.repo}:{event.row_key.value}")

    @work(thread=True, exclusive=True, group="get")
    def _pull(self, ref: str) -> None:
        from edgellm.models.hub import pull

        self.busy, self.cancelled = True, False
        bar = self.query_one("#progress", ProgressBar)
        self.app.call_from_thread(setattr, bar, "display", True)

        def progress(done: int, total: int) -> None:
            if self.cancelled:
                raise Cancelled("download cancelled; pulling again resumes it")
            self.app.call_from_thread(bar.update, total=total, progress=done)

        try:
            entry = pull(ref, self.app.store, progress=progress)
        except Exception as exc:
            self.app.call_from_thread(self.app.report, exc)
            self.app.call_from_thread(self._status, f"{ref}: {exc}")
        else:
            self.app.call_from_thread(self._status, f"pulled {entry.name}")
            self.app.call_from_thread(self.app.notify, f"pulled {entry.name}")
        finally:
            self.busy = False

    def action_cancel(self) -> None:
        if self.busy:
            self.cancelled = True
        else:
            self.app.pop_screen()
