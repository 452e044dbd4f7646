"""SVG snapshots of every pane at 80x24 (the smallest SSH window) and 120x40.

A layout change shows up here as a diff to look at; after checking one on purpose, refresh with
`pytest tests/tui/test_snapshots.py --snapshot-update`. The states are deterministic: recorded run
histories, no GPU, fixed run ids, no clock on screen."""

from __future__ import annotations

import pytest
from pilot_helpers import FINISHED_RUN, select_preset, wait_for
from textual.widgets import TabbedContent

from tui.widgets.gpu import GpuPanel
from tui.widgets.runs_pane import RunsPane

SIZES = [(80, 24), (120, 40)]


async def _settled(pilot) -> None:
    """Wait for the background work that would otherwise race the snapshot: the GPU probe, and
    the first preset's budget and data check (the Presets pane is behind every dialog)."""
    await pilot.pause()
    main = pilot.app.screen_stack[0]
    gpu = main.query_one(GpuPanel)
    await wait_for(pilot, lambda: gpu._error is not None, what="the GPU probe")

    def summary() -> str:
        return str(main.query_one("#preset-summary").render())

    await wait_for(
        pilot,
        lambda: "memory " in summary() and "data: " in summary() and "checking" not in summary(),
        what="the preset's budget and data check",
    )
    if main.query_one(TabbedContent).active == "presets":  # behind a dialog: laid out too
        box = main.query_one("#preset-summary")
        lines = len(box.render().plain.splitlines())  # type: ignore[union-attr]
        await wait_for(pilot, lambda: box.size.height >= min(lines, 4), what="the layout")
    await pilot.pause(0.2)


async def _behind_a_dialog(pilot) -> None:
    """A dialog's background is the empty Dashboard: the Presets pane's summary scrolls as its
    checks land, so behind a dialog its scroll position raced the shot on a loaded machine."""
    await _settled(pilot)
    pilot.app.animation_level = "none"  # the tab underline would slide while the shot is taken
    await pilot.press("3")
    await pilot.pause(0.2)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_presets_pane(snap_compare, app_factory, size) -> None:
    async def before(pilot) -> None:
        await pilot.pause()
        await select_preset(pilot, "tiny-demo")
        await pilot.press("enter", "down", "down", "down")  # into the settings, on a commented key
        await wait_for(
            pilot, lambda: "examples" in str(pilot.app.screen.query_one("#preset-summary").render())
        )
        await _settled(pilot)

    assert snap_compare(app_factory(), terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_memory_pane_does_not_fit(snap_compare, app_factory, size) -> None:
    async def before(pilot) -> None:
        await pilot.pause()
        await select_preset(pilot, "llama-3.1-8b-rtx4060")
        await pilot.press("2")
        await _settled(pilot)

    assert snap_compare(app_factory(), terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dashboard_of_a_recorded_run(snap_compare, app_factory, finished_run, size) -> None:
    async def before(pilot) -> None:
        app = pilot.app
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        await wait_for(pilot, lambda: app.client.ended)
        await _settled(pilot)

    assert snap_compare(app_factory(attach=FINISHED_RUN), terminal_size=size, run_before=before)


def test_dashboard_of_a_run_that_failed_at_load(snap_compare, app_factory, runs_root) -> None:
    """Why it failed where the bar would be, and the charts saying it never trained."""
    import fake_engine
    from test_panes import FAILED_AT_LOAD_RUN, failed_at_load

    fake_engine.make_run_dir(runs_root, FAILED_AT_LOAD_RUN, failed_at_load())

    async def before(pilot) -> None:
        app = pilot.app
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        await wait_for(pilot, lambda: app.client.ended)
        await _settled(pilot)

    assert snap_compare(app_factory(attach=FAILED_AT_LOAD_RUN), terminal_size=(80, 24), run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_runs_pane_comparing(snap_compare, app_factory, finished_run, crashed_run, size) -> None:
    async def before(pilot) -> None:
        await pilot.pause()
        await pilot.press("4")
        pane = pilot.app.screen.query_one(RunsPane)
        await wait_for(pilot, lambda: len(pane.summaries) == 2)
        await pilot.press("space", "down", "space", "c")
        await wait_for(pilot, lambda: len(pilot.app.screen.query_one("#compare-chart").series) == 2)
        await _settled(pilot)

    assert snap_compare(app_factory(), terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sample_pane_with_a_reply(snap_compare, app_factory, finished_run, size) -> None:
    async def before(pilot) -> None:
        app = pilot.app
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        await pilot.press("5", "i")
        await pilot.press(*"What does QLoRA train?", "enter")
        await wait_for(pilot, lambda: app.samples and app.samples[-1].done)
        await pilot.press("escape")  # out of the prompt: a blinking cursor would make the shot racy
        await _settled(pilot)

    assert snap_compare(app_factory(attach=FINISHED_RUN), terminal_size=size, run_before=before)


def test_sample_pane_picker_open(snap_compare, app_factory, finished_run) -> None:
    """The open list of what to sample from has an edge: without one its options ran into the
    labels beside and under it ("max tadapter", "prompcheckpoint-80")."""

    async def before(pilot) -> None:
        app = pilot.app
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        await pilot.press("5")
        pilot.app.screen.query_one("#sample-source").focus()
        await pilot.press("enter")
        await _settled(pilot)

    assert snap_compare(app_factory(attach=FINISHED_RUN), terminal_size=(60, 18), run_before=before)


def test_stop_dialog(snap_compare, app_factory, finished_run) -> None:
    from tui.screens.stop import StopScreen

    async def before(pilot) -> None:
        await _behind_a_dialog(pilot)
        pilot.app.push_screen(StopScreen("20260101-120000-tiny-demo", 57, lambda: None))
        await pilot.pause(0.1)

    assert snap_compare(app_factory(), terminal_size=(80, 24), run_before=before)


def test_error_dialog(snap_compare, app_factory) -> None:
    import fake_engine

    async def before(pilot) -> None:
        await _behind_a_dialog(pilot)
        ev = fake_engine.OOM
        pilot.app.show_error("Engine error: out of memory (step 12)", ev.message, ev.hint, ev.advice)
        await pilot.pause(0.1)

    assert snap_compare(app_factory(), terminal_size=(80, 24), run_before=before)
