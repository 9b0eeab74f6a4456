"""Get a model: a Hub repo (its GGUF files, or its safetensors converted), a local checkpoint
folder (converted, optionally with a LoRA adapter merged), or a local .gguf file."""

from __future__ import annotations

import math
import threading
from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, ProgressBar, Static

from edgellm.errors import Cancelled
from edgellm.models.header import human_bytes

#: what a checkpoint may be converted to here: as converted (f16/bf16), or quantized after
CONVERT_TARGETS = ("AS IS", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")


class GetModelScreen(Screen):
    BINDINGS = [("escape", "cancel", "Cancel / back")]

    def __init__(self) -> None:
        super().__init__()
        self.repo: str | None = None
        self.listing = None  # the Hub listing of a repo being converted
        self.folder: Path | None = None  # a local checkpoint being converted
        self.busy = False
        self.cancel = threading.Event()

    def compose(self) -> ComposeResult:
        yield Static("edgellm · get a model", id="title")
        yield Input(placeholder="Hub repo id (owner/name), a checkpoint folder or a .gguf file, then Enter", id="source")
        yield Input(placeholder="optional: a LoRA adapter to merge (folder or Hub repo), for conversions", id="lora")
        yield DataTable(id="files", cursor_type="row")
        yield ProgressBar(id="progress", show_eta=True)
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns("QUANT", "SIZE", "DETAIL")
        self.query_one("#progress", ProgressBar).display = False
        self.query_one("#source", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        source = self.query_one("#source", Input).value.strip()
        if not source or self.busy:
            return
        path = Path(source).expanduser()
        if path.is_dir():
            self._inspect_folder(path)
        elif path.exists() or source.lower().endswith(".gguf"):
            self.app.import_file(source, lambda entry: self._status(f"imported {entry.name}"))
        else:
            self._list(source)

    def _status(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    @work(thread=True, exclusive=True, group="get")
    def _inspect_folder(self, path: Path) -> None:
        from edgellm.convert.archs import architecture_for
        from edgellm.convert.checkpoint import Checkpoint

        try:
            with Checkpoint.open(path) as ckpt:
                architecture_for(ckpt.config)
                n_params = sum(math.prod(ref.shape) for ref in ckpt.tensors.values())
        except Exception as exc:
            self.app.call_from_thread(self.app.report, exc)
            return
        self.app.call_from_thread(self._show_conversion, None, None, path, n_params)

    @work(thread=True, exclusive=True, group="get")
    def _list(self, ref: str) -> None:
        from edgellm.models.hub import list_repo, parse_ref

        try:
            repo, _ = parse_ref(ref)
            listing = list_repo(repo, None, self.app.store)
        except Exception as exc:
            self.app.call_from_thread(self.app.report, exc)
            return
        if listing.is_checkpoint:
            weights = sum(f.size for f in listing.checkpoint if f.name.endswith(".safetensors"))
            self.app.call_from_thread(self._show_conversion, repo, listing, None, weights // 2)
        else:
            self.app.call_from_thread(self._show, repo, listing.gguf, list(listing.refused))

    def _show(self, repo: str, choices: dict, refused: list[str]) -> None:
        self.repo, self.listing, self.folder = repo, None, None
        table = self.query_one(DataTable)
        table.clear()
        for quant, choice in sorted(choices.items()):
            table.add_row(quant, human_bytes(choice.size), f"{len(choice.files)} file(s)", key=quant)
        note = f" ({len(refused)} unsafe file names ignored)" if refused else ""
        self._status(f"{repo}: {len(choices)} GGUF quantizations{note}; pick one and press Enter" if choices
                     else f"{repo} has no GGUF files{note}")
        table.focus()

    def _show_conversion(self, repo: str | None, listing, folder: Path | None, n_params: int) -> None:
        """A checkpoint to convert: each target with its bits per weight and estimated size."""
        from edgellm.quantize import QUANT_TYPES

        self.repo, self.listing, self.folder = repo, listing, folder
        table = self.query_one(DataTable)
        table.clear()
        for target in CONVERT_TARGETS:
            bpw = 16.0 if target == "AS IS" else QUANT_TYPES[target].bpw
            detail = "f16/bf16, as converted" if target == "AS IS" else f"{bpw:.2f} bits/weight"
            table.add_row(target, "~" + human_bytes(int(n_params * bpw / 8)), detail, key=target)
        what = repo or str(folder)
        self._status(f"{what}: a safetensors checkpoint (~{n_params / 1e6:.0f}M parameters); pick what to convert it "
                     "to and press Enter")
        table.move_cursor(row=CONVERT_TARGETS.index("Q4_K_M"))
        table.focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if self.busy:
            return
        choice = str(event.row_key.value)
        if self.listing is not None or self.folder is not None:
            self._convert(None if choice == "AS IS" else choice, self.query_one("#lora", Input).value.strip())
        elif self.repo:
            self._pull(f"{self.repo}:{choice}")

    def _begin(self) -> ProgressBar:
        self.busy = True
        self.cancel.clear()
        bar = self.query_one("#progress", ProgressBar)
        self.app.call_from_thread(setattr, bar, "display", True)
        return bar

    def _progress(self, bar: ProgressBar, what: str):
        def update(done: int, total: int) -> None:
            if self.cancel.is_set():
                raise Cancelled(f"{what} cancelled; nothing was added to the store")
            self.app.call_from_thread(bar.update, total=total or None, progress=done)

        return update

    def _finish(self, entry=None, exc: BaseException | None = None, what: str = "") -> None:
        self.busy = False
        if exc is not None:
            self.app.report(exc)
            self._status(f"{what}: {exc}")
        else:
            bar = self.query_one("#progress", ProgressBar)
            bar.update(total=bar.total or 1, progress=bar.total or 1)  # done, even if no byte was reported
            self._status(f"added {entry.name}")
            self.app.notify(f"added {entry.name}")

    @work(thread=True, exclusive=True, group="get")
    def _pull(self, ref: str) -> None:
        from edgellm.models.hub import pull

        bar = self._begin()
        try:
            entry = pull(ref, self.app.store, progress=self._progress(bar, "download"))
        except Exception as exc:
            self.app.call_from_thread(self._finish, None, exc, ref)
        else:
            self.app.call_from_thread(self._finish, entry)

    @work(thread=True, exclusive=True, group="get")
    def _convert(self, quant: str | None, lora: str) -> None:
        from edgellm.convert.core import convert_to_store
        from edgellm.models.hub import list_repo, parse_ref, pull_checkpoint

        bar = self._begin()
        keep = self.app.settings.checkpoints_dir
        try:
            folder = self.folder
            if folder is None:
                self.app.call_from_thread(self._status, f"downloading {self.repo}…")
                folder = pull_checkpoint(self.repo, self.listing, self.app.store, keep, self._progress(bar, "download"))
            adapters = []
            if lora:
                if Path(lora).expanduser().is_dir():
                    adapters.append(Path(lora).expanduser())
                else:
                    adapter_repo, _ = parse_ref(lora)
                    self.app.call_from_thread(self._status, f"downloading {adapter_repo}…")
                    adapters.append(pull_checkpoint(adapter_repo, list_repo(adapter_repo, None, self.app.store),
                                                    self.app.store, keep, self._progress(bar, "download")))
            self.app.call_from_thread(self._status, f"converting{' and quantizing to ' + quant if quant else ''}…")
            convert_progress = self._progress(bar, "conversion")
            _, entry = convert_to_store(
                self.app.store, folder, quant=quant, lora=adapters, source_repo=self.repo, cancel=self.cancel,
                progress=lambda i, n, done, total, name: convert_progress(done, total),
            )
        except Exception as exc:
            self.app.call_from_thread(self._finish, None, exc, "conversion")
        else:
            self.app.call_from_thread(self._finish, entry)

    def action_cancel(self) -> None:
        if self.busy:
            self.cancel.set()
        else:
            self.app.pop_screen()

    def on_unmount(self) -> None:
        """Quitting mid-work stops it between tensors, so its temporary files are removed."""
        self.cancel.set()

