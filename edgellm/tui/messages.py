"""Messages the app's worker threads post to their screens: a worker never touches a widget, the
screen's handlers (on the app's own thread) do."""

from __future__ import annotations

from typing import Any

from textual.message import Message

from edgellm.workflows import Step


class JobStep(Message):
    """A workflow's progress."""

    def __init__(self, step: Step) -> None:
        super().__init__()
        self.step = step


class Done(Message):
    """A worker's end: ``what`` it did, and its result or the error that stopped it."""

    def __init__(self, what: str, result: Any = None, error: BaseException | None = None) -> None:
        super().__init__()
        self.what = what
        self.result = result
        self.error = error


class AnswerSoFar(Message):
    """An answer's text so far, and a reasoning model's thinking, as it streams (sent a few times a
    second, not per token)."""

    def __init__(self, text: str, reasoning: str = "") -> None:
        super().__init__()
        self.text = text
        self.reasoning = reasoning


class Sized(Message):
    """What a worker measured of one row: the file a quantization type would write, in bytes."""

    def __init__(self, key: str, size: int) -> None:
        super().__init__()
        self.key = key
        self.size = size
