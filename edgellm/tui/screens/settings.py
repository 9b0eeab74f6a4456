"""Settings for loading a model, with the planner's RAM/VRAM estimate updated as they change."""

from __future__ import annotations

from dataclasses import replace

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select

from edgellm.options import KV_TYPES
from edgellm.tui.messages import Done

KV_CHOICES = [(name, name) for name in ("auto", *KV_TYPES)]


#: each setting's field, as an error names it
FIELDS = {"ctx": "Context", "gpu_layers": "GPU layers", "kv_type_k": "K cache type", "kv_type_v": "V cache type",
          "flash_attn": "Flash attention"}


class SettingsScreen(ModalScreen[bool]):
    BINDINGS = [("escape", "dismiss(False)", "Cancel")]

    def __init__(self, model_name: str) -> None:
        super().__init__()
        self.model_name = model_name

    def compose(self) -> ComposeResult:
        load = self.app.settings.load
        with Vertical(id="dialog"):
            yield Label(f"Settings for {self.model_name}")
            yield Label("Context (tokens, or auto)")
            yield Input(str(load.n_ctx) if load.n_ctx else ("auto" if load.n_ctx == 0 else ""), placeholder="default", id="ctx")
            yield Label("GPU layers (number, all or auto)")
            yield Input("auto" if load.n_gpu_layers is None else str(load.n_gpu_layers), id="gpu_layers")
            yield Label("K cache type")
            yield Select(KV_CHOICES, value=load.type_k, allow_blank=False, id="kv_type_k")
            yield Label("V cache type")
            yield Select(KV_CHOICES, value=load.type_v, allow_blank=False, id="kv_type_v")
            yield Label("Flash attention")
            yield Select([(m, m) for m in ("auto", "on", "off")], value=load.flash_attn, allow_blank=False, id="flash_attn")
            yield Label("", id="estimate")
            with Horizontal():
                yield Button("Apply", id="apply", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.estimate()

    def _values(self) -> dict:
        return {
            "ctx": self.query_one("#ctx", Input).value.strip() or None,
            "gpu_layers": self.query_one("#gpu_layers", Input).value.strip() or None,
            "kv_type_k": self.query_one("#kv_type_k", Select).value,
            "kv_type_v": self.query_one("#kv_type_v", Select).value,
            "flash_attn": self.query_one("#flash_attn", Select).value,
        }

    def _settings(self):
        from edgellm.config import Settings

        resolved = Settings._build(self.app.settings.home,
                                   {k: (v, FIELDS[k]) for k, v in self._values().items() if v is not None})
        return replace(self.app.settings, load=resolved.load)

    @on(Input.Changed)
    @on(Select.Changed)
    def estimate(self) -> None:
        self._estimate(self._values())

    @work(thread=True, exclusive=True, group="estimate")
    def _estimate(self, _values: dict) -> None:
        from edgellm.errors import ConfigError, EdgeLLMError
        from edgellm.models import load_options, resolve
        from edgellm.plan.fit import fit
        from edgellm.runtime.engine import resolve_load

        try:
            settings = self._settings()
            load = load_options(settings)  # a draft model named by its store name, as a file
            header = resolve(self.model_name, settings).header
            resolve_load(header, load, self.app.hardware)  # the checks loading makes: refused here first
            plan = fit(header, self.app.hardware, n_ctx=load.n_ctx, type_k=load.type_k, type_v=load.type_v,
                       n_gpu_layers=load.n_gpu_layers, flash_attn=load.flash_attn)
            text = ("fits: " + plan.summary()) if plan.fits else "will not fit: " + plan.reason
            warn = not plan.fits
        except ConfigError as exc:  # a value the fields cannot hold
            text, warn = f"invalid: {exc.in_app()}", True
        except EdgeLLMError as exc:  # settings a load would refuse
            text, warn = f"will not load: {exc.in_app()}", True
        except Exception as exc:
            text, warn = f"invalid: {exc}", True
        self.post_message(Done("estimate", (text, warn)))

    def on_done(self, message: Done) -> None:
        text, warn = message.result
        label = self.query_one("#estimate", Label)
        label.update(text)
        label.set_class(warn, "warning")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id != "apply":
            self.dismiss(False)
            return
        try:
            self.app.settings = self._settings()
        except Exception as exc:
            self.app.report(exc)
            return
        self.dismiss(True)
