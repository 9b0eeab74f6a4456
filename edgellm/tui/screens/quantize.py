"""Quantize a library model: each type with its bits per weight and the size it would have."""

from __future__ import annotations

import threading

from textual import work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label, ProgressBar

from edgellm.gguf.header import human_bytes
from edgellm.tui.messages import Done, JobStep


def quant_rows(n_params: int, current: str | None = None) -> list[tuple[str, str, str, str]]:
    """(type, bits/weight, estimated size, note) for every type that needs no importance matrix."""
    from edgellm.gguf.quant_types import QUANT_TYPES

    return [
        (t.name, f"{t.bpw:.2f}", human_bytes(int(n_params * t.bpw / 8)), t.note + (" (current)" if t.name == current else ""))
        for t in QUANT_TYPES.values() if not t.needs_imatrix
    ]


class QuantizeScreen(ModalScreen[str | None]):
    """Pick a type; the model is quantized into the store as ``<name>-<type>``. Esc cancels."""

    BINDINGS = [("escape", "cancel", "Cancel")]

    def __init__(self, model_name: str) -> None:
        super().__init__()
        self.model_name = model_name
        self.cancel = threading.Event()
        self.busy = False

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(f"Quantize {self.model_name} to:", id="question")
            yield DataTable(id="types", cursor_type="row")
            yield ProgressBar(id="progress", show_eta=True)
            yield Label("", id="quant-status")

    def on_mount(self) -> None:
        from edgellm.gguf.header import read_header

        table = self.query_one(DataTable)
        table.add_columns("TYPE", "BITS/W", "EST. SIZE", "NOTE")
        self.header = read_header(self.app.store.get(self.model_name).gguf_path)
        for row in quant_rows(self.header.parameter_count, self.header.quantization):
            table.add_row(*row, key=row[0])
        table.move_cursor(row=list(table.rows).index("Q4_K_M") if "Q4_K_M" in table.rows else 0)
        self.query_one(ProgressBar).display = False
        table.focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if not self.busy:
            self._quantize(str(event.row_key.value))

    @work(thread=True, exclusive=True, group="quantize")
    def _quantize(self, type_name: str) -> None:
        from edgellm.gguf.quant_types import quant_type
        from edgellm.workflows import Job, quantize_into_store

        self.busy = True
        job = Job(lambda step: self.post_message(JobStep(step)), self.cancel)
        try:
            _, entry = quantize_into_store(self.app.store, self.model_name, self.header, quant_type(type_name), job)
        except Exception as exc:
            self.post_message(Done("quantize", error=exc))
        else:
            self.post_message(Done("quantize", entry))

    def on_job_step(self, message: JobStep) -> None:
        bar = self.query_one(ProgressBar)
        bar.display = True
        bar.update(total=message.step.total, progress=message.step.done)

    def on_done(self, message: Done) -> None:
        self.busy = False
        if message.error is not None:
            self.app.report(message.error)
            self.query_one("#quant-status", Label).update(str(message.error))
        else:
            self.app.notify(f"quantized {message.result.name}")
            self.dismiss(message.result.name)

    def action_cancel(self) -> None:
        if self.busy:
            self.cancel.set()
        else:
            self.dismiss(None)

    def on_unmount(self) -> None:
        self.cancel.set()  # quitting mid-quantization removes the temporary file
