"""Start, follow, stop, save, sample, detach and quit, driven by the fake engine process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fake_engine
from pilot_helpers import (
    no_gpu,
    noted,
    notes,
    record_notes,
    record_starts,
    screen_text,
    select_preset,
    wait_for,
)

from engine.run import runs
from tui.app import make_app
from tui.screens.confirm import ConfirmScreen
from tui.screens.error import ErrorScreen
from tui.screens.quit import QuitScreen
from tui.screens.stop import StopScreen


async def _start_tiny(pilot, app) -> None:
    await select_preset(pilot, "tiny-demo")
    await pilot.press("s")
    await wait_for(pilot, lambda: app.client is not None, what="the run to launch")


async def test_start_follow_and_complete(app_factory, runs_root: Path) -> None:
    app = app_factory(steps=40, rate=400)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        await _start_tiny(pilot, app)
        await wait_for(pilot, lambda: app.history.finished is not None, what="the run to finish")
        assert app.history.status == "completed"
        assert app.history.step == 40
        assert len(app.history.loss) == 20  # logging_steps 2
        await wait_for(pilot, lambda: app.client.ended)
        text = screen_text(app)
        assert "completed" in text and "40/40" in text
        run_dir = runs.list_run_dirs(runs_root)[0]
        assert (run_dir / runs.EVENTS).is_file()


async def test_the_checking_note_goes_once_checked(app_factory) -> None:
    """The "checking data" toast is withdrawn when the check ends: left to time out, it covered
    the dashboard's log at 60x18 while the run started."""
    app = app_factory(steps=400, rate=20)
    shown = record_notes(app)
    async with app.run_test(size=(60, 18)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        await _start_tiny(pilot, app)
        await wait_for(pilot, lambda: app.history.step >= 1, what="a step")
        assert any(n.startswith("checking data for tiny-demo") for n in shown)
        assert not any(n.startswith("checking data") for n in notes(app))
        app.client.send(__import__("engine.protocol", fromlist=["Stop"]).Stop())
        await wait_for(pilot, lambda: app.history.finished is not None)


async def test_stop_asks_then_shows_the_save(app_factory) -> None:
    app = app_factory(steps=400, rate=20)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        await _start_tiny(pilot, app)
        await wait_for(pilot, lambda: app.history.step >= 4, what="steps to arrive")
        controls = {"Stop run", "Save checkpoint now", "Detach from run"}
        assert controls <= {c.title for c in app.get_system_commands(app.screen)}  # the palette too
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, StopScreen))
        assert "Stop run" in screen_text(app)
        await pilot.press("y")
        await wait_for(pilot, lambda: app.history.finished is not None, what="the stop")
        assert app.history.finished.status == "stopped"
        await wait_for(pilot, lambda: not app.live(), what="the engine to end")
        assert not controls & {c.title for c in app.get_system_commands(app.screen)}
        await pilot.pause(0.2)
        text = screen_text(app)
        assert "saved checkpoint-" in text and "stopped at step" in text
        await pilot.press("n")
        assert not isinstance(app.screen, StopScreen)


async def test_cancelled_stop_keeps_training(app_factory) -> None:
    app = app_factory(steps=400, rate=20)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        await _start_tiny(pilot, app)
        await wait_for(pilot, lambda: app.history.step >= 2)
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, StopScreen))
        await pilot.press("n")
        step = app.history.step
        await wait_for(pilot, lambda: app.history.step > step + 4, what="training to go on")
        assert app.history.finished is None
        app.client.send(__import__("engine.protocol", fromlist=["Stop"]).Stop())
        await wait_for(pilot, lambda: app.history.finished is not None)


async def test_save_and_live_sample(app_factory) -> None:
    app = app_factory(steps=400, rate=20)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        await _start_tiny(pilot, app)
        await wait_for(pilot, lambda: app.history.step >= 2)
        await pilot.press("v")
        await wait_for(pilot, lambda: app.history.checkpoints, what="a checkpoint")
        await pilot.press("5")
        await pilot.pause()
        await pilot.press("i", *"hello")  # i: into the prompt (the pane's keys stay keys until then)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.samples and app.samples[-1].done, what="the sample")
        assert app.samples[-1].text == "The adapter learned to answer briefly."
        assert "The adapter learned" in screen_text(app)
        app.client.send(__import__("engine.protocol", fromlist=["Stop"]).Stop())
        await wait_for(pilot, lambda: app.history.finished is not None)


async def test_quit_while_training_detaches(app_factory, runs_root: Path, monkeypatch) -> None:
    app = app_factory(steps=400, rate=20)
    said: list[object] = []
    exit_app = app.exit

    def exit_saying(*args, **kwargs) -> None:
        said.append(str(kwargs.get("message")))
        exit_app(*args, **kwargs)

    monkeypatch.setattr(app, "exit", exit_saying)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        await _start_tiny(pilot, app)
        await wait_for(pilot, lambda: app.history.step >= 2)
        await pilot.press("q")
        await wait_for(pilot, lambda: isinstance(app.screen, QuitScreen))
        assert "Detach" in screen_text(app)
        await pilot.press("d")
        await pilot.pause(0.1)
    run_dir = runs.list_run_dirs(runs_root)[0]
    # The terminal the console leaves says which run trains on and how to reach it (it said
    # nothing).
    assert f"run {run_dir.name} keeps training: qlc attach {run_dir.name}" in " ".join(map(str, said))
    # Detached: the engine keeps training without its console, and a later console reaches it.
    assert runs.is_running(run_dir)
    before = runs.read_events(run_dir)[0]
    import time

    time.sleep(0.5)
    after = runs.read_events(run_dir)[0]
    assert len(after) > len(before)
    from engine import protocol

    runs.send_command(run_dir, protocol.Stop())
    for _ in range(100):
        if not runs.is_running(run_dir):
            break
        time.sleep(0.05)
    assert runs.summarize(run_dir).status == "stopped"


async def test_quit_while_training_can_stop(app_factory, runs_root: Path) -> None:
    app = app_factory(steps=400, rate=20)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        await _start_tiny(pilot, app)
        await wait_for(pilot, lambda: app.history.step >= 2)
        await pilot.press("q")
        await wait_for(pilot, lambda: isinstance(app.screen, QuitScreen))
        await pilot.press("s")
        await wait_for(pilot, lambda: app.return_code is not None or app._exit, what="the app to exit")
    run_dir = runs.list_run_dirs(runs_root)[0]
    assert runs.summarize(run_dir).status == "stopped"


async def test_does_not_fit_asks_before_launching(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        await select_preset(pilot, "llama-3.1-8b-rtx4060")
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "does not fit" in screen_text(app)
        # The same first suggestion as the Memory pane's list: one that makes it fit.
        view = app.budget_state.view
        first = view.advice_fitting_first()[0].text
        assert first.endswith(", fits") and f"1. {first[:30]}" in " ".join(screen_text(app).split())
        await pilot.press("n")
        await pilot.pause()
        assert app.client is None


async def test_the_stop_dialog_follows_the_step(app_factory) -> None:
    """It read "now at step 92" while the header showed 94: the step it was opened at."""
    app = app_factory(steps=400, rate=20.0)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await select_preset(pilot, "tiny-demo")
        await pilot.press("s")
        await wait_for(pilot, lambda: app.history is not None and app.history.step > 0, what="training")
        await pilot.press("3", "x")
        await wait_for(pilot, lambda: isinstance(app.screen, StopScreen), what="the stop dialog")
        opened = app.screen._step
        await wait_for(pilot, lambda: app.history.step > opened + 2, what="more steps")
        await wait_for(
            pilot,
            lambda: f"now at step {app.history.step}" in " ".join(screen_text(app).split()),
            what="the step to follow",
        )
        await pilot.press("n")


def _footer(app) -> str:
    """The main screen's footer as a person reads it, below whatever dialog is open."""
    return screen_text(app).splitlines()[-1]


RUN_ACTIONS = ("x Stop", "v Save now", "d Detach")


async def test_a_run_stopped_under_its_dialog_leaves_the_footer_without_run_actions(app_factory) -> None:
    """The stop dialog stays open to show the save; the footer below it still offered Stop,
    Save now and Detach for the run that had ended."""
    app = app_factory(steps=400, rate=20)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        await _start_tiny(pilot, app)
        await wait_for(pilot, lambda: app.history.step >= 2, what="steps")
        assert all(action in _footer(app) for action in RUN_ACTIONS), _footer(app)
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, StopScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: app.client.ended, what="the stop")
        assert isinstance(app.screen, StopScreen)  # still open: it shows where the run stopped
        await wait_for(
            pilot,
            lambda: not any(action in _footer(app) for action in RUN_ACTIONS),
            timeout=3,
            what="the footer to drop Stop, Save now and Detach",
        )
        assert "l Log scale" in _footer(app) and "q Quit" in _footer(app)


# An engine that cannot load its model: hello, the stage, the error, then `failed` in a later
# read than the error (as a real engine's can be), when the error dialog is already open.
FAILS_AT_LOAD = """
import sys, time
from engine import protocol
def emit(ev):
    sys.stdout.buffer.write(protocol.encode(ev)); sys.stdout.buffer.flush()
emit(protocol.Hello(engine_version="0.1.0", run_id="x", pid=1, backend="hf", device="cpu"))
emit(protocol.StageEvent(stage="loading_model", message="meta-llama/Llama-3.1-8B"))
time.sleep(0.3)
emit(protocol.ErrorEvent(kind="model", message="meta-llama/Llama-3.1-8B is gated", hint="accept its licence"))
time.sleep(0.5)
emit(protocol.Finished(status="failed"))
sys.exit(1)
"""


def _fails_at_load(run_dir: Path, resume: bool = False, pipe: bool = True) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", FAILS_AT_LOAD],
        cwd=fake_engine.ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


async def test_a_run_that_fails_at_load_says_why_and_offers_no_run_actions(runs_root: Path) -> None:
    app = make_app(runs_root, launcher=_fails_at_load, gpu_probe=no_gpu, auto_attach=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        await _start_tiny(pilot, app)
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorScreen), what="the error dialog")
        await wait_for(pilot, lambda: app.client.ended, what="the engine to end")
        assert isinstance(app.screen, ErrorScreen)
        await wait_for(
            pilot,
            lambda: not any(action in _footer(app) for action in RUN_ACTIONS),
            timeout=3,
            what="the footer below the dialog to drop Stop, Save now and Detach",
        )
        await pilot.press("enter")
        await pilot.pause(0.1)
        text = screen_text(app)
        assert "✗ failed" in text and "meta-llama/Llama-3.1-8B is gated · accept its licence" in text
        assert "failed before the first step" in text
        assert "waiting" not in text and "0/?" not in text
        assert not any(action in _footer(app) for action in RUN_ACTIONS), _footer(app)


async def test_a_run_resumed_from_another_console_is_followed_again(app_factory, crashed_run: Path) -> None:
    """A console showing a run whose engine had ended saw nothing when another console (or `qlc
    resume`) started it again, until R: it now follows it within a second or two."""
    from pilot_helpers import CRASHED_RUN

    app = app_factory(attach=CRASHED_RUN)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.client is not None and app.client.ended, what="the file read")
        assert app.run_status() == "crashed" and not app.live()
        # Long enough to be seen training: resumed at step 80, a run of 120 steps at 20 a second
        # finished in 2 s, and on a loaded machine it had ended before this console looked (twice
        # in full runs on 2 cores). It is killed below.
        elsewhere = fake_engine.launcher(steps=2000, rate=20.0)(crashed_run, resume=True, pipe=False)
        try:
            await wait_for(
                pilot, lambda: app.run_status() == "training", timeout=30, what="the resumed run followed"
            )
            assert app.history is not None and app.history.hello is not None
            said = notes(app)
            assert f"{CRASHED_RUN} started again elsewhere: following it" in said, said
            assert app.live()  # this console can stop, save and sample it too
        finally:
            elsewhere.kill()
            elsewhere.wait()


async def test_a_run_this_console_ran_is_followed_when_resumed_elsewhere(
    app_factory, crashed_run: Path
) -> None:
    """The same once this console's own engine for the run has exited: it kept its process handle,
    and the run's resume elsewhere went unseen."""
    from pilot_helpers import CRASHED_RUN

    app = app_factory(attach=CRASHED_RUN, steps=90, rate=200.0)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.client is not None and app.client.ended, what="the file read")
        app._resume(crashed_run)
        await wait_for(
            pilot,
            lambda: app.client is not None and app.client.proc is not None and app.client.ended,
            timeout=20,
            what="this console's engine to finish",
        )
        # (The client knows its process ended a message before its last events are applied:
        # under load the status read "training" in between.)
        await wait_for(pilot, lambda: app.run_status() == "completed", what="the run completed")
        elsewhere = fake_engine.launcher(steps=2000, rate=20.0)(crashed_run, resume=True, pipe=False)
        try:
            await wait_for(
                pilot, lambda: app.run_status() == "training", timeout=30, what="the resume followed"
            )
            assert app.live()
        finally:
            elsewhere.kill()
            elsewhere.wait()


async def test_text_typed_where_no_box_has_the_focus_starts_no_run(app_factory) -> None:
    """A burst meant for the override box that lands on the preset list: its "s" (in "examples")
    would start a run; it is refused with a note, and `s` pressed on its own still starts one."""
    from pilot_helpers import type_ahead

    app = app_factory()
    async with app.run_test(size=(100, 30)) as pilot:
        await select_preset(pilot, "tiny-demo")
        app.screen.query_one("#preset-list").focus()
        await pilot.pause()
        type_ahead(pilot, *"max_examples=1000")
        await wait_for(
            pilot,
            lambda: noted(app, "typing outside a text box is ignored"),
            what="the refusal",
        )
        await pilot.pause(0.3)
        assert app.client is None
        await pilot.pause(0.5)
        await pilot.press("1")
        await pilot.pause(0.4)  # a key pressed on its own
        await pilot.press("s")
        await wait_for(pilot, lambda: app.client is not None, what="the run started by s alone")


async def test_text_typed_on_the_preset_list_keeps_the_overrides(app_factory) -> None:
    """The "r" of a burst ("warmup=10" landing on the preset list) reset every override applied;
    it is refused like "s", and Reset overrides from the palette, typed fast, still works (its
    Enter is the key that runs it)."""
    from pilot_helpers import type_ahead

    from tui.widgets.overrides import OverridesEditor
    from tui.widgets.presets_pane import PresetsPane

    app = app_factory()
    async with app.run_test(size=(100, 30)) as pilot:
        await select_preset(pilot, "tiny-demo")
        pane = app.screen.query_one(PresetsPane)
        pane.apply_overrides(["train.max_steps=7"])
        editor = app.screen.query_one(OverridesEditor)
        await wait_for(pilot, lambda: editor.overrides == ["train.max_steps=7"], what="the override")
        app.screen.query_one("#preset-list").focus()
        await pilot.pause()
        type_ahead(pilot, *"warmup=10")
        await wait_for(
            pilot,
            lambda: noted(app, "typing outside a text box is ignored"),
            what="the refusal",
        )
        await pilot.pause(0.3)
        assert editor.overrides == ["train.max_steps=7"]
        # An r second in a burst (read before the third key) is refused on its own account.
        await pilot.pause(1.2)
        type_ahead(pilot, *"lr")
        await wait_for(
            pilot,
            lambda: noted(app, "r came in the middle of typing"),
            what="the r refused",
        )
        assert editor.overrides == ["train.max_steps=7"]
        await pilot.press("ctrl+p")
        await pilot.pause(0.3)
        type_ahead(pilot, *"reset overrides", "enter")
        await wait_for(pilot, lambda: editor.overrides == [], what="the palette's reset")


async def test_the_runs_list_shows_a_run_this_console_stopped_as_stopped(app_factory, monkeypatch) -> None:
    """The list said "running" for a run this console had just stopped, until its next refresh
    (or R): it is read again when the watched run's status changes and each time it is shown."""
    from tui.widgets import runs_pane

    monkeypatch.setattr(runs_pane, "REFRESH_SECONDS", 3600.0)  # no refresh but the ones under test
    app = app_factory(steps=400, rate=20)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        await _start_tiny(pilot, app)
        await wait_for(pilot, lambda: app.history.step >= 4, what="steps to arrive")
        await pilot.press("4")
        await wait_for(
            pilot,
            lambda: "▶ running" in screen_text(app),
            what="the run listed as running, marked as the dashboard marks it",
        )
        await pilot.press("3")
        await pilot.pause(0.2)
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, StopScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: not app.live(), what="the engine to end")
        await pilot.press("n")
        await pilot.pause(0.2)
        await pilot.press("4")
        await wait_for(
            pilot, lambda: "stopped" in screen_text(app), timeout=5, what="the run listed as stopped"
        )
        assert "running" not in screen_text(app)
        assert "1 run · space marks" in screen_text(app)  # not "1 runs"


async def test_a_pane_key_typed_with_the_key_that_closes_a_dialog_lands(app_factory) -> None:
    """ "n" and "4" in one read: the dialog's n ran only when the key had bubbled back, after the
    4 was read while the dialog was still up (where digits do nothing), so the 4 was lost."""
    from pilot_helpers import type_ahead

    app = app_factory(steps=400, rate=20)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        await _start_tiny(pilot, app)
        await wait_for(pilot, lambda: app.history.step >= 2, what="steps to arrive")
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, StopScreen))
        type_ahead(pilot, "n", "4")
        await wait_for(pilot, lambda: not isinstance(app.screen, StopScreen), what="the dialog closed")
        from textual.widgets import TabbedContent

        tabs = app.screen.query_one(TabbedContent)
        await wait_for(pilot, lambda: tabs.active == "runs", what="the Runs pane")
        assert app.live()  # n closed the dialog: the run trains on


async def test_a_preset_the_filter_hides_does_not_start(app_factory, monkeypatch) -> None:
    """A filter that matches nothing left the last preset's settings on screen, and s offered to
    start it with Start focused."""
    app = app_factory()
    started = record_starts(monkeypatch, app)
    async with app.run_test(size=(100, 30)) as pilot:
        await select_preset(pilot, "tiny-demo")
        await pilot.press("slash", *"zzz", "enter")
        await pilot.pause(0.3)
        await pilot.press("s")
        await wait_for(pilot, lambda: noted(app, "the filter hides tiny-demo"))
        assert started == []


async def test_left_and_right_move_between_a_dialogs_buttons(app_factory) -> None:
    from textual.widgets import Button

    app = app_factory(steps=400, rate=20)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        await _start_tiny(pilot, app)
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, StopScreen))
        first = app.focused
        assert isinstance(first, Button)
        await pilot.press("right")
        assert isinstance(app.focused, Button) and app.focused is not first
        await pilot.press("left")
        assert app.focused is first
        await pilot.press("n")


async def test_a_dialogs_key_typed_with_the_key_that_opens_it_lands(app_factory) -> None:
    """ "x" and "y" in one read: the y was read while the main screen was up and came round to
    the dialog, whose keys were priority bindings only: dropped, and the stop never sent."""
    from pilot_helpers import type_ahead

    app = app_factory(steps=400, rate=20)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        await _start_tiny(pilot, app)
        await wait_for(pilot, lambda: app.history.step >= 2, what="steps to arrive")
        type_ahead(pilot, "x", "y")
        await wait_for(pilot, lambda: app.history.finished is not None, what="the stop")
        assert app.history.finished.status == "stopped"


async def test_s_typed_ahead_after_a_filter_starts_nothing_before_the_preset_is_read(
    app_factory, monkeypatch
) -> None:
    """ "/gemma-3-1b", Enter, "s" in one read: the list had moved to the filtered preset, but the
    settings were still the last one's, and s started the preset the filter had just hidden."""
    from pilot_helpers import type_ahead

    app = app_factory()
    started = record_starts(monkeypatch, app)
    async with app.run_test(size=(100, 30)) as pilot:
        await select_preset(pilot, "tiny-demo")
        await pilot.pause(0.3)
        type_ahead(pilot, "slash", *"gemma-3-1b", "enter", "s")
        await pilot.pause(1.0)
        assert all(d.name != "tiny-demo" for d in started), [d.name for d in started]
