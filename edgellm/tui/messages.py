"""Messages the app's worker threads post to their screens: a worker never touches a widget, the
screen's handlers (on the app's own thread) do. One class per outcome, each carrying what that
outcome has; a screen handles each with its own ``@on`` handler."""

from __future__ import annotations

from typing import Any

from textual.message import Message

from edgellm.workflows import Step


class JobStep(Message):
    """A workflow's progress."""

    def __init__(self, step: Step) -> None:
        super().__init__()
        self.step = step


class Failed(Message):
    """A worker stopped by an error; each kind of work has its own subclass."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error


class Imported(Message):
    """A local GGUF is in the store (``entry``)."""

    def __init__(self, entry: Any) -> None:
        super().__init__()
        self.entry = entry


class ImportFailed(Failed):
    pass


class Loaded(Message):
    """The chat's model is loaded."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model


class LoadFailed(Failed):
    pass


class AnswerSoFar(Message):
    """An answer's text so far, and a reasoning model's thinking, as it streams (sent a few times a
    second, not per token)."""

    def __init__(self, text: str, reasoning: str = "") -> None:
        super().__init__()
        self.text = text
        self.reasoning = reasoning


class Answered(Message):
    """An answer is whole: its text and its last chunk (finish reason, timings)."""

    def __init__(self, text: str, last: Any) -> None:
        super().__init__()
        self.text = text
        self.last = last


class AnswerFailed(Failed):
    pass


class Searched(Message):
    """The Hub's GGUF repos for a search."""

    def __init__(self, text: str, hits: list) -> None:
        super().__init__()
        self.text = text
        self.hits = hits


class Listed(Message):
    """A Hub repo's files: its quantizations, or the checkpoint it holds with its conversions."""

    def __init__(self, repo: str, listing: Any, checkpoint: tuple[dict, dict] | None,
                 found: tuple | None) -> None:
        super().__init__()
        self.repo, self.listing, self.checkpoint, self.found = repo, listing, checkpoint, found


class Inspected(Message):
    """A local checkpoint folder: its parameters and the size and verdict of each conversion."""

    def __init__(self, folder: Any, parameters: int, sized: dict) -> None:
        super().__init__()
        self.folder, self.parameters, self.sized = folder, parameters, sized


class BrowseFailed(Failed):
    """A search, a listing or a folder that could not be read."""


class Judged(Message):
    """Fit verdicts for rows of a table: ``verdicts`` by row key; ``scope`` says whose rows (a
    repo's quantizations; None for the library's models)."""

    def __init__(self, verdicts: dict[str, str], scope: str | None = None) -> None:
        super().__init__()
        self.verdicts, self.scope = verdicts, scope


class Planned(Message):
    """Before a download or conversion: whether the result will fit this machine."""

    def __init__(self, plan: Any) -> None:
        super().__init__()
        self.plan = plan


class Added(Message):
    """A download, conversion or quantization put ``entry`` in the store."""

    def __init__(self, entry: Any) -> None:
        super().__init__()
        self.entry = entry


class JobFailed(Failed):
    """A download, conversion or quantization stopped (``what`` it was)."""

    def __init__(self, error: BaseException, what: str = "") -> None:
        super().__init__(error)
        self.what = what


class Estimated(Message):
    """The settings dialog's verdict on the values in its fields."""

    def __init__(self, text: str, warn: bool) -> None:
        super().__init__()
        self.text, self.warn = text, warn


class Sized(Message):
    """What a worker measured of one row: the file a quantization type would write, in bytes."""

    def __init__(self, key: str, size: int) -> None:
        super().__init__()
        self.key = key
        self.size = size


class SizingDone(Message):
    """Every quantization type's size is measured (or could not be)."""


class FinetunePlanned(Message):
    """A fine-tuning run is ready to start: its data read and its memory planned (``plan``)."""

    def __init__(self, plan: Any) -> None:
        super().__init__()
        self.plan = plan


class FinetunePlanFailed(Failed):
    pass


class TrainEvent(Message):
    """A step, an eval or a checkpoint of a running fine-tune (train.loop's events)."""

    def __init__(self, event: Any) -> None:
        super().__init__()
        self.event = event


class Trained(Message):
    """A fine-tune finished: ``outcome`` has the adapter and the loss curve."""

    def __init__(self, outcome: Any) -> None:
        super().__init__()
        self.outcome = outcome


class TrainFailed(Failed):
    pass
