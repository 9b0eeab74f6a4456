"""How a workflow's progress reads on screen: the stage by name (download, convert, quantize …),
how far in its own unit, and for bytes the speed, each stage measured from its own start."""

from __future__ import annotations

import time

from edgellm.gguf.header import human_bytes
from edgellm.workflows import Step


class StageClock:
    """Turns the Steps of one job into status lines; a new stage restarts the clock."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.started = 0.0

    def describe(self, step: Step) -> str:
        if step.stage != self.stage:
            self.stage, self.started = step.stage, time.monotonic()
        elapsed = time.monotonic() - self.started
        if step.unit == "bytes":
            amount = f"{human_bytes(step.done)}" + (f" of {human_bytes(step.total)}" if step.total else "")
            speed = f" · {human_bytes(int(step.done / elapsed))}/s" if elapsed > 0.5 and step.done else ""
            return f"{step.stage}: {amount}{speed}"
        amount = f"{step.done} of {step.total} {step.unit}" if step.total else f"{step.done} {step.unit}"
        return f"{step.stage}: {amount}" + (f" · {step.detail}" if step.detail else "")
