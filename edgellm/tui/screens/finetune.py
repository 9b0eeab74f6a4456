"""Fine-tune a checkpoint on a data file: the data's format and token counts once it is read, the
memory verdict as each setting changes, the loss curve as the run goes, and the adapter exported
into the library when it is done."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Checkbox, Footer, Input, Label, Static

from edgellm.gguf.header import human_bytes
from edgellm.tui.errors import described
from edgellm.tui.messages import (
    Added,
    FinetunePlanFailed,
    FinetunePlanned,
    JobFailed,
    Trained,
    TrainEvent,
    TrainFailed,
)

#: the numeric settings: (field id, label, default)
NUMBERS = (
    ("rank", "rank", "16"),
    ("max-len", "max-len", "512"),
    ("batch", "batch", "auto"),
    ("epochs", "epochs", "1"),
    ("lr", "lr", "2e-4"),
)


class FinetuneScreen(Screen):
    BINDINGS = [
        Binding("ctrl+t", "start", "Train"),
        Binding("ctrl+l", "export", "Export to library"),
        Binding("escape", "back", "Back / stop"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.cancel = threading.Event()
        self.busy = False
        self.shape: Any = None
        self.plan: Any = None  # the last checked run (data read, memory planned)
        self.losses: list[float] = []
        self.eval_loss: float | None = None
        self.adapter: Path | None = None

    def compose(self) -> ComposeResult:
        yield Static("edgellm · fine-tune", id="title")
        with Vertical(id="ft-form"):
            for key, label, hint in (
                ("base", "base", "checkpoint folder, pulled checkpoint or Hub repo"),
                ("data", "data", "a JSONL file (Enter reads it)"),
            ):
                with Horizontal(classes="field"):
                    yield Label(label, classes="field-label")
                    yield Input(id=f"ft-{key}", placeholder=hint, compact=True)
            yield Label("", id="ft-data-info")
            with Horizontal(id="ft-numbers"):
                for key, label, default in NUMBERS:
                    yield Label(f"{label} ", classes="ft-number-label")
                    yield Input(default, id=f"ft-{key}", compact=True, classes="ft-number")
            with Horizontal(classes="field"):
                yield Checkbox("QLoRA (4-bit base)", id="ft-qlora", compact=True)
                yield Label("  export ", classes="ft-number-label")
                yield Input("Q4_K_M", id="ft-export", compact=True, classes="ft-number")
            yield Label("", id="ft-verdict")
            yield Static("", id="ft-curve")
            yield Label("", id="ft-status")
        yield Footer()

    def on_mount(self) -> None:
        kept = sorted(
            p.name for p in self.app.settings.checkpoints_dir.glob("*") if (p / "config.json").is_file()
        )
        if kept:
            self.query_one("#ft-base", Input).value = kept[0]
        self.query_one("#ft-base", Input).focus()

    # -- settings and the live verdict --------------------------------------------------------------
    def _value(self, key: str) -> str:
        return self.query_one(f"#ft-{key}", Input).value.strip()

    def request(self) -> Any:
        """The run the fields describe (a UsageError names a field that makes no sense)."""
        from edgellm.errors import UsageError
        from edgellm.workflows import Finetune

        values: dict[str, Any] = {}
        for key, cast in (("rank", int), ("max-len", int), ("epochs", float), ("lr", float), ("batch", int)):
            text = self._value(key)
            if key == "batch" and text in ("", "auto"):
                values[key] = None
                continue
            try:
                values[key] = cast(text)
            except ValueError:
                raise UsageError(f"{key} takes a number, got {text!r}") from None
        return Finetune(
            base=self._value("base"),
            data=Path(self._value("data")).expanduser(),
            qlora=self.query_one("#ft-qlora", Checkbox).value,
            rank=values["rank"],
            max_len=values["max-len"],
            epochs=values["epochs"],
            lr=values["lr"],
            batch=values["batch"],
        ).check()

    @on(Input.Changed)
    @on(Checkbox.Changed)
    def _settings_changed(self, event: Any) -> None:
        if getattr(event, "input", None) is self.query_one("#ft-base", Input):
            self.shape = None
        self._verdict()

    def _verdict(self) -> None:
        from edgellm.errors import EdgeLLMError
        from edgellm.plan.training import TrainShape
        from edgellm.train.curve import verdict
        from edgellm.workflows import base_config, training_memory

        label = self.query_one("#ft-verdict", Label)
        try:
            request = self.request()
            local = (
                Path(request.base).expanduser().is_dir()
                or (self.app.settings.checkpoints_dir / request.base).is_dir()
            )
            if not local and self.shape is None:  # a Hub repo: its config comes with the data (Enter)
                label.update(
                    "the memory verdict follows when the data is read (Enter)" if request.base else ""
                )
                return
            if self.shape is None:
                settings = self.app.settings
                self.shape = TrainShape.from_config(
                    base_config(request.base, settings.checkpoints_dir, settings)
                )
        except EdgeLLMError as exc:
            label.update(described(exc) if self._value("base") else "")
            return
        hw = self.app.hardware
        share = self.plan.data.trained_tokens / max(self.plan.data.tokens, 1) if self.plan else 1.0
        dev = "cuda" if hw.gpus else "cpu"
        memory, _ = training_memory(request, self.shape, hw, dev, trained_share=share)
        label.update(verdict(memory))

    # -- reading the data ----------------------------------------------------------------------------
    @on(Input.Submitted, "#ft-data, #ft-base")
    def _check(self) -> None:
        if not self.busy:
            self.query_one("#ft-status", Label).update("reading the data…")
            self._plan(start=False)

    @work(thread=True, exclusive=True, group="finetune")
    def _plan(self, start: bool) -> None:
        from edgellm.models import store_for
        from edgellm.workflows import Job, finetune, plan_finetune

        settings = self.app.settings
        job = Job(cancel=self.cancel)
        try:
            request = self.request()
            plan = plan_finetune(
                request,
                store_for(settings),
                settings.runs_dir,
                settings.checkpoints_dir,
                self.app.hardware,
                job,
            )
        except Exception as exc:
            self.post_message(FinetunePlanFailed(exc))
            return
        self.post_message(FinetunePlanned(plan))
        if not start:
            return
        try:
            outcome = finetune(plan, request, job, lambda e: self.post_message(TrainEvent(e)))
        except Exception as exc:
            self.post_message(TrainFailed(exc))
        else:
            self.post_message(Trained(outcome))

    @on(FinetunePlanned)
    def _planned(self, message: FinetunePlanned) -> None:
        from edgellm.train.curve import verdict

        self.plan = message.plan
        self.shape = self.plan.memory.shape
        info = self.plan.data.summary()
        if self.plan.eval_data is not None:
            info += f"; eval {len(self.plan.eval_data.examples)} examples"
        self.query_one("#ft-data-info", Label).update(info)
        self.query_one("#ft-verdict", Label).update(verdict(self.plan.memory))
        self.query_one("#ft-status", Label).update(
            f"run {self.plan.name}: training…" if self.busy else "ready: Ctrl+T trains"
        )

    @on(FinetunePlanFailed)
    @on(TrainFailed)
    def _failed(self, message: FinetunePlanFailed | TrainFailed) -> None:
        self.busy = False
        self.app.report(message.error)
        self.query_one("#ft-status", Label).update(described(message.error))

    # -- training ------------------------------------------------------------------------------------
    def action_start(self) -> None:
        if self.busy:
            return
        self.busy, self.losses, self.eval_loss, self.adapter = True, [], None, None
        self.cancel.clear()
        self.query_one("#ft-status", Label).update("reading the data…")
        self._plan(start=True)

    @on(TrainEvent)
    def _event(self, message: TrainEvent) -> None:
        from edgellm.train.curve import plot, status_line
        from edgellm.train.loop import Evaluated, Progress, Saved

        event = message.event
        status = self.query_one("#ft-status", Label)
        if isinstance(event, Progress):
            self.losses.append(event.loss)
            width = max(10, self.size.width - 12)
            self.query_one("#ft-curve", Static).update("\n".join(plot(self.losses, width=width, height=5)))
            status.update(status_line(event, self.eval_loss))
        elif isinstance(event, Evaluated):
            self.eval_loss = event.eval_loss
        elif isinstance(event, Saved):
            status.update(f"checkpoint at step {event.step}")

    @on(Trained)
    def _trained(self, message: Trained) -> None:
        self.busy = False
        out = message.outcome
        self.adapter = out.adapter
        h = out.history
        evals = f", eval {h.eval_losses[0][1]:.3f} → {h.eval_losses[-1][1]:.3f}" if h.eval_losses else ""
        self.query_one("#ft-status", Label).update(
            f"done: loss {h.losses[0]:.3f} → {h.losses[-1]:.3f}{evals}; {out.tokens_per_second:.0f} tok/s, "
            f"peak {human_bytes(out.peak_memory)}. Ctrl+L exports it to the library"
        )
        self.app.notify(f"fine-tuned {out.adapter.parent.name}")

    # -- export ----------------------------------------------------------------------------------------
    def action_export(self) -> None:
        if self.busy or self.adapter is None:
            self.app.notify("train a run first (Ctrl+T)", severity="warning")
            return
        self.busy = True
        self.query_one("#ft-status", Label).update("exporting: merge, convert, quantize…")
        self._export(self.adapter, self._value("export") or None)

    @work(thread=True, exclusive=True, group="finetune")
    def _export(self, adapter: Path, quant: str | None) -> None:
        from edgellm.workflows import Job, export_run

        try:
            _, entry = export_run(self.app.store, adapter, quant, Job(cancel=self.cancel))
        except Exception as exc:
            self.post_message(JobFailed(exc, "export"))
        else:
            self.post_message(Added(entry))

    @on(Added)
    def _added(self, message: Added) -> None:
        self.busy = False
        self.query_one("#ft-status", Label).update(f"exported {message.entry.name} to the library")
        self.app.notify(f"exported {message.entry.name}")

    @on(JobFailed)
    def _export_failed(self, message: JobFailed) -> None:
        self.busy = False
        self.app.report(message.error)
        self.query_one("#ft-status", Label).update(described(message.error))

    def action_back(self) -> None:
        if self.busy:
            self.cancel.set()  # the run stops at its next step with a checkpoint
            self.query_one("#ft-status", Label).update("stopping at the next step…")
        else:
            self.app.pop_screen()

    def on_unmount(self) -> None:
        self.cancel.set()
