"""The app's Fine-tune screen: the data read with its counts, the memory verdict following the
settings, a run with its live loss curve, and the adapter exported into the library."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from edgellm.config import Settings
from tests.test_finetune import FACTS
from tests.test_tui import _library, _wait, run

SIZE = (110, 30)


@pytest.fixture()
def app(home: Path, tmp_path: Path, smollm2_hf: Path, monkeypatch: pytest.MonkeyPatch):
    # the verdicts must not depend on the machine that draws them; paths are short and fixed
    monkeypatch.setenv("EDGELLM_RAM", "8GiB")
    monkeypatch.setenv("EDGELLM_GPU_MEMORY", "0")
    monkeypatch.setenv("TZ", "UTC")
    # the dtype a run picks follows the CPU (bf16 where it has bf16 units): drawn as on such a CPU
    monkeypatch.setattr("edgellm.train.model.cpu_has_bf16", lambda: True)
    time.tzset()
    (home / "checkpoints").mkdir(parents=True)
    (home / "checkpoints" / "smollm2-hf").symlink_to(smollm2_hf)
    shutil.copy(FACTS, tmp_path / "facts.jsonl")
    monkeypatch.chdir(tmp_path)
    from edgellm.tui import make_app

    return make_app(Settings.resolve())


async def _open(pilot):
    from edgellm.tui.screens.finetune import FinetuneScreen

    await _library(pilot)
    await pilot.press("f")
    await _wait(pilot, lambda: isinstance(pilot.app.screen, FinetuneScreen))
    return pilot.app.screen


async def _read_data(pilot, name: str = "facts.jsonl"):
    from textual.widgets import Input, Label

    screen = await _open(pilot)
    screen.query_one("#ft-max-len", Input).value = "128"
    data = screen.query_one("#ft-data", Input)
    data.value = name
    data.focus()
    await pilot.press("enter")
    status = screen.query_one("#ft-status", Label)
    await _wait(pilot, lambda: "ready" in str(status.render()) or pilot.app._notifications)
    return screen


@pytest.mark.parametrize("size", [(80, 24), SIZE], ids=["80x24", "110x30"])
def test_finetune_screen_snapshot(snap_compare, app, size) -> None:
    async def ready(pilot) -> None:
        screen = await _read_data(pilot)
        assert not pilot.app._notifications
        screen.set_focus(None)  # no blinking cursor, no selected text: the same picture every time
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=ready)


def test_the_verdict_follows_the_settings_and_bad_data_is_a_notification(app) -> None:
    run(_verdict_follows(app))


async def _verdict_follows(app) -> None:
    from textual.widgets import Checkbox, Input, Label

    async with app.run_test(size=SIZE) as pilot:
        screen = await _read_data(pilot)
        info = str(screen.query_one("#ft-data-info", Label).render())
        assert "facts.jsonl: 36 examples (messages)" in info and "trained" in info and "masked" in info
        verdict = screen.query_one("#ft-verdict", Label)
        assert "of 8.0 GiB free RAM, fits (lora, bf16, rank 16" in str(verdict.render())
        screen.query_one("#ft-batch", Input).value = "64"
        screen.query_one("#ft-max-len", Input).value = "4096"
        await pilot.pause()
        assert "does NOT fit" in str(verdict.render())
        screen.query_one("#ft-qlora", Checkbox).value = True
        await pilot.pause()
        assert "(qlora, bf16, rank 16, batch 64 x 4096" in str(verdict.render())
        screen.query_one("#ft-batch", Input).value = "4"
        screen.query_one("#ft-max-len", Input).value = "128"
        data = screen.query_one("#ft-data", Input)
        data.value = "missing.jsonl"
        data.focus()
        await pilot.press("enter")
        await _wait(
            pilot, lambda: any("cannot read data file missing.jsonl" in n.message for n in app._notifications)
        )
        assert app.is_running and app.screen is screen


@pytest.mark.slow
def test_train_with_a_live_curve_then_export_to_the_library(app, home: Path) -> None:
    run(_train_and_export(app, home))


async def _train_and_export(app, home: Path) -> None:
    from textual.widgets import Input, Label, Static

    async with app.run_test(size=SIZE) as pilot:
        screen = await _read_data(pilot)
        screen.query_one("#ft-batch", Input).value = "8"
        screen.query_one("#ft-export", Input).value = "Q8_0"
        await pilot.press("ctrl+t")
        curve = screen.query_one("#ft-curve", Static)
        await _wait(pilot, lambda: "┤" in str(curve.render()), timeout=240)  # drawn while training
        status = screen.query_one("#ft-status", Label)
        await _wait(pilot, lambda: "done: loss" in str(status.render()), timeout=300)
        assert (home / "runs" / "smollm2-hf-facts" / "adapter" / "adapter_config.json").is_file()
        await pilot.press("ctrl+l")
        await _wait(
            pilot,
            lambda: (
                "exported" in str(status.render()) or any(n.severity == "error" for n in app._notifications)
            ),
            timeout=300,
        )
        assert "exported smollm2-hf-facts-q8_0 to the library" in str(status.render()), str(status.render())
        assert app.store.exists("smollm2-hf-facts-q8_0")
