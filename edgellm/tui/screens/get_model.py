"""Get a model: Hub repos found by a search, a Hub repo (its GGUF files, each with whether it fits
this machine, or its safetensors converted), a local checkpoint folder (converted, optionally with
a LoRA adapter merged), or a local .gguf file."""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, ProgressBar, Static

from edgellm.gguf.header import human_bytes
from edgellm.tui.messages import (
    Added,
    BrowseFailed,
    Imported,
    Inspected,
    JobFailed,
    JobStep,
    Judged,
    Listed,
    Planned,
    Searched,
)
from edgellm.tui.progress import StageClock
from edgellm.workflows import Job

#: what a checkpoint may be converted to here: as converted (f16/bf16), or quantized after
CONVERT_TARGETS = ("AS IS", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
#: the table's columns: Hub search hits, or a repo's (or a checkpoint's) quantizations
SEARCH_COLUMNS = ("REPO", "DOWNLOADS", "LIKES")
QUANT_COLUMNS = ("QUANT", "SIZE", "FITS", "DETAIL")


class GetModelScreen(Screen):
    BINDINGS = [("escape", "cancel", "Cancel / back")]

    def __init__(self) -> None:
        super().__init__()
        self.repo: str | None = None
        self.searched = False  # the table holds search hits (Enter lists a repo), not files
        self.listing = None  # the Hub listing of a repo being converted
        self.checkpoint: tuple[dict, dict] | None = None  # its config and tensor shapes, read with the listing
        self.folder: Path | None = None  # a local checkpoint being converted
        self.busy = False
        self.queue: deque[tuple[str, Callable[[], None]]] = deque()  # picked while busy: (what, start it)
        self.cancel = threading.Event()
        self.clock = StageClock()  # download, convert, quantize: each labelled, with its own amount and speed

    def compose(self) -> ComposeResult:
        yield Static("edgellm · get a model", id="title")
        yield Input(placeholder="search the Hub (e.g. qwen3), a repo id (owner/name), a checkpoint folder or a "
                                ".gguf file, then Enter", id="source")
        yield Input(placeholder="optional: a LoRA adapter to merge (folder or Hub repo), for conversions", id="lora")
        yield DataTable(id="files", cursor_type="row")
        yield ProgressBar(id="progress", show_eta=True)
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self._table(QUANT_COLUMNS)
        self.query_one("#progress", ProgressBar).display = False
        self.query_one("#source", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        source = self.query_one("#source", Input).value.strip()
        if not source:  # browsing goes on while a download or a conversion runs
            return
        path = Path(source).expanduser()
        if path.is_dir():
            self._inspect_folder(path)
        elif path.exists() or source.lower().endswith(".gguf"):
            self.app.import_file(source, self)
        elif "/" in source:
            self._list(source)
        else:
            self._status(f"searching the Hub for {source}…")
            self._search(source)

    def _status(self, text: str) -> None:
        self.query_one("#status", Static).update(Text(text))  # quotes Hub names and paths: text, never markup

    def _table(self, columns: tuple[str, ...]) -> DataTable:
        """The table, emptied, with these columns (search hits and quantizations differ)."""
        table = self.query_one(DataTable)
        table.clear(columns=True)
        for label in columns:
            table.add_column(label, key=label.lower())
        return table

    @work(thread=True, exclusive=True, group="browse")
    def _search(self, text: str) -> None:
        from edgellm.models.hub import search

        try:
            hits = search(text, self.app.store, limit=30)
        except Exception as exc:
            self.post_message(BrowseFailed(exc))
        else:
            self.post_message(Searched(text, hits))

    @on(Searched)
    def _show_hits(self, message: Searched) -> None:
        text, hits = message.text, message.hits
        self.repo, self.listing, self.folder, self.searched = None, None, None, True
        table = self._table(SEARCH_COLUMNS)
        for hit in hits:
            table.add_row(Text(hit.repo), f"{hit.downloads:,}", f"{hit.likes:,}", key=hit.repo)  # the Hub's: text
        self._status(f"{len(hits)} GGUF repos on the Hub match {text!r}, most downloaded first; pick one and press "
                     "Enter" if hits else f"no GGUF repo on the Hub matches {text!r}")
        if hits:
            table.focus()

    @work(thread=True, exclusive=True, group="fits")
    def _fill_fits(self, repo: str, listing) -> None:
        """Each quantization's verdict at the app's settings, from one remote header (plan_quants)."""
        from edgellm.workflows import plan_quants

        try:
            plans = plan_quants(repo, listing, self.app.store, self.app.hardware, self.app.settings.load)
            verdicts = {quant: plan.verdict() for quant, plan in plans.items()}
        except Exception:
            verdicts = dict.fromkeys(listing.gguf, "?")  # the listing stands; only the verdicts are unknown
        self.post_message(Judged(verdicts, scope=repo))

    @work(thread=True, exclusive=True, group="browse")
    def _inspect_folder(self, path: Path) -> None:
        from edgellm.convert.archs import architecture_for
        from edgellm.convert.checkpoint import Checkpoint

        try:
            with Checkpoint.open(path) as ckpt:
                architecture_for(ckpt.config)
                config, shapes = ckpt.config, {name: ref.shape for name, ref in ckpt.tensors.items()}
            found = self._sized(config, shapes)
        except Exception as exc:
            self.post_message(BrowseFailed(exc))
        else:
            self.post_message(Inspected(path, *found))

    def _sized(self, config: dict, shapes: dict) -> tuple[int, dict[str, tuple[int, str]]]:
        """(parameters, (size, fit verdict) per target) of a checkpoint's conversions."""
        from edgellm.workflows import plan_conversions

        targets = {t: "F16" if t == "AS IS" else t for t in CONVERT_TARGETS}
        planned = plan_conversions(config, shapes, sorted(set(targets.values())), self.app.hardware,
                                   self.app.settings.load)
        return sum(math.prod(shape) for shape in shapes.values()), {
            t: (planned[q][0], planned[q][1].verdict()) for t, q in targets.items()}

    @work(thread=True, exclusive=True, group="browse")
    def _list(self, ref: str) -> None:
        from edgellm.models.hub import list_repo, parse_ref, remote_checkpoint

        try:
            repo, _ = parse_ref(ref)
            listing = list_repo(repo, None, self.app.store)
            checkpoint = remote_checkpoint(repo, listing, self.app.store) if listing.is_checkpoint else None
            found = self._sized(*checkpoint) if checkpoint else None
        except Exception as exc:
            self.post_message(BrowseFailed(exc))
        else:
            self.post_message(Listed(repo, listing, checkpoint, found))

    # each worker's end, on the app's thread
    @on(Imported)
    def _imported(self, message: Imported) -> None:
        self._status(f"imported {message.entry.name}")  # the app notifies

    @on(Planned)
    def _planned(self, message: Planned) -> None:
        """Before a download: whether it will fit this machine."""
        plan = message.plan
        if not plan.fits:
            self.app.notify(f"this will not fit this machine: {plan.reason}; downloading anyway (Esc stops)",
                            severity="warning", timeout=10)

    @on(Judged)
    def _judged(self, message: Judged) -> None:
        table = self.query_one(DataTable)
        if message.scope == self.repo and self.listing is None and "fits" in table.columns:
            for quant, verdict in message.verdicts.items():
                if quant in table.rows:
                    table.update_cell(quant, "fits", verdict, update_width=True)

    @on(BrowseFailed)
    def _browse_failed(self, message: BrowseFailed) -> None:
        self.app.report(message.error)
        self._status(str(message.error))

    @on(Inspected)
    def _inspected(self, message: Inspected) -> None:
        self._show_conversion(None, None, message.folder, message.parameters, message.sized)

    @on(Listed)
    def _listed(self, message: Listed) -> None:
        repo, listing, checkpoint, found = message.repo, message.listing, message.checkpoint, message.found
        self.checkpoint = checkpoint
        if found is not None:
            self._show_conversion(repo, listing, None, *found)
        else:
            self._show(repo, listing.gguf, list(listing.refused))
            if listing.gguf:
                self._fill_fits(repo, listing)

    def _show(self, repo: str, choices: dict, refused: list[str]) -> None:
        self.repo, self.listing, self.folder, self.searched = repo, None, None, False
        table = self._table(QUANT_COLUMNS)
        for quant, choice in sorted(choices.items()):
            table.add_row(Text(quant), human_bytes(choice.size), "…", f"{len(choice.files)} file(s)", key=quant)
        note = f" ({len(refused)} unsafe file names ignored)" if refused else ""
        self._status(f"{repo}: {len(choices)} GGUF quantizations{note}; FITS at the current settings; pick one and "
                     "press Enter" if choices else f"{repo} has no GGUF files{note}")
        table.focus()

    def _show_conversion(self, repo: str | None, listing, folder: Path | None, n_params: int,
                         sized: dict[str, tuple[int, str]]) -> None:
        """A checkpoint to convert: each target with its bits per weight, the size conversion would
        write and whether that fits (a K-quant's share of fallback tensors is known only once
        converted: ~)."""
        from edgellm.gguf.quant_types import QUANT_TYPES

        self.repo, self.listing, self.folder, self.searched = repo, listing, folder, False
        table = self._table(QUANT_COLUMNS)
        for target in CONVERT_TARGETS:
            bpw = 16.0 if target == "AS IS" else QUANT_TYPES[target].bpw
            detail = "f16/bf16, as converted" if target == "AS IS" else f"{bpw:.2f} bits/weight"
            size, verdict = sized[target]
            table.add_row(target, "~" + human_bytes(size), "~" + verdict, detail, key=target)
        what = repo or str(folder)
        self._status(f"{what}: a safetensors checkpoint (~{n_params / 1e6:.0f}M parameters); pick what to convert it "
                     "to and press Enter")
        table.move_cursor(row=CONVERT_TARGETS.index("Q4_K_M"))
        table.focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        choice = str(event.row_key.value)
        if self.searched:
            self.query_one("#source", Input).value = choice
            self._status(f"listing {choice}…")
            self._list(choice)
            return
        job = self._job_for(choice)
        if job is None:
            return
        if self.busy:  # a download queue: each starts when the one before has finished
            self.queue.append(job)
            self.app.notify(f"queued {job[0]} ({len(self.queue)} waiting)")
        else:
            job[1]()

    def _job_for(self, choice: str) -> tuple[str, Callable[[], None]] | None:
        """What picking this row does, bound to what the table shows now (the queue starts it later)."""
        if self.listing is not None or self.folder is not None:
            quant = None if choice == "AS IS" else choice
            state = (self.repo, self.listing, self.checkpoint, self.folder, quant,
                     self.query_one("#lora", Input).value.strip())
            return f"{self.repo or self.folder} as {choice}", lambda: self._convert(*state)
        if self.repo:
            ref = f"{self.repo}:{choice}"
            return ref, lambda: self._pull(ref)
        return None

    def _begin(self, what: str) -> Job:
        """A job whose steps come back as messages; the bar shows from its first step."""
        self.busy = True
        self.cancel.clear()
        self._status(f"{what}…")
        return Job(lambda step: self.post_message(JobStep(step)), self.cancel)

    def on_job_step(self, message: JobStep) -> None:
        step = message.step
        bar = self.query_one("#progress", ProgressBar)
        bar.display = True
        bar.update(total=step.total or None, progress=step.done)
        waiting = f" · then {', '.join(what for what, _ in self.queue)}" if self.queue else ""
        self._status(self.clock.describe(step) + waiting)

    @on(JobFailed)
    def _job_failed(self, message: JobFailed) -> None:
        self.app.report(message.error)
        self._status(f"{message.what}: {message.error}")
        self._next()

    @on(Added)
    def _added(self, message: Added) -> None:
        bar = self.query_one("#progress", ProgressBar)
        bar.update(total=bar.total or 1, progress=bar.total or 1)  # done, even if no byte was reported
        self._status(f"added {message.entry.name}")
        self.app.notify(f"added {message.entry.name}")
        self._next()

    def _next(self) -> None:
        """A job has ended: the next one queued starts."""
        self.busy = False
        if self.queue:
            self.queue.popleft()[1]()

    def _pull(self, ref: str) -> None:
        from edgellm.workflows import plan_remote_gguf, pull_gguf

        job = self._begin(f"downloading {ref}")
        store, hardware, load = self.app.store, self.app.hardware, self.app.settings.load

        def pull():
            # the verdict first, from the remote header alone, as `edgellm pull` gives it
            self.post_message(Planned(plan_remote_gguf(ref, store, hardware, load=load)[1]))
            return pull_gguf(ref, store, job)

        self._run(ref, pull)

    def _convert(self, repo: str | None, listing, checkpoint: tuple[dict, dict] | None, folder: Path | None,
                 quant: str | None, lora: str) -> None:
        from edgellm.workflows import pull_and_convert

        job = self._begin(f"converting{' and quantizing to ' + quant if quant else ''}")
        store, keep, adapters = self.app.store, self.app.settings.checkpoints_dir, [lora] if lora else []
        if folder is None:
            from edgellm.workflows import plan_conversion

            hardware, load = self.app.hardware, self.app.settings.load

            def pull():  # planned from the config and shapes the listing read: nothing fetched twice
                self.post_message(Planned(plan_conversion(*checkpoint, hardware, quant or "F16", load)))
                return pull_and_convert(repo, listing, store, keep, job, quant=quant, lora=adapters)[1]

            self._run("conversion", pull)
        else:
            self._run("conversion", lambda: _convert_folder(folder, store, keep, job, quant, adapters))

    @work(thread=True, group="job")
    def _run(self, what: str, call) -> None:
        try:
            entry = call()
        except Exception as exc:
            self.post_message(JobFailed(exc, what))
        else:
            self.post_message(Added(entry))

    def action_cancel(self) -> None:
        """Esc stops the work under way and drops what was queued after it; idle, it goes back."""
        if self.busy:
            if self.queue:
                self.app.notify(f"dropped from the queue: {', '.join(what for what, _ in self.queue)}")
                self.queue.clear()
            self.cancel.set()
        else:
            self.app.pop_screen()

    def on_unmount(self) -> None:
        """Quitting mid-work stops it between tensors, so its temporary files are removed."""
        self.cancel.set()


def _convert_folder(folder: Path, store, keep: Path, job, quant: str | None, lora: list[str]):
    """A local checkpoint folder into the store, its adapter (a folder or a Hub repo) merged."""
    from edgellm.workflows import convert_checkpoint, fetch_checkpoint

    adapters = [fetch_checkpoint(ref, store, keep, job) for ref in lora]
    return convert_checkpoint(store, folder, job, quant=quant, lora=adapters)[1]
