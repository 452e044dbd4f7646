"""The Sample pane by keyboard: the focus after picking a source, and each run's own replies."""

from __future__ import annotations

from pathlib import Path

import fake_engine
from pilot_helpers import noted, screen_text, wait_for
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Select

from tui.app import QlcApp
from tui.widgets.runs_pane import RunsPane
from tui.widgets.sample_pane import SamplePane

RUN_A = "20260103-100000-tiny-demo"  # checkpoints 6 and 12, and the final adapter
RUN_B = "20260104-100000-tiny-demo"  # checkpoints 4 and 8, and the final adapter


def make_runs(runs_root: Path) -> None:
    fake_engine.make_run_dir(
        runs_root, RUN_A, list(fake_engine.synthetic_run(12, save_every=6, run_id=RUN_A))
    )
    fake_engine.make_run_dir(runs_root, RUN_B, list(fake_engine.synthetic_run(8, save_every=4, run_id=RUN_B)))


async def opened(pilot: Pilot, run_id: str) -> None:
    app = pilot.app
    assert isinstance(app, QlcApp)
    await wait_for(
        pilot,
        lambda: app.history is not None and app.history.run_id == run_id and app.history.finished is not None,
        what=f"run {run_id} to be read",
    )
    await pilot.pause()


async def open_source_list(pilot: Pilot) -> Select:
    """The keys a person types: the pane, Tab to the source (the tab bar takes no focus), Enter
    opens it."""
    app = pilot.app
    select = app.screen.query_one("#sample-source", Select)
    await pilot.press("5", "tab")
    assert app.focused is select
    await pilot.press("enter")
    await wait_for(pilot, lambda: select.expanded, what="the source list to open")
    return select


async def pick_second_checkpoint(pilot: Pilot) -> None:
    """The source list opened, the second entry down picked."""
    app = pilot.app
    select = await open_source_list(pilot)
    await pilot.press("down", "down", "enter")
    await wait_for(pilot, lambda: not select.expanded and app.focused is select, what="the pick")


async def test_i_after_picking_a_source_types_a_prompt_and_escape_gives_the_keys_back(
    app_factory, runs_root: Path
) -> None:
    make_runs(runs_root)
    app = app_factory(attach=RUN_A)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, RUN_A)
        await pick_second_checkpoint(pilot)
        select = app.screen.query_one("#sample-source", Select)
        assert select.value == "checkpoint-6"  # adapter, checkpoint-12, checkpoint-6
        # On the closed picker `i` is the pane's key (the footer offers it); Enter opens the list.
        assert "i Type a prompt" in screen_text(app)
        await pilot.press("i", *"Why 5?")
        prompt = app.screen.query_one("#prompt", Input)
        assert app.focused is prompt and prompt.value == "Why 5?"  # `?` and `5` typed, not keys
        assert app.screen.query_one("#sample-source", Select).value == "checkpoint-6"
        await pilot.press("escape")
        assert app.focused is app.screen.query_one("#replies")
        assert prompt.value == "Why 5?"
        # The pane's keys are keys again: `3` shows the Dashboard.
        await pilot.press("3")
        assert app.screen.query_one("TabbedContent").active == "dashboard"


async def test_enter_on_the_picker_opens_it_and_a_letter_in_the_open_list_stays_there(
    app_factory, runs_root: Path
) -> None:
    make_runs(runs_root)
    app = app_factory(attach=RUN_A)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, RUN_A)
        select = await open_source_list(pilot)
        await pilot.press("i")  # the open list's own (it searches its entries), not the prompt's
        await pilot.pause()
        assert app.focused is not app.screen.query_one("#prompt", Input)
        await pilot.press("escape")  # closes the list, back on the picker
        await wait_for(pilot, lambda: not select.expanded and app.focused is select, what="the list to close")


async def sample(pilot: Pilot, prompt: str) -> None:
    await pilot.press("i", *prompt, "enter", "escape")  # the prompt keeps the focus until Escape
    await pilot.pause()


async def open_from_runs_pane(pilot: Pilot, run_id: str) -> None:
    app = pilot.app
    await pilot.press("4")
    pane = app.screen.query_one(RunsPane)
    await wait_for(pilot, lambda: len(pane.summaries) == 2, what="the runs list")
    # The row by its run (the cursor stays where it was when the list is read again).
    table = app.screen.query_one("#runs-table", DataTable)
    table.move_cursor(row=[s.id for s in pane.summaries].index(run_id))
    await pilot.press("enter")
    await opened(pilot, run_id)


async def test_the_pane_shows_the_replies_of_the_run_it_samples(app_factory, runs_root: Path) -> None:
    make_runs(runs_root)
    app = app_factory(attach=RUN_A)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, RUN_A)
        await pick_second_checkpoint(pilot)
        await sample(pilot, "From A")
        # Switch while A's reply may still be loading or streaming: it keeps going to A.
        await open_from_runs_pane(pilot, RUN_B)
        await wait_for(pilot, lambda: app.samples and app.samples[-1].done, what="A's reply")
        await pilot.press("5")
        await pilot.pause()
        text = screen_text(app)
        assert f"from adapter ({RUN_B})" in text
        assert "From A" not in text and "checkpoint-6" not in text
        assert "Replies appear here" in text
        await sample(pilot, "From B")
        await wait_for(pilot, lambda: len(app.samples) == 2 and app.samples[-1].done, what="B's reply")
        text = screen_text(app)
        assert "› From B   [adapter]" in text and "From A" not in text
        # Back to A: its reply, finished while B was shown, and not B's.
        await open_from_runs_pane(pilot, RUN_A)
        await pilot.press("5")
        await pilot.pause()
        text = screen_text(app)
        assert "› From A   [checkpoint-6]" in text and "From B" not in text
        assert fake_engine.REPLY in text and "stopped by eos" in text
        pane = app.screen.query_one(SamplePane)
        assert [s.prompt for s in pane.shown] == ["From A"]


async def test_a_prompt_with_no_run_open_is_kept_and_told_why(app_factory) -> None:
    """With no run open, Enter cleared the prompt and said nothing (the blank source compared
    against Select.BLANK, which is no sentinel in Textual 8)."""
    app = app_factory()
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        await pilot.press("5", "i", *"hello", "enter")
        await wait_for(pilot, lambda: noted(app, "no model to sample from"))
        assert app.screen.query_one("#prompt", Input).value == "hello"


async def test_a_picked_checkpoint_that_is_rotated_out_is_said(app_factory) -> None:
    """The picked checkpoint left the list (a newer save rotated it out) and the picker went
    back to the live model without a word: the next Enter sampled another model."""
    app = app_factory()
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        pane = app.screen.query_one(SamplePane)
        pane.set_sources("r1", True, ["checkpoint-40", "checkpoint-80"])
        app.screen.query_one("#sample-source", Select).value = "checkpoint-40"
        await pilot.pause(0.2)
        pane.set_sources("r1", True, ["checkpoint-80", "checkpoint-120"])
        await pilot.pause(0.2)
        assert noted(app, "checkpoint-40 is gone")
