"""Settings for loading a model, with the planner's RAM/VRAM estimate updated as they change."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select

from edgellm.options import KV_TYPES
from edgellm.tui.messages import Estimated

KV_CHOICES = [(name, name) for name in ("auto", *KV_TYPES)]


#: each setting's field, as an error names it
FIELDS = {"ctx": "Context", "gpu_layers": "GPU layers", "kv_type_k": "K cache type", "kv_type_v": "V cache type",
          "flash_attn": "Flash attention", "system": "System prompt", "temperature": "Temperature",
          "top_p": "Top-p", "max_tokens": "Max tokens"}
SELECTS = {"kv_type_k": KV_CHOICES, "kv_type_v": KV_CHOICES, "flash_attn": [(m, m) for m in ("auto", "on", "off")]}


def shown(settings, name: str) -> str:
    """A setting as its field shows it."""
    load, sampling = settings.load, settings.sampling
    return {
        "ctx": str(load.n_ctx) if load.n_ctx else ("auto" if load.n_ctx == 0 else ""),
        "gpu_layers": "auto" if load.n_gpu_layers is None else ("all" if load.n_gpu_layers < 0 else str(load.n_gpu_layers)),
        "kv_type_k": load.type_k, "kv_type_v": load.type_v, "flash_attn": load.flash_attn,
        "system": settings.system or "", "temperature": f"{sampling.temperature:g}", "top_p": f"{sampling.top_p:g}",
        "max_tokens": str(sampling.max_tokens),
    }[name]


def _typed(text: str) -> int | float | str:
    """A field's text as the preset file keeps it: 2048 a number, q8_0 a word."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class SettingsScreen(ModalScreen[bool]):
    """A model's preset: how it loads (context, GPU layers, KV types, flash attention) and how it
    answers (system prompt, temperature, top-p, length), kept across restarts in presets.toml.
    What differs from the app's settings is saved; the estimate runs the checks a load runs."""

    BINDINGS = [("escape", "dismiss(False)", "Cancel")]

    def __init__(self, model_name: str) -> None:
        super().__init__()
        self.model_name = model_name

    def compose(self) -> ComposeResult:
        current = self.app.settings_for(self.model_name)
        with Vertical(id="dialog"):
            yield Label(f"Settings for {self.model_name} (kept for this model)")
            for name, label in FIELDS.items():
                with Horizontal(classes="field"):
                    yield Label(label, classes="field-label")
                    if name in SELECTS:
                        yield Select(SELECTS[name], value=shown(current, name), allow_blank=False, id=name, compact=True)
                    else:
                        yield Input(shown(current, name), placeholder="default", id=name, compact=True)
            yield Label("", id="estimate")
            with Horizontal():
                yield Button("Apply", id="apply", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.estimate()

    def _values(self) -> dict:
        return {name: (self.query_one(f"#{name}", Select).value if name in SELECTS
                       else self.query_one(f"#{name}", Input).value.strip()) for name in FIELDS}

    def _changed(self) -> dict:
        """The fields that differ from the app's own settings: what this model's preset holds."""
        base = self.app.settings
        return {name: value for name, value in self._values().items() if value != shown(base, name)}

    def _settings(self):
        values = {k: v for k, v in self._changed().items() if v != ""}
        return self.app.settings.with_values(values, "settings", labels=FIELDS)

    @on(Input.Changed)
    @on(Select.Changed)
    def estimate(self) -> None:
        self._estimate(self._values())

    @work(thread=True, exclusive=True, group="estimate")
    def _estimate(self, _values: dict) -> None:
        from edgellm.errors import ConfigError, EdgeLLMError
        from edgellm.models import load_options, resolve
        from edgellm.plan.fit import fit_load
        from edgellm.runtime.loader import resolve_load

        try:
            settings = self._settings()
            load = load_options(settings)  # a draft model named by its store name, as a file
            header = resolve(self.model_name, settings).header
            resolve_load(header, load, self.app.hardware)  # the checks loading makes: refused here first
            plan = fit_load(header, self.app.hardware, load)
            text = ("fits: " + plan.summary()) if plan.fits else "will not fit: " + plan.reason
            warn = not plan.fits
        except ConfigError as exc:  # a value the fields cannot hold
            text, warn = f"invalid: {exc.in_app()}", True
        except EdgeLLMError as exc:  # settings a load would refuse
            text, warn = f"will not load: {exc.in_app()}", True
        except Exception as exc:
            text, warn = f"invalid: {exc}", True
        self.post_message(Estimated(text, warn))

    @on(Estimated)
    def _estimated(self, message: Estimated) -> None:
        label = self.query_one("#estimate", Label)
        label.update(message.text)
        label.set_class(message.warn, "warning")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id != "apply":
            self.dismiss(False)
            return
        from edgellm.presets import save_preset

        try:
            self._settings()  # refused here if a value cannot be used, before anything is written
            save_preset(self.app.settings.home, self.model_name,
                        {name: _typed(value) for name, value in self._changed().items()})
        except Exception as exc:
            self.app.report(exc)
            return
        self.dismiss(True)
