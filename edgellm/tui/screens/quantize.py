"""Quantize a library model: each type with its bits per weight, the size it would have, and what
the model's last sweep measured of it; an importance matrix (made from edgellm's calibration
text, once per model) unlocks the IQ types."""

from __future__ import annotations

import threading
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Checkbox, DataTable, Input, Label, ProgressBar

from edgellm.gguf.header import human_bytes
from edgellm.tui.errors import described
from edgellm.tui.messages import Added, JobFailed, JobStep, Sized, SizingDone
from edgellm.tui.progress import StageClock


def quant_rows(sizes: dict[str, int], current: str | None = None, imatrix: bool = False,
               figures: dict[tuple[str, bool], dict[str, Any]] | None = None) -> list[tuple[str, ...]]:
    """(type, bits/weight, size, perplexity, KL, note) for each type that can be made: those that
    need an importance matrix only with one; the size llama.cpp's dry run gave (blank until it
    has); the figures from the model's last sweep with the same use of the imatrix."""
    from edgellm.gguf.quant_types import QUANT_TYPES

    rows = []
    for t in QUANT_TYPES.values():
        if t.needs_imatrix and not imatrix:
            continue
        measured = (figures or {}).get((t.name, imatrix), {})
        ppl, kl = measured.get("perplexity"), measured.get("kl_divergence")
        rows.append((t.name, f"{t.bpw:.2f}", human_bytes(sizes[t.name]) if t.name in sizes else "",
                     f"{ppl:.2f}" if isinstance(ppl, float) else "-", f"{kl:.3f}" if isinstance(kl, float) else "-",
                     t.note + (" (current)" if t.name == current else "")))
    return rows


class QuantizeScreen(ModalScreen[str | None]):
    """Pick a type (Enter); the model is quantized into the store under the name below, by default
    ``<name>-<type>`` (``-imat`` with an importance matrix). Esc cancels."""

    BINDINGS = [("escape", "cancel", "Cancel")]

    def __init__(self, model_name: str) -> None:
        super().__init__()
        self.model_name = model_name
        self.cancel = threading.Event()
        self.busy = False
        self.measured = False  # every type's size is in (or could not be had)
        self.clock = StageClock()
        self._sizing = threading.Lock()  # a dry run and a real quantization never overlap: they share llama.cpp's log

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(f"Quantize {self.model_name} to:", id="question")
            yield Label("", id="requantize")
            yield DataTable(id="types", cursor_type="row")
            yield Checkbox("use an importance matrix (unlocks the IQ types)", id="imatrix", compact=True,
                           tooltip="made once per model from edgellm's calibration text")
            with Horizontal(id="name-row"):
                yield Label("name ")
                yield Input(id="name", compact=True)
            yield ProgressBar(id="progress", show_eta=True)
            yield Label("", id="quant-status")

    def on_mount(self) -> None:
        from edgellm.gguf.header import read_header
        from edgellm.quantize import is_quantized
        from edgellm.workflows import sweep_figures

        self.header = read_header(self.app.store.get(self.model_name).gguf_path)
        self.figures = sweep_figures(self.app.store, self.model_name)
        self.query_one("#question", Label).update(
            f"Quantize {self.model_name} ({self.header.quantization}, {human_bytes(self.header.file_size)}) to:")
        warning = self.query_one("#requantize", Label)
        warning.display = is_quantized(self.header)
        warning.update(f"already quantized ({self.header.quantization}): quantizing again loses more quality; "
                       "start from an F16 or BF16 model")
        table = self.query_one(DataTable)
        self.sizes: dict[str, int] = {}
        for label, key in (("TYPE", "type"), ("BITS/W", "bpw"), ("SIZE", "size"), ("PPL", "ppl"), ("KL", "kl"),
                           ("NOTE", "note")):
            table.add_column(label, key=key)
        self._fill("Q4_K_M")
        self.query_one(ProgressBar).display = False
        table.focus()
        self._measure()

    @work(thread=True, exclusive=True, group="sizes")
    def _measure(self) -> None:
        """Each type's size from llama.cpp's dry run (a few tens of ms each, no weight read)."""
        from edgellm.gguf.quant_types import QUANT_TYPES
        from edgellm.quantize import planned_size

        for qtype in QUANT_TYPES.values():
            with self._sizing:
                if self.busy:
                    return  # a quantization has started: it has the quantizer now
                try:
                    size = planned_size(self.header, qtype)
                except Exception:  # a type this model cannot take: its size stays blank
                    continue
            self.post_message(Sized(qtype.name, size))
        self.post_message(SizingDone())

    def on_sized(self, message: Sized) -> None:
        self.sizes[message.key] = message.size
        table = self.query_one(DataTable)
        if message.key in table.rows:
            table.update_cell(message.key, "size", human_bytes(message.size), update_width=True)

    @property
    def with_imatrix(self) -> bool:
        return self.query_one("#imatrix", Checkbox).value

    def _fill(self, keep: str | None = None) -> None:
        """The table for the imatrix choice, the cursor on ``keep`` where that type is listed."""
        table = self.query_one(DataTable)
        table.clear()
        rows = quant_rows(self.sizes, self.header.quantization, self.with_imatrix, self.figures)
        for row in rows:
            table.add_row(*row, key=row[0])
        names = [row[0] for row in rows]
        table.move_cursor(row=names.index(keep) if keep in names else 0)
        self._name_placeholder()

    def _highlighted(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    def _name_placeholder(self) -> None:
        from edgellm.gguf.quant_types import quant_type
        from edgellm.quantize import quantized_name

        if (type_name := self._highlighted()) is not None:
            self.query_one("#name", Input).placeholder = quantized_name(
                self.model_name, quant_type(type_name), self.with_imatrix)

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        self._fill(self._highlighted())

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._name_placeholder()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if self.busy:
            return
        field = self.query_one("#name", Input)
        name = field.value.strip() or field.placeholder
        if self.app.store.exists(name):
            self.query_one("#quant-status", Label).update(f"{name} is already in the library: type another name")
            field.focus()
            return
        self.busy = True
        self._quantize(str(event.row_key.value), name, self.with_imatrix)

    @work(thread=True, exclusive=True, group="quantize")
    def _quantize(self, type_name: str, name: str, imatrix: bool) -> None:
        from edgellm.gguf.quant_types import quant_type
        from edgellm.quantize import refuse_requantize
        from edgellm.workflows import Job, calibrated_imatrix, quantize_into_store

        job = Job(lambda step: self.post_message(JobStep(step)), self.cancel)
        store = self.app.store
        with self._sizing:  # a dry run in flight finishes first
            pass
        try:
            refuse_requantize(self.header)  # before the calibration, not after it
            matrix = calibrated_imatrix(store, self.model_name, self.header, job) if imatrix else None
            _, entry = quantize_into_store(store, self.model_name, self.header, quant_type(type_name), job,
                                           name=name, imatrix=matrix)
        except Exception as exc:
            self.post_message(JobFailed(exc, "quantize"))
        else:
            self.post_message(Added(entry))

    def on_job_step(self, message: JobStep) -> None:
        step = message.step
        bar = self.query_one(ProgressBar)
        bar.display = True
        bar.update(total=step.total, progress=step.done)
        self.query_one("#quant-status", Label).update(self.clock.describe(step))

    @on(SizingDone)
    def _measured(self) -> None:
        self.measured = True

    @on(JobFailed)
    def _failed(self, message: JobFailed) -> None:
        self.busy = False
        self.app.report(message.error)
        self.query_one("#quant-status", Label).update(described(message.error))

    @on(Added)
    def _added(self, message: Added) -> None:
        self.busy = False
        self.app.notify(f"quantized {message.entry.name}")
        self.dismiss(message.entry.name)

    def action_cancel(self) -> None:
        if self.busy:
            self.cancel.set()
        else:
            self.dismiss(None)

    def on_unmount(self) -> None:
        self.cancel.set()  # quitting mid-quantization removes the temporary file
