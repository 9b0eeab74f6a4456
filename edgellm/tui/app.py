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
from edgellm.tui.conversations import Conversations
from edgellm.tui.errors import described
from edgellm.tui.messages import Imported, ImportFailed


class EdgeApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "edgellm"
    BINDINGS = [Binding("question_mark,f1", "help", "Help", show=False, key_display="? F1")]

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.store: Store = store_for(settings)
        self.hardware = None  # probed as the app starts, before any worker asks
        self._conversations: Conversations | None = None

    @property
    def conversations(self) -> Conversations:
        """The saved conversations, one database for every screen, opened on first use and closed
        when the app ends."""
        if self._conversations is None:
            self._conversations = Conversations(self.settings.home / "conversations.db")
        return self._conversations

    def settings_for(self, model: str, presets: dict[str, dict] | None = None) -> Settings:
        """The app's settings with ``model``'s preset (presets.toml) on top: what its chat loads and
        samples with, and what the library judges its fit by. ``presets``: the file as already read
        (the library asks for every model at once), else it is read now."""
        from edgellm.presets import FILE, load_presets

        table = (load_presets(self.settings.home) if presets is None else presets).get(model, {})
        return self.settings.with_values(table, f"{FILE} [{model}]")

    def on_mount(self) -> None:
        from edgellm.system.hardware import probe
        from edgellm.tui.screens.library import LibraryScreen

        # the planner's view of this machine (budgets from settings applied), once, here: workers
        # that read it never probe it twice at once
        self.hardware = probe(self.settings.gpu_memory, self.settings.ram)
        self.push_screen(LibraryScreen())

    def on_unmount(self) -> None:
        if self._conversations is not None:
            self._conversations.close()

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

    @work(thread=True, group="import")
    def import_file(self, path: str, reply_to: MessagePump) -> None:
        """Add a local .gguf to the store off the UI thread (validating and hashing take a while);
        ``reply_to`` (the screen that asked) gets Imported or ImportFailed. The app says which."""
        try:
            entry = self.store.import_gguf(Path(path).expanduser())
        except Exception as exc:
            reply_to.post_message(ImportFailed(exc))
        else:
            reply_to.post_message(Imported(entry))

    # an import's end bubbles up here from the screen that asked, after that screen's own handler
    def on_imported(self, message: Imported) -> None:
        self.notify(f"imported {message.entry.name}")

    def on_import_failed(self, message: ImportFailed) -> None:
        self.report(message.error)
