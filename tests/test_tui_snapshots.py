"""Each screen of the app drawn at a fixed terminal size, against saved SVG snapshots
(pytest-textual-snapshot; after an intended change: pytest tests/test_tui_snapshots.py --snapshot-update)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgellm.config import Settings

SIZE = (110, 30)


@pytest.fixture()
def app(home: Path, monkeypatch: pytest.MonkeyPatch):
    # the planner's verdicts and estimates must not depend on the machine that draws them
    monkeypatch.setenv("EDGELLM_RAM", "8GiB")
    monkeypatch.setenv("EDGELLM_GPU_MEMORY", "0")
    monkeypatch.setenv("EDGELLM_THREADS", "2")
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    from edgellm.tui import make_app

    return make_app(Settings.resolve())


async def until(pilot, condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.05)


async def library_ready(pilot) -> None:
    from textual.widgets import DataTable

    table = pilot.app.screen.query_one(DataTable)
    await until(pilot, lambda: table.row_count == 1 and table.get_row_at(0)[-1] != "…")


def test_library(snap_compare, app) -> None:
    assert snap_compare(app, terminal_size=SIZE, run_before=library_ready)


def test_chat(snap_compare, app) -> None:
    async def ready(pilot) -> None:
        await library_ready(pilot)
        await pilot.press("enter")
        prompt = pilot.app.screen.query_one("#prompt")
        await until(pilot, lambda: not prompt.disabled)

    assert snap_compare(app, terminal_size=SIZE, run_before=ready)


def test_settings(snap_compare, app) -> None:
    async def ready(pilot) -> None:
        await library_ready(pilot)
        await pilot.press("s")
        estimate = pilot.app.screen.query_one("#estimate")
        await until(pilot, lambda: "RAM" in str(estimate.render()))

    assert snap_compare(app, terminal_size=(110, 44), run_before=ready)


def test_get_a_model(snap_compare, app) -> None:
    async def ready(pilot) -> None:
        await library_ready(pilot)
        await pilot.press("g")

    assert snap_compare(app, terminal_size=SIZE, run_before=ready)


def test_quantize(snap_compare, app) -> None:
    async def ready(pilot) -> None:
        await library_ready(pilot)
        await pilot.press("k")

    assert snap_compare(app, terminal_size=SIZE, run_before=ready)


def test_conversations(snap_compare, app, home: Path) -> None:
    from edgellm.runtime.templates import Message
    from edgellm.tui.conversations import Conversations

    saved = Conversations(home / "conversations.db")
    saved.db.execute("INSERT INTO conversations (id, model, created) VALUES (1, 'smollm2-135m-instruct', 1795000000)")
    saved.save(1, [Message("user", "Remember the word banana."), Message("assistant", "Banana, noted.")])
    saved.db.commit()

    async def ready(pilot) -> None:
        await library_ready(pilot)
        await pilot.press("h")

    assert snap_compare(app, terminal_size=SIZE, run_before=ready)
