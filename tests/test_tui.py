"""The Textual app driven by Textual's own Pilot, with the real SmolLM2."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import time
from pathlib import Path

import pytest

from edgellm.config import Settings
from edgellm.tui.widgets import PromptArea


def run(coro):
    return asyncio.run(coro)


async def _wait(pilot, condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.05)


@contextlib.asynccontextmanager
async def _at_library(home: Path, size: tuple[int, int] = (120, 40)):
    """The app at a fresh home's library, once it lists the bundled model: (app, pilot, its table)."""
    app = _app(home)
    async with app.run_test(size=size) as pilot:
        yield app, pilot, await _library(pilot)


async def _library(pilot):
    """The library's table, once it lists the one model a fresh home has (the bundled SmolLM2)."""
    from textual.widgets import DataTable

    table = pilot.app.screen.query_one(DataTable)
    await _wait(pilot, lambda: table.row_count == 1)
    return table


def _app(home: Path):
    from edgellm.tui import make_app

    return make_app(Settings.resolve())


async def _get_a_model(pilot):
    """Get a model (g), opened from the library: its source field."""
    from textual.widgets import Input

    await pilot.press("g")
    return pilot.app.screen.query_one("#source", Input)


async def _hub_files(pilot, source: str, rows: int):
    """Get a model (g) with ``source`` entered: its table of files, once it lists ``rows``, focused."""
    from textual.widgets import DataTable

    (await _get_a_model(pilot)).value = source
    await pilot.press("enter")
    files = pilot.app.screen.query_one("#files", DataTable)
    await _wait(pilot, lambda: files.row_count == rows)
    files.focus()
    return files


def _saved(home: Path, model: str, question: str, answer: str):
    """A conversation saved as the chat saves one: (the conversations, its id)."""
    from edgellm.runtime.templates import Message
    from edgellm.tui.conversations import Conversations

    saved = Conversations(home / "conversations.db")
    cid = saved.new(model)
    saved.save(cid, [Message("user", question), Message("assistant", answer)])
    return saved, cid


@pytest.fixture()
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The Hugging Face Hub stand-in, where huggingface_hub (and so the app) looks for it."""
    from huggingface_hub import constants

    from tests.hubstandin import HubStandIn

    stand_in = HubStandIn()
    monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # huggingface_hub read HF_HOME when first imported (by an earlier test, in this process): its
    # cache must move too, or the app's downloads land in the user's real Hub cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    yield stand_in
    stand_in.close()


def test_library_chat_stream_and_stop(home: Path) -> None:
    from textual.widgets import Markdown, Static

    from edgellm.tui.screens.chat import ChatScreen

    async def body() -> None:
        async with _at_library(home) as (app, pilot, table):
            # cells a model provides are Text, never parsed as markup: compared as the text shown
            row = [str(cell) for cell in table.get_row_at(0)]
            assert row[0] == "smollm2-135m-instruct" and row[2:] == ["Q4_1", "93.8 MiB", "135M", "llama", "8192"]
            # the planner's verdict, with what the model needs (RAM only here: no GPU)
            await _wait(pilot, lambda: str(table.get_row_at(0)[1]).startswith("yes "))
            assert str(table.get_row_at(0)[1]).endswith(" MiB") and "+" not in str(table.get_row_at(0)[1])
            await pilot.press("enter")
            assert isinstance(app.screen, ChatScreen)
            prompt = app.screen.query_one("#prompt", PromptArea)
            await _wait(pilot, lambda: not prompt.disabled)
            assert str(app.screen.query_one("#status", Static).render()).endswith("template: GGUF")
            app.settings = Settings.resolve({"temperature": 0, "max_tokens": 24})
            prompt.value = "What is the capital of Germany?"
            await pilot.press("enter")
            answers = app.screen.query(Markdown)
            await _wait(pilot, lambda: not app.screen.generating)
            assert "Berlin" in answers.last()._markdown
            status_line = app.screen.query_one("#status", Static)
            status = str(status_line.render())
            assert "tok/s" in status and "context" in status and "kv f16/f16" in status
            # under the answer, what it cost: tokens, speed, time to the first token
            stats = [str(w.render()) for w in app.screen.query(".stats")]
            assert len(stats) == 1 and re.fullmatch(r"\d+ tokens · [\d.]+ tok/s · first token \d+ ms", stats[0])
            # Ctrl+R answers the last question again, in place of the answer there was
            await pilot.press("ctrl+r")
            await _wait(pilot, lambda: not app.screen.generating)
            assert len(app.screen.query(Markdown)) == 1 and len(app.screen.query(".stats")) == 1
            assert [m.role for m in app.screen.history] == ["user", "assistant"]
            assert "Berlin" in answers.last()._markdown
            # and a person sees it: on screen, above the footer rather than under it
            from textual.widgets import Footer

            footer = app.screen.query_one(Footer).region
            assert status_line.region.height == 1 and 0 < status_line.region.y and status_line.region.bottom <= footer.y
            # a long answer, stopped at once with Esc
            # greedy, this prompt runs to all 2000 tokens: sampled, it sometimes ended before the Esc came
            app.settings = Settings.resolve({"temperature": 0, "max_tokens": 2000, "stop": ["NEVER"]})
            prompt.value = "Write a very long story about a dragon."
            await pilot.press("enter")
            await _wait(pilot, lambda: len(app.screen.query(Markdown).last()._markdown) > 20)
            await pilot.press("escape")
            await _wait(pilot, lambda: not app.screen.generating, timeout=10)
            assert "stopped" in str(app.screen.query_one("#status", Static).render())
            assert str(app.screen.query(".stats").last().render()).endswith(" · stopped")  # marked where it stopped
            assert len(app.screen.history) == 4
        db = sqlite3.connect(home / "conversations.db")
        roles = [r for (r,) in db.execute("SELECT role FROM messages ORDER BY conversation, position")]
        assert roles == ["user", "assistant", "user", "assistant"]

    run(body())


def test_a_multi_line_question_and_editing_a_past_one(home: Path) -> None:
    """#20: Ctrl+J starts a new line, pasted text keeps its lines, Enter sends; F2 takes a past
    question back into the box (each press the one before), Enter answers it again in its place
    and what followed it goes, from the screen and the saved conversation; Esc leaves all as it
    was. A question is shown as typed, brackets included."""
    from textual import events
    from textual.widgets import Markdown

    async def body() -> None:
        async with _at_library(home) as (app, pilot, _):
            await pilot.press("enter")
            prompt = app.screen.query_one("#prompt", PromptArea)
            await _wait(pilot, lambda: not prompt.disabled)
            app.settings = Settings.resolve({"temperature": 0, "max_tokens": 8})
            prompt.value = "Say hi"
            await pilot.press("ctrl+j")
            prompt.insert("[/b] twice")
            assert prompt.value == "Say hi\n[/b] twice"
            await pilot.press("enter")
            await _wait(pilot, lambda: len(app.screen.history) == 2)
            questions = lambda: [str(w.render()) for w in app.screen.query(".user")]  # noqa: E731
            assert questions() == ["Say hi\n[/b] twice"] and app.screen.history[0].content == "Say hi\n[/b] twice"
            app.post_message(events.Paste("Name a color.\nOne word."))  # as the terminal sends it, to the focused box
            await _wait(pilot, lambda: prompt.value == "Name a color.\nOne word.")
            await pilot.press("enter")
            await _wait(pilot, lambda: len(app.screen.history) == 4)

            await pilot.press("f2")
            assert prompt.value == "Name a color.\nOne word." and app.screen.query(".editing").first() is app.screen.query(".user").last()
            await pilot.press("f2")
            assert prompt.value == "Say hi\n[/b] twice" and app.screen.query(".editing").first() is app.screen.query(".user").first()
            await pilot.press("escape")  # leaves it: nothing changed, still in the chat
            assert prompt.value == "" and not app.screen.query(".editing") and len(app.screen.history) == 4
            assert app.screen.query_one("#prompt") is prompt

            await pilot.press("f2", "f2")
            prompt.value = "What is the capital of Germany?"
            app.settings = Settings.resolve({"temperature": 0, "max_tokens": 24})
            await pilot.press("enter")
            await _wait(pilot, lambda: not app.screen.generating and len(app.screen.history) == 2)
            assert questions() == ["What is the capital of Germany?"] and len(app.screen.query(Markdown)) == 1
            assert "Berlin" in app.screen.history[1].content
        db = sqlite3.connect(home / "conversations.db")
        saved = [(r, c) for r, c in db.execute("SELECT role, content FROM messages ORDER BY conversation, position")]
        assert [r for r, _ in saved] == ["user", "assistant"] and saved[0][1] == "What is the capital of Germany?"

    run(body())


def test_a_reasoning_models_thinking_is_shown_apart_and_folded(home: Path) -> None:
    """The model is made to think by a grammar (no reasoning model ships on PyPI): the app shows
    the thinking dimmed in a "thinking" fold, folded once the answer comes, and not in the answer."""
    from dataclasses import replace

    from textual.widgets import Collapsible, Markdown, Static

    from tests.test_reasoning import GRAMMAR, THOUGHT

    async def body() -> None:
        async with _at_library(home) as (app, pilot, _):
            await pilot.press("enter")
            prompt = app.screen.query_one("#prompt", PromptArea)
            await _wait(pilot, lambda: not prompt.disabled)
            settings = Settings.resolve({"temperature": 0, "max_tokens": 64})
            app.settings = replace(settings, sampling=replace(settings.sampling, grammar=GRAMMAR))
            prompt.value = "What is the capital of Germany?"
            await pilot.press("enter")
            await _wait(pilot, lambda: not app.screen.generating)
            fold = app.screen.query_one(Collapsible)
            assert fold.title == "thinking" and fold.collapsed
            assert str(fold.query_one(".thinking", Static).render()).strip() == THOUGHT
            answer = app.screen.query(Markdown).last()._markdown
            assert "<think>" not in answer and answer.endswith(".")

    run(body())


def test_settings_estimate_changes_with_the_kv_type_and_runs_the_load_checks(home: Path) -> None:
    from textual.widgets import Input, Label, Select

    from edgellm.tui.screens.settings import SettingsScreen

    async def body() -> None:
        async with _at_library(home, (120, 50)) as (app, pilot, _):
            await pilot.press("s")
            assert isinstance(app.screen, SettingsScreen)
            estimate = app.screen.query_one("#estimate", Label)
            await _wait(pilot, lambda: "RAM" in str(estimate.render()))
            before = str(estimate.render())
            assert "kv f16/f16" in before
            app.screen.query_one("#kv_type_v", Select).value = "q4_0"
            app.screen.query_one("#kv_type_k", Select).value = "q8_0"
            await _wait(pilot, lambda: "q8_0/q4_0" in str(estimate.render()))
            assert str(estimate.render()) != before
            # the checks a load runs come first: past the trained length, a quantized V without flash attention
            app.screen.query_one("#ctx", Input).value = "100000000"
            await _wait(pilot, lambda: "will not load" in str(estimate.render()))
            assert "longer than the 8192 tokens" in str(estimate.render()) and "fits:" not in str(estimate.render())
            # the way out in the app's words: a setting here, not a CLI flag the app does not have
            assert "shorter context in the settings" in str(estimate.render()) and "--" not in str(estimate.render())
            app.screen.query_one("#ctx", Input).value = "2048"
            app.screen.query_one("#flash_attn", Select).value = "off"
            await _wait(pilot, lambda: "needs flash attention" in str(estimate.render()))
            assert "flash attention to on or auto in the settings" in str(estimate.render())
            assert "--" not in str(estimate.render())

    run(body())


def test_a_long_verdict_is_shown_whole_at_80x24(home: Path, monkeypatch) -> None:
    """A verdict longer than the dialog wraps instead of being cut, and a bad value says what is
    wrong with it once, by the field's name (#20's bug 5)."""
    from textual.geometry import Region
    from textual.widgets import Input, Label

    monkeypatch.setenv("EDGELLM_RAM", "300M")  # less than the model needs at any context

    def shown(label: Label) -> str:
        lines = label.render_lines(Region(0, 0, label.size.width, label.size.height))
        return "".join(strip.text for strip in lines).replace(" ", "")

    async def body() -> None:
        async with _at_library(home, (80, 24)) as (app, pilot, _):
            await pilot.press("s")
            estimate = app.screen.query_one("#estimate", Label)
            await _wait(pilot, lambda: "does not fit" in str(estimate.render()))
            verdict = str(estimate.render())
            assert len(verdict) > estimate.size.width and estimate.size.height > 1
            assert shown(estimate) == verdict.replace(" ", "")  # every word on screen
            app.screen.query_one("#gpu_layers", Input).value = "abc"
            await _wait(pilot, lambda: "abc" in str(estimate.render()))
            assert str(estimate.render()) == (
                "invalid: GPU layers: invalid value 'abc' for gpu_layers: not a layer count, all or auto")

    run(body())


def test_delete_with_confirmation_and_bad_import(home: Path, tmp_path: Path) -> None:
    from textual.widgets import Input

    async def body() -> None:
        async with _at_library(home) as (app, pilot, table):
            await pilot.press("d")
            await pilot.click("#no")
            assert table.row_count == 1
            await pilot.press("d")
            await pilot.click("#yes")
            await _wait(pilot, lambda: table.row_count == 0 or not (home / "models" / "smollm2-135m-instruct").exists())
            assert not (home / "models" / "smollm2-135m-instruct").exists()
            # a file that is not a GGUF: a notification, and the app goes on
            bad = tmp_path / "notes.gguf"
            bad.write_text("not a model")
            await pilot.press("i")
            app.screen.query_one(Input).value = str(bad)
            await pilot.press("enter")
            await _wait(pilot, lambda: any("not a GGUF file" in n.message for n in app._notifications))
            await pilot.press("i")
            app.screen.query_one(Input).value = str(tmp_path / "missing.gguf")
            await pilot.press("enter")
            await _wait(pilot, lambda: any("no such file" in n.message for n in app._notifications))
            assert app.is_running

    run(body())


def test_a_failed_load_says_why_and_the_way_back(home: Path) -> None:
    from textual.widgets import Static

    from edgellm.tui.screens.library import LibraryScreen

    async def body() -> None:
        async with _at_library(home) as (app, pilot, _):
            app.settings = Settings.resolve({"ctx": 10_000_000})
            await pilot.press("enter")
            status = app.screen.query_one("#status", Static)
            await _wait(pilot, lambda: "could not load" in str(status.render()))
            assert "longer than the 8192 tokens" in str(status.render())
            prompt = app.screen.query_one("#prompt", PromptArea)
            assert prompt.disabled and "Ctrl-B" in prompt.placeholder and "loading" not in prompt.placeholder
            await pilot.press("ctrl+b")
            await _wait(pilot, lambda: isinstance(app.screen, LibraryScreen))

    run(body())


def test_delete_removes_the_model_chosen_and_no_is_the_default(home: Path, smollm2: Path) -> None:
    """↓↓ d n Esc d Enter d y: the dialog names the model, n and Enter answer no, the cursor stays
    on the model chosen through every dialog, and y removes that one, not the first row."""
    from textual.widgets import Label

    async def body() -> None:
        async with _at_library(home) as (app, pilot, table):
            for name in ("alpha", "beta"):
                app.store.import_gguf(smollm2, name, link=True)
            await pilot.press("r")
            await _wait(pilot, lambda: table.row_count == 3)
            names = [row.key.value for row in table.ordered_rows]
            await pilot.press("down", "down")
            chosen = names[2]
            await pilot.press("d")
            assert chosen in str(app.screen.query_one(Label).render())
            await pilot.press("n")
            await pilot.press("escape")
            await pilot.press("d")
            await pilot.press("enter")  # No has the focus
            await pilot.pause(0.2)
            assert table.row_count == 3 and app.screen.query_one("#models") is table
            await pilot.press("d", "y")
            await _wait(pilot, lambda: table.row_count == 2)
            assert [row.key.value for row in table.ordered_rows] == names[:2]
            assert (home / "models" / names[0]).is_dir() and not (home / "models" / chosen).exists()

    run(body())


def test_after_a_delete_the_cursor_is_on_the_next_model_not_the_first(home: Path, smollm2: Path) -> None:
    """↓↓ d y, then d y again: the second delete takes the row that followed the first, never the
    top of the list; deleting the last row leaves the cursor on the one above."""

    async def body() -> None:
        async with _at_library(home) as (app, pilot, table):
            for name in ("alpha", "beta", "gamma"):
                app.store.import_gguf(smollm2, name, link=True)
            await pilot.press("r")
            await _wait(pilot, lambda: table.row_count == 4)
            names = [row.key.value for row in table.ordered_rows]
            await pilot.press("up", "up", "up", "down", "down", "d", "y")  # the third row
            await _wait(pilot, lambda: table.row_count == 3)
            assert names[2] not in table.rows and app.screen.selected() == names[3]
            await pilot.press("d", "y")
            await _wait(pilot, lambda: table.row_count == 2)
            assert [row.key.value for row in table.ordered_rows] == names[:2]
            assert app.screen.selected() == names[1]

    run(body())


def test_model_strings_are_shown_as_text_not_markup(home: Path, tmp_path: Path) -> None:
    """A GGUF may name itself or its architecture with Rich markup; the app shows it, as text."""
    from textual.widgets import DataTable, Static

    from tests.ggufcraft import Craft, kv_str

    craft = Craft()
    craft.kvs = [kv_str("general.architecture", "[/evil]"), *craft.kvs[1:], kv_str("general.name", "[bold]x[/i]")]
    path = tmp_path / "markup.gguf"
    path.write_bytes(craft.build())

    async def body() -> None:
        app = _app(home)
        async with app.run_test(size=(120, 40)) as pilot:
            app.store.import_gguf(path, "markup")
            table = app.screen.query_one(DataTable)
            await pilot.press("r")
            await _wait(pilot, lambda: table.row_count == 2)
            await pilot.pause(0.2)
            assert "[/evil]" in [str(cell) for cell in table.get_row(next(k for k in table.rows if k.value == "markup"))]
            table.move_cursor(row=table.get_row_index("markup"))
            await pilot.pause(0.2)
            assert "[bold]x[/i]" in str(app.screen.query_one("#details", Static).render())
            assert app.is_running

    run(body())


def test_get_a_model_from_the_hub_stand_in(home: Path, hub, smollm2: Path) -> None:
    from textual.widgets import DataTable

    hub.add("test/two-quants-GGUF", {"m-Q4_1.gguf": smollm2, "m-Q8_0.gguf": smollm2})

    async def body() -> None:
        async with _at_library(home) as (app, pilot, _):
            source = await _get_a_model(pilot)
            source.value = "test/no-such-repo"
            await pilot.press("enter")
            await _wait(pilot, lambda: any("not found on the Hub" in n.message for n in app._notifications))
            source.value = "test/two-quants-GGUF"
            await pilot.press("enter")
            files = app.screen.query_one("#files", DataTable)
            await _wait(pilot, lambda: files.row_count == 2)
            assert [str(files.get_row_at(i)[0]) for i in range(2)] == ["Q4_1", "Q8_0"]
            files.focus()
            await pilot.press("enter")  # the first row: Q4_1
            await _wait(pilot, lambda: any("added two-quants-q4_1" in n.message for n in app._notifications))
            assert app.screen.query_one("#progress").percentage == 1.0
            await pilot.press("escape")
            table = app.screen.query_one(DataTable)
            await _wait(pilot, lambda: table.row_count == 2)
        assert (home / "models" / "two-quants-q4_1" / "manifest.json").exists()

    run(body())


def test_hub_names_and_conversation_titles_are_text_not_markup(home: Path, hub, smollm2: Path) -> None:
    """A Hub (or a mirror HF_ENDPOINT names) may list a repo whose name is broken Rich markup, and a
    conversation's title is its first question as typed: shown as text, the app running on."""
    from textual.widgets import DataTable, Input

    hub.add("evil/[b]x[/i]-GGUF", {"m-Q4_1.gguf": smollm2})
    _saved(home, "smollm2-135m-instruct", "why does [/bold] break things?", "It does not.")

    async def body() -> None:
        async with _at_library(home) as (app, pilot, _):
            await pilot.press("h")
            table = app.screen.query_one(DataTable)
            await _wait(pilot, lambda: table.row_count == 1)
            await pilot.pause(0.2)
            assert str(table.get_row_at(0)[3]) == "why does [/bold] break things?" and app.is_running
            await pilot.press("escape", "g")
            app.screen.query_one("#source", Input).value = "evil"
            await pilot.press("enter")
            files = app.screen.query_one("#files", DataTable)
            await _wait(pilot, lambda: files.row_count == 1)
            await pilot.pause(0.2)
            assert str(files.get_row_at(0)[0]) == "evil/[b]x[/i]-GGUF" and app.is_running
            await pilot.press("enter")  # lists it: the name is in the status line too
            status = app.screen.query_one("#status")
            await _wait(pilot, lambda: "evil/[b]x[/i]-GGUF" in str(status.render()))
            assert app.is_running

    run(body())


def test_downloads_picked_while_one_runs_wait_in_a_queue(home: Path, hub, smollm2: Path) -> None:
    """#20: a quantization picked while another downloads is queued, said so, and fetched once the
    first is in the store; the status line names what waits; browsing goes on meanwhile."""

    hub.add("test/queue-GGUF", {"m-Q4_1.gguf": smollm2, "m-Q8_0.gguf": smollm2})
    hub.pace["m-Q4_1.gguf"] = 0.03  # ~3 s for its 94 MiB

    async def body() -> None:
        async with _at_library(home) as (app, pilot, _):
            await _hub_files(pilot, "test/queue-GGUF", 2)
            await pilot.press("enter")  # Q4_1: the slow one
            await _wait(pilot, lambda: app.screen.busy)
            await pilot.press("down", "enter")  # Q8_0, while Q4_1 downloads
            notes = lambda: [n.message for n in app._notifications]  # noqa: E731
            assert "queued test/queue-GGUF:Q8_0 (1 waiting)" in notes()
            status = app.screen.query_one("#status")
            await _wait(pilot, lambda: "then test/queue-GGUF:Q8_0" in str(status.render()))
            await _wait(pilot, lambda: "added queue-q8_0" in notes(), timeout=120)
            added = [m for m in notes() if m.startswith("added ")]
            assert added == ["added queue-q4_1", "added queue-q8_0"] and not app.screen.queue
        assert {"queue-q4_1", "queue-q8_0"} <= {p.name for p in (home / "models").iterdir()}

    run(body())


def test_search_the_hub_then_see_which_quantizations_fit(home: Path, hub, smollm2: Path, smollm2_f16: Path,
                                                         monkeypatch) -> None:
    """#20: a word, not an exact repo id, searches the Hub; Enter on a hit lists its files, each
    with whether it fits this machine at the current settings, before anything is downloaded (one
    header read by range requests: the other file is planned from its size)."""
    from textual.widgets import DataTable

    hub.add("test/fits-GGUF", {"m-Q4_1.gguf": smollm2, "m-F16.gguf": smollm2_f16})
    hub.add("other/unrelated-GGUF", {"x-Q4_1.gguf": smollm2})
    monkeypatch.setenv("EDGELLM_RAM", "600M")  # 344 MiB to use: Q4_1 needs ~200 at the default context, F16 over 360

    async def body() -> None:
        async with _at_library(home) as (app, pilot, _):
            source = await _get_a_model(pilot)
            source.value = "nothing-matches-this"
            await pilot.press("enter")
            status = app.screen.query_one("#status")
            await _wait(pilot, lambda: "no GGUF repo on the Hub matches" in str(status.render()))
            source.value = "fits"
            await pilot.press("enter")
            files = app.screen.query_one("#files", DataTable)
            await _wait(pilot, lambda: files.row_count == 1 and str(files.get_row_at(0)[0]) == "test/fits-GGUF")
            assert [str(c.label) for c in files.columns.values()] == ["REPO", "DOWNLOADS", "LIKES"]
            await pilot.press("enter")
            await _wait(pilot, lambda: files.row_count == 2 and "…" not in [files.get_row_at(i)[2] for i in range(2)])
            assert [str(c.label) for c in files.columns.values()] == ["QUANT", "SIZE", "FITS", "DETAIL"]
            fits = {str(files.get_row_at(i)[0]): files.get_row_at(i)[2] for i in range(2)}
            assert fits["Q4_1"].startswith("yes ") and fits["F16"].startswith("no "), fits
        assert sorted(p.name for p in (home / "models").iterdir()) == ["smollm2-135m-instruct"]  # nothing pulled
        read = {r.split()[1] for r in hub.requests if "/resolve/" in r}
        assert len(read) == 1, read  # one file's header, the other planned from its size

    run(body())


def test_the_verdict_before_a_download_reads_no_header_twice(home: Path, hub, smollm2: Path) -> None:
    """The FITS column read the default pick's header; downloading that pick says whether it fits
    from the same header, not from a second remote read of it."""
    hub.add("test/once-GGUF", {"m-Q4_0.gguf": smollm2, "m-Q8_0.gguf": smollm2})

    async def body() -> None:
        async with _at_library(home) as (app, pilot, _):
            files = await _hub_files(pilot, "test/once-GGUF", 2)
            await _wait(pilot, lambda: "…" not in [files.get_row_at(i)[2] for i in range(2)])
            assert [p.rsplit("/", 1)[1] for p in hub.ranges] == ["m-Q4_0.gguf"]
            files.move_cursor(row=files.get_row_index("Q4_0"))
            await pilot.press("enter")
            await _wait(pilot, lambda: any("added once-q4_0" in n.message for n in app._notifications))
        assert [p.rsplit("/", 1)[1] for p in hub.ranges] == ["m-Q4_0.gguf"]

    run(body())


def test_a_download_that_will_not_fit_says_so_first(home: Path, hub, smollm2: Path, monkeypatch) -> None:
    """With less RAM than the model needs, the app warns, from the remote header alone, before the
    download lands (#20's bug 8): it still downloads, for a machine it may fit."""

    hub.add("test/big-GGUF", {"m-Q4_1.gguf": smollm2})
    monkeypatch.setenv("EDGELLM_RAM", "300M")

    async def body() -> None:
        async with _at_library(home) as (app, pilot, _):
            await _hub_files(pilot, "test/big-GGUF", 1)
            await pilot.press("enter")
            await _wait(pilot, lambda: any("added big-q4_1" in n.message for n in app._notifications))
            messages = [n.message for n in app._notifications]
            warned = next(i for i, m in enumerate(messages) if m.startswith("this will not fit this machine"))
            assert "RAM" in messages[warned] and warned < messages.index("added big-q4_1")

    run(body())


def test_convert_a_folder_with_a_lora_then_quantize_from_the_library(
    home: Path, smollm2_hf: Path, smollm2_adapter: Path
) -> None:
    from textual.widgets import DataTable, Input

    from edgellm.tui.screens.quantize import QuantizeScreen

    async def body() -> None:
        async with _at_library(home) as (app, pilot, table):
            # the bundled Q4_1 cannot be quantized again: said in the app, which carries on
            await pilot.press("k")
            assert isinstance(app.screen, QuantizeScreen)
            warning = app.screen.query_one("#requantize")
            assert warning.display and "already quantized (Q4_1)" in str(warning.render())  # said before a pick
            await pilot.press("enter")  # Q4_K_M, the default row
            await _wait(pilot, lambda: any("already quantized" in n.message for n in app._notifications))
            refused = next(n.message for n in app._notifications if "already quantized" in n.message)
            assert refused.endswith("(start from an F16 or BF16 model)") and "--" not in refused
            await pilot.press("escape")
            (await _get_a_model(pilot)).value = str(smollm2_hf)
            app.screen.query_one("#lora", Input).value = str(smollm2_adapter)
            await pilot.press("enter")
            files = app.screen.query_one("#files", DataTable)
            await _wait(pilot, lambda: files.row_count == 7)
            assert files.get_row_at(0)[0] == "AS IS" and files.get_row_at(4)[0] == "Q4_K_M"
            assert "safetensors checkpoint (~135M parameters)" in str(app.screen.query_one("#status").render())
            shown = files.get_row_at(0)[1]  # the checkpoint is F32: its F16 conversion is half its bytes
            files.move_cursor(row=0)
            files.focus()
            await pilot.press("enter")
            name = f"{smollm2_hf.name}-cats-adapter-f16"
            await _wait(pilot, lambda: any(f"added {name}" in n.message for n in app._notifications), timeout=120)
            made = json.loads((home / "models" / name / "manifest.json").read_text())["size"]
            assert shown.startswith("~") and abs(float(shown[1:].split()[0]) * 2**20 / made - 1) < 0.02, shown
            await pilot.press("escape")
            table = app.screen.query_one(DataTable)
            await _wait(pilot, lambda: table.row_count == 2)
            table.move_cursor(row=list(table.rows).index(name))
            await pilot.press("k")
            types = app.screen.query_one("#types", DataTable)
            types.move_cursor(row=list(types.rows).index("Q8_0"))
            await pilot.press("enter")
            await _wait(pilot, lambda: table.row_count == 3, timeout=120)
        quantized = home / "models" / f"{smollm2_hf.name}-cats-adapter-q8_0" / "manifest.json"
        assert '"quantization": "Q8_0"' in quantized.read_text()

    run(body())


def test_quantize_with_an_importance_matrix_shows_the_sweeps_figures_and_asks_for_a_free_name(
        home: Path, cli, smollm2_f16: Path, english: Path) -> None:
    from textual.widgets import Checkbox, DataTable, Input, Label

    from edgellm.gguf.header import human_bytes
    from edgellm.tui.screens.quantize import QuantizeScreen

    assert cli("import", str(smollm2_f16), "--name", "smol-f16").returncode == 0
    swept = cli("quantize", "smol-f16", "--sweep", "Q8_0", "--text", str(english), "--ctx", "128", "--chunks", "2",
                "--json")
    assert swept.returncode == 0, swept.stderr
    q8_ppl = next(row["perplexity"] for row in json.loads(swept.stdout) if row["type"] == "Q8_0")

    async def body() -> None:
        app = _app(home)
        async with app.run_test(size=(80, 24)) as pilot:
            table = pilot.app.screen.query_one(DataTable)
            await _wait(pilot, lambda: "smol-f16" in [str(key.value) for key in table.rows])
            table.move_cursor(row=list(table.rows).index("smol-f16"))
            await pilot.press("k")
            assert isinstance(app.screen, QuantizeScreen)
            types = app.screen.query_one("#types", DataTable)
            listed = [str(key.value) for key in types.rows]
            assert "Q8_0" in listed and "IQ2_XS" not in listed  # IQ types need the imatrix
            assert types.get_row("Q8_0")[3] == f"{q8_ppl:.2f}"  # the sweep measured it
            assert types.get_row("Q4_K_M")[3] == "-"
            assert not app.screen.query_one("#requantize", Label).display  # F16: nothing to warn of
            # Q8_0 is already in the library (the sweep made it): asked for another name, not failed at 100%
            types.move_cursor(row=listed.index("Q8_0"))
            await pilot.pause()
            assert app.screen.query_one("#name", Input).placeholder == "smol-q8_0"
            await _wait(pilot, lambda: app.screen.measured)  # sizes from llama.cpp's dry run, not bits x params
            made = json.loads((home / "models" / "smol-q8_0" / "manifest.json").read_text())["size"]
            assert types.get_row("Q8_0")[2] == human_bytes(made)
            await pilot.press("enter")
            assert "smol-q8_0 is already in the library" in str(app.screen.query_one("#quant-status").render())
            assert app.screen.focused is app.screen.query_one("#name", Input)
            # with the importance matrix: the IQ types appear, and the name says how it was made
            app.screen.query_one("#imatrix", Checkbox).value = True
            await pilot.pause()
            listed = [str(key.value) for key in types.rows]
            assert "IQ2_XS" in listed and "IQ3_XXS" in listed
            types.move_cursor(row=listed.index("IQ3_XXS"))
            await pilot.pause()
            assert app.screen.query_one("#name", Input).placeholder == "smol-iq3_xxs-imat"
            types.focus()
            await pilot.press("enter")
            await _wait(pilot, lambda: any("quantized smol-iq3_xxs-imat" in n.message for n in app._notifications),
                        timeout=180)
        assert len(list((home / "models" / ".imatrix").iterdir())) == 1
        assert '"quantization": "IQ3_XXS"' in (home / "models" / "smol-iq3_xxs-imat" / "manifest.json").read_text()

    run(body())


def test_reopen_a_saved_conversation(home: Path) -> None:
    from textual.widgets import DataTable, Markdown, Static

    from edgellm.tui.screens.chat import ChatScreen

    saved, cid = _saved(home, "smollm2-135m-instruct", "Remember the word banana.", "I will remember **banana**.")

    async def body() -> None:
        async with _at_library(home) as (app, pilot, _):
            await pilot.press("h")
            rows = app.screen.query_one("#conversations", DataTable)
            assert rows.row_count == 1 and [str(c) for c in rows.get_row_at(0)[1:]] == ["smollm2-135m-instruct", "2", "Remember the word banana."]
            history = app.screen
            await pilot.press("enter")
            assert isinstance(app.screen, ChatScreen)
            assert app.screen.conversations is history.conversations is app.conversations  # one database
            assert [m.role for m in app.screen.history] == ["user", "assistant"]
            assert str(app.screen.query(Static).filter(".user").first().render()) == "Remember the word banana."
            assert "banana" in app.screen.query(Markdown).last()._markdown
            prompt = app.screen.query_one("#prompt")
            await _wait(pilot, lambda: not prompt.disabled)
            app.settings = Settings.resolve({"temperature": 0, "max_tokens": 24})
            prompt.value = "What word did I ask you to remember?"
            await pilot.press("enter")
            await _wait(pilot, lambda: not app.screen.generating)
            assert len(app.screen.history) == 4
            await pilot.press("ctrl+b")  # back to the conversations, which show the two new messages
            rows = app.screen.query_one("#conversations", DataTable)
            assert rows.get_row_at(0)[1:3] == ["smollm2-135m-instruct", "4"]
        assert len(saved.load(cid)) == 4  # the same conversation goes on
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):  # the app closed it as it ended
            app.conversations.db.execute("SELECT 1")

    run(body())


def test_a_conversation_whose_model_was_deleted_can_still_be_read(home: Path) -> None:
    from textual.widgets import DataTable, Static

    from edgellm.tui.screens.chat import ChatScreen

    _saved(home, "gone-model", "What is 2 + 2?", "It is **4**.")

    async def body() -> None:
        async with _at_library(home, (80, 24)) as (app, pilot, _):
            await pilot.press("h")
            rows = app.screen.query_one("#conversations", DataTable)
            assert rows.get_row_at(0)[1] == "gone-model (deleted)"
            await pilot.press("enter")
            assert isinstance(app.screen, ChatScreen)
            assert str(app.screen.query(Static).filter(".user").first().render()) == "What is 2 + 2?"
            assert "no longer in the library" in str(app.screen.query_one("#status", Static).render())
            prompt = app.screen.query_one("#prompt", PromptArea)
            await pilot.pause(0.3)
            assert prompt.disabled and "read only" in prompt.placeholder
            assert not app._notifications  # nothing failed: nothing was loaded

    run(body())


def test_convert_a_safetensors_repo_from_the_hub_stand_in(home: Path, hub, smollm2_hf: Path) -> None:

    hub.add("test/SmolLM2-Progress", {p.name: p for p in smollm2_hf.iterdir()})

    async def body() -> None:
        async with _at_library(home) as (app, pilot, _):
            await _hub_files(pilot, "test/SmolLM2-Progress", 7)
            assert "safetensors checkpoint (~" in str(app.screen.query_one("#status").render())
            said, show = [], app.screen._status  # every status line the screen shows along the way
            app.screen._status = lambda text: (said.append(text), show(text))
            await pilot.press("enter")  # the highlighted row: Q4_K_M
            await _wait(pilot, lambda: any("added smollm2-progress-q4_k_m" in n.message for n in app._notifications),
                        timeout=120)
        assert (home / "models" / "smollm2-progress-q4_k_m" / "manifest.json").exists()
        # each stage by name, with its own amount: downloads in bytes, then tensors converted and quantized
        assert any(line.startswith("download test/SmolLM2-Progress: ") and " of 5" in line for line in said), said[:5]
        assert any(line.startswith("convert: ") and " MiB of " in line for line in said)
        assert any(line.startswith("quantize Q4_K_M: ") and " of 272 tensors · blk." in line for line in said)
        assert (home / "checkpoints" / "smollm2-progress").is_symlink()

    run(body())


def test_every_key_is_reachable_at_80x24_through_help_and_the_palette(home: Path) -> None:
    from textual.command import CommandPalette
    from textual.widgets import DataTable

    from edgellm.tui.screens.get_model import GetModelScreen
    from edgellm.tui.screens.help import HelpScreen
    from edgellm.tui.screens.library import LibraryScreen

    async def body() -> None:
        async with _at_library(home, (80, 24)) as (app, pilot, _):
            library = app.screen
            for key in ("question_mark", "f1"):
                await pilot.press(key)
                assert isinstance(app.screen, HelpScreen)
                keys = app.screen.query_one(DataTable)
                rows = {keys.get_row_at(i)[1]: keys.get_row_at(i)[0] for i in range(keys.row_count)}
                # the keys the footer has no room for are here, with the rest
                assert rows["Conversations"] == "h" and rows["Import a .gguf"] == "i" and rows["Refresh"] == "r"
                assert rows["Delete"] == "d" and rows["Quit"] == "q"
                await pilot.press("escape")
                assert app.screen is library
            await pilot.press("ctrl+p")
            assert isinstance(app.screen, CommandPalette)
            await pilot.press(*"get a model")
            await pilot.pause(0.5)
            await pilot.press("enter")
            await _wait(pilot, lambda: isinstance(app.screen, GetModelScreen))
            await pilot.press("escape")
            assert isinstance(app.screen, LibraryScreen)

    run(body())


def test_conversations_can_be_searched_renamed_exported_and_deleted(home: Path) -> None:
    from textual.widgets import DataTable, Input

    from edgellm.tui.screens.dialogs import AskScreen

    saved, fruit = _saved(home, "smollm2-135m-instruct", "Remember the word banana.", "I will remember **banana**.")
    _, other = _saved(home, "smollm2-135m-instruct", "What is 2 + 2?", "4")

    async def body() -> None:
        async with _at_library(home, (80, 24)) as (app, pilot, _):
            await pilot.press("h")
            rows = app.screen.query_one("#conversations", DataTable)
            assert rows.row_count == 2
            await pilot.press("slash", *"BANANA", "enter")  # any message, any case
            assert app.screen.query_one("#search", Input).value == "BANANA"
            await _wait(pilot, lambda: rows.row_count == 1)
            assert str(rows.get_row_at(0)[3]) == "Remember the word banana."
            await pilot.press("r")
            assert isinstance(app.screen, AskScreen)
            answer = app.screen.query_one("#answer", Input)
            assert answer.value == "Remember the word banana."  # the current title, to edit
            answer.value = "Fruit talk"
            await pilot.press("enter")
            await _wait(pilot, lambda: str(rows.get_row_at(0)[3]) == "Fruit talk")
            await pilot.press("e", "j")
            exports = home / "exports"
            await _wait(pilot, lambda: (exports / f"conversation-{fruit}.json").exists())
            markdown = (exports / f"conversation-{fruit}.md").read_text()
            assert markdown.startswith("# Fruit talk\n") and "## Assistant\n\nI will remember **banana**." in markdown
            data = json.loads((exports / f"conversation-{fruit}.json").read_text())
            assert data["title"] == "Fruit talk" and [m["role"] for m in data["messages"]] == ["user", "assistant"]
            await pilot.press("d", "n")  # No is the answer unless y
            assert rows.row_count == 1
            await pilot.press("d", "y")
            await _wait(pilot, lambda: rows.row_count == 0)
            app.screen.query_one("#search", Input).value = ""
            await _wait(pilot, lambda: rows.row_count == 1)  # the other one is still there
        assert [cid for cid, *_ in saved.recent()] == [other]

    run(body())


def test_a_model_without_a_chat_template_is_said_so(home: Path, gemma3: Path) -> None:
    from textual.widgets import DataTable, Static

    from edgellm.models import store_for

    store_for(Settings.resolve()).import_gguf(gemma3, "gemma3-base", link=True)

    async def body() -> None:
        app = _app(home)
        async with app.run_test(size=(80, 24)) as pilot:
            table = app.screen.query_one(DataTable)
            await _wait(pilot, lambda: "gemma3-base" in [str(k.value) for k in table.rows])
            table.move_cursor(row=table.get_row_index("gemma3-base"))
            await pilot.press("enter")
            prompt = app.screen.query_one("#prompt", PromptArea)
            await _wait(pilot, lambda: not prompt.disabled, timeout=120)
            assert str(app.screen.query_one("#status", Static).render()).endswith("template: fallback")
            assert any("gemma3-base has no chat template" in n.message and n.severity == "warning"
                       for n in app._notifications)

    run(body())


def test_a_models_preset_is_kept_across_restarts_and_is_its_own(home: Path, smollm2: Path) -> None:
    from textual.widgets import Button, DataTable, Input, Static

    from edgellm.models import store_for
    from edgellm.presets import load_presets
    from edgellm.tui.screens.chat import ChatScreen
    from edgellm.tui.screens.settings import SettingsScreen

    store = store_for(Settings.resolve())
    for name in ("smollm2-135m-instruct", "other-copy"):
        store.import_gguf(smollm2, name, link=True)

    async def body() -> None:
        app = _app(home)
        async with app.run_test(size=(80, 24)) as pilot:
            table = app.screen.query_one(DataTable)
            await _wait(pilot, lambda: table.row_count == 2)
            table.move_cursor(row=table.get_row_index("smollm2-135m-instruct"))
            await pilot.press("s")
            assert isinstance(app.screen, SettingsScreen)
            for field, value in (("ctx", "2048"), ("system", "Answer in one word."), ("temperature", "0"),
                                 ("max_tokens", "8")):
                app.screen.query_one(f"#{field}", Input).value = value
            await pilot.pause()
            app.screen.query_one("#apply", Button).press()
            await _wait(pilot, lambda: not isinstance(app.screen, SettingsScreen))
        assert load_presets(home) == {"smollm2-135m-instruct": {"ctx": 2048, "system": "Answer in one word.",
                                                                 "temperature": 0, "max_tokens": 8}}

        app = _app(home)  # a restart: the preset is read back, for that model only
        async with app.run_test(size=(80, 24)) as pilot:
            table = app.screen.query_one(DataTable)
            await _wait(pilot, lambda: table.row_count == 2)
            table.move_cursor(row=table.get_row_index("other-copy"))
            await pilot.press("s")
            assert app.screen.query_one("#ctx", Input).value == ""  # the other model keeps the defaults
            await pilot.press("escape")
            table.move_cursor(row=table.get_row_index("smollm2-135m-instruct"))
            await pilot.press("s")
            assert app.screen.query_one("#system", Input).value == "Answer in one word."
            await pilot.press("escape")
            await pilot.press("enter")
            assert isinstance(app.screen, ChatScreen)
            prompt = app.screen.query_one("#prompt", PromptArea)
            await _wait(pilot, lambda: not prompt.disabled)
            assert "ctx 2048" in str(app.screen.query_one("#status", Static).render())
            prompt.value = "What is the capital of France?"
            await pilot.press("enter")
            await _wait(pilot, lambda: not app.screen.generating)
            stats = str(app.screen.query(".stats").last().render())
            assert int(stats.split()[0]) <= 8  # the preset's length limit

    run(body())


def test_a_broken_presets_file_is_said_so_not_crashed_on(home: Path) -> None:

    home.mkdir(parents=True, exist_ok=True)
    (home / "presets.toml").write_text('["smollm2-135m-instruct"]\nctx = "lots"\n')

    async def body() -> None:
        async with _at_library(home, (80, 24)) as (app, pilot, table):
            await _wait(pilot, lambda: str(table.get_row_at(0)[1]) == "?")  # no verdict, no crash
            await pilot.press("enter")
            prompt = app.screen.query_one("#prompt", PromptArea)
            await _wait(pilot, lambda: "could not be loaded" in prompt.placeholder)
            assert any("presets.toml [smollm2-135m-instruct]: invalid value 'lots' for ctx" in n.message
                       for n in app._notifications)

    run(body())


def test_code_blocks_of_the_last_answer_are_copied_one_at_a_time(home: Path) -> None:
    answer = ("Two ways:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\nor in a shell:\n\n"
              "```sh\necho $((1 + 2))\n```\n")
    _saved(home, "smollm2-135m-instruct", "How do I add two numbers?", answer)

    async def body() -> None:
        async with _at_library(home, (80, 24)) as (app, pilot, _):
            await pilot.press("h", "enter")
            await pilot.press("ctrl+o")  # the last block first
            assert app.clipboard == "echo $((1 + 2))\n"
            assert app._notifications and "code block 2 of 2 copied (1 lines)" in list(app._notifications)[-1].message
            await pilot.press("ctrl+o")  # then the one before it
            assert app.clipboard == "def add(a, b):\n    return a + b\n"
            await pilot.press("ctrl+o")  # and round again
            assert app.clipboard == "echo $((1 + 2))\n"

    run(body())
