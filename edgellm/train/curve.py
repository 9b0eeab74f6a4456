"""A run as text: the memory verdict, the status line of a step, and the loss curve (what the CLI prints
at the end of a run and the app draws as it goes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgellm.gguf.header import human_bytes

_DOTS = "⠁⠂⠄⡀"  # braille dots from the top of a character cell to its bottom


def plot(values: Sequence[float], width: int = 60, height: int = 8) -> list[str]:
    """``values`` (one per step) as ``height`` lines of at most ``width`` columns plus a y axis:
    each column is the mean of its steps, four levels per line."""
    values = [v for v in values if v == v]  # NaN is not a point
    if not values:
        return []
    width = max(1, min(width, len(values)))
    columns = []
    for c in range(width):
        lo, hi = c * len(values) // width, max((c + 1) * len(values) // width, c * len(values) // width + 1)
        chunk = values[lo:hi]
        columns.append(sum(chunk) / len(chunk))
    top, bottom = max(columns), min(columns)
    span = (top - bottom) or 1.0
    levels = height * 4
    grid = [[" "] * width for _ in range(height)]
    for c, v in enumerate(columns):
        level = round((top - v) / span * (levels - 1))
        grid[level // 4][c] = _DOTS[level % 4]
    label = max(len(f"{top:.3g}"), len(f"{bottom:.3g}"))
    lines = []
    for r, row in enumerate(grid):
        tick = f"{top:.3g}" if r == 0 else f"{bottom:.3g}" if r == height - 1 else ""
        lines.append(f"{tick:>{label}} ┤{''.join(row)}")
    lines.append(f"{'':>{label}} └{'─' * width} {len(values)} steps")
    return lines


def verdict(memory: Any) -> str:
    """The memory plan in one line: total against what is free, and the biggest parts."""
    s = memory.settings
    parts = ", ".join(f"{p.name} {human_bytes(p.bytes)}" for p in memory.parts if p.bytes)
    word = "fits" if memory.fits else "does NOT fit"
    return (
        f"memory: {human_bytes(memory.total)} of {human_bytes(memory.available)} free {memory.where}, {word} "
        f"({s.method}, {s.compute_dtype}, rank {s.rank}, batch {s.batch} x {s.max_len} tokens"
        f"{', gradient checkpointing' if s.gradient_checkpointing else ''}): {parts}"
    )


def status_line(p: Any, eval_loss: float | None) -> str:
    eta = f"{int(p.eta_seconds // 60)}:{int(p.eta_seconds % 60):02d}"
    bar = "█" * round(20 * p.step / p.total)
    return (
        f"step {p.step}/{p.total} {bar:<20} loss {p.loss:.4f}"
        + (f" eval {eval_loss:.4f}" if eval_loss is not None else "")
        + f"  {p.tokens_per_second:.0f} tok/s  {human_bytes(p.memory)}  ETA {eta}"
    )
