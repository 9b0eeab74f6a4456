"""The app: settings and the model store on the app; screens do the rest."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.message_pump import MessagePump
from textual.screen import Screen

from edgellm.config import Settings
from edgellm.models import store_for
from edgellm.models.store import Store
from edgellm.tui.errors import described
from edgellm.tui.messages import Done


class EdgeApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "edgellm"
    BINDINGS = [Binding("question_mark,f1", "help", "Help", show=False, key_display="? F1")]

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.store: Store = store_for(settings)
        self._hardware = None

    @property
    def hardware(self):
        """Probed once: the planner's view of this machine (budgets from settings applied)."""
        if self._hardware is None:
            from edgellm.system.hardware import probe

            self._hardware = probe(self.settings.gpu_memory, self.settings.ram)
        return self._hardware

    def settings_for(self, model: str, presets: dict[str, dict] | None = None) -> Settings:
        """The app's settings with ``model``'s preset (presets.toml) on top: what its chat loads and
        samples with, and what the library judges its fit by. ``presets``: the file as already read
        (the library asks for every model at once), else it is read now."""
        from edgellm.presets import FILE, load_presets

        table = (load_presets(self.settings.home) if presets is None else presets).get(model, {})
        return self.settings.with_values(table, f"{FILE} [{model}]")

    def on_mount(self) -> None:
        from edgellm.tui.screens.library import LibraryScreen

        self.push_screen(LibraryScreen())

    def action_help(self) -> None:
        from edgellm.tui.screens.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.screen))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The command palette (Ctrl+P): Textual's own commands, then every key of the screen
        you are on by what it does ("Get a model", "Quantize", ...)."""
        from edgellm.tui.screens.help import screen_keys

        yield from super().get_system_commands(screen)
        for key, what, action in screen_keys(screen):
            if action != "help":
                yield SystemCommand(what, f"key: {key}", partial(screen.run_action, action))
        yield SystemCommand("Help", "the keys of this screen (? or F1)", self.action_help)

    def report(self, exc: BaseException) -> None:
        """The TUI's rendering of an error: a notification, and the app carries on."""
        message = described(exc)
        self.notify(message, severity="error", timeout=8)

    def imported(self, message: Done) -> None:
        """What an import's end shows, whichever screen asked for it."""
        if message.error is not None:
            self.report(message.error)
        else:
            self.notify(f"imported {message.result.name}")

    @work(thread=True, group="import")
    def import_file(self, path: str, reply_to: MessagePump) -> None:
        """Add a local .gguf to the store off the UI thread (validating and hashing take a while);
        ``reply_to`` (the screen that asked) gets a Done("import") with the entry or the error."""
        try:
            entry = self.store.import_gguf(Path(path).expanduser())
        except Exception as exc:
            reply_to.post_message(Done("import", error=exc))
        else:
            reply_to.post_message(Done("import", entry))
