"""Each screen of the app drawn at a fixed terminal size, against saved SVG snapshots
(pytest-textual-snapshot; after an intended change: pytest tests/test_tui_snapshots.py --snapshot-update)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgellm.config import Settings
from tests import test_tui
from tests.test_tui import _library, _wait

hub = test_tui.hub  # the Hugging Face Hub stand-in, a fixture shared with the app's tests

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


async def library_ready(pilot) -> None:
    table = await _library(pilot)
    await _wait(pilot, lambda: table.get_row_at(0)[1] != "…")  # the planner's verdict is in
    await pilot.pause()  # and the column has widened to it


@pytest.mark.parametrize("size", [SIZE, (80, 24)], ids=["110x30", "80x24"])
def test_library(snap_compare, app, size) -> None:
    assert snap_compare(app, terminal_size=size, run_before=library_ready)


def test_help(snap_compare, app) -> None:
    async def ready(pilot) -> None:
        await library_ready(pilot)
        await pilot.press("question_mark")

    assert snap_compare(app, terminal_size=(80, 24), run_before=ready)


def test_chat(snap_compare, app) -> None:
    async def ready(pilot) -> None:
        await library_ready(pilot)
        await pilot.press("enter")
        prompt = pilot.app.screen.query_one("#prompt")
        await _wait(pilot, lambda: not prompt.disabled)

    assert snap_compare(app, terminal_size=SIZE, run_before=ready)


@pytest.mark.parametrize("size", [(80, 24), (140, 40)], ids=["80x24", "140x40"])
def test_settings(snap_compare, app, size) -> None:
    async def ready(pilot) -> None:
        await library_ready(pilot)
        await pilot.press("s")
        estimate = pilot.app.screen.query_one("#estimate")
        await _wait(pilot, lambda: "RAM" in str(estimate.render()))

    assert snap_compare(app, terminal_size=size, run_before=ready)


def test_get_a_model(snap_compare, app) -> None:
    async def ready(pilot) -> None:
        await library_ready(pilot)
        await pilot.press("g")

    assert snap_compare(app, terminal_size=SIZE, run_before=ready)


@pytest.mark.parametrize("size", [SIZE, (80, 24)], ids=["110x30", "80x24"])
def test_quantize(snap_compare, app, size) -> None:
    async def ready(pilot) -> None:
        await library_ready(pilot)
        await pilot.press("k")
        while not pilot.app.screen.measured:  # each type's size, from llama.cpp's dry run
            await pilot.pause(0.05)

    assert snap_compare(app, terminal_size=size, run_before=ready)


@pytest.mark.parametrize("size", [(80, 24), (140, 40)], ids=["80x24", "140x40"])
def test_conversations(snap_compare, app, home: Path, size) -> None:
    from edgellm.runtime.templates import Message
    from edgellm.tui.conversations import Conversations

    saved = Conversations(home / "conversations.db")
    saved.db.execute("INSERT INTO conversations (id, model, created) VALUES (1, 'smollm2-135m-instruct', 1795000000)")
    saved.save(1, [Message("user", "Remember the word banana."), Message("assistant", "Banana, noted.")])
    saved.db.commit()

    async def ready(pilot) -> None:
        await library_ready(pilot)
        await pilot.press("h")

    assert snap_compare(app, terminal_size=size, run_before=ready)


@pytest.mark.parametrize("size", [(80, 24), (140, 40)], ids=["80x24", "140x40"])
def test_get_a_model_search_then_fits(snap_compare, app, hub, smollm2: Path, size) -> None:
    """A Hub search's hits, then a repo's quantizations with whether each fits (#20)."""
    from textual.widgets import DataTable, Input

    hub.add("test/fits-GGUF", {"m-Q4_1.gguf": smollm2, "m-Q8_0.gguf": smollm2})

    async def ready(pilot) -> None:
        await library_ready(pilot)
        await pilot.press("g")
        pilot.app.screen.query_one("#source", Input).value = "fits"
        await pilot.press("enter")
        files = pilot.app.screen.query_one("#files", DataTable)
        await _wait(pilot, lambda: files.row_count == 1 and "REPO" in str(next(iter(files.columns.values())).label))
        await pilot.press("enter")

        def verdicts() -> list[str]:
            return [str(files.get_row_at(i)[2]) for i in range(files.row_count)]

        await _wait(pilot, lambda: files.row_count == 2 and "…" not in verdicts())
        # the column widens to its verdicts when the table is next idle: shown whole, not cut
        await _wait(pilot, lambda: files.columns["fits"].content_width >= max(map(len, verdicts())))
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=ready)


@pytest.mark.parametrize("size", [(80, 24), (140, 40)], ids=["80x24", "140x40"])
def test_chat_editing_a_multi_line_question(snap_compare, app, home: Path, size) -> None:
    """F2 in a reopened conversation: the question highlighted, back in the box on its two lines (#20)."""
    from tests.test_tui import _saved

    _saved(home, "smollm2-135m-instruct", "Name a color.\nOne word.", "Blue.")

    async def ready(pilot) -> None:
        await library_ready(pilot)
        await pilot.press("h")
        await pilot.pause()
        await pilot.press("enter")
        prompt = pilot.app.screen.query_one("#prompt")
        await _wait(pilot, lambda: not prompt.disabled)
        await pilot.press("f2")
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=ready)
