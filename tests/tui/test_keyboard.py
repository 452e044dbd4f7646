"""The keyboard as a person uses it: quick bursts of keys, text boxes that give the keys back, and
footers that offer only what works."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from pilot_helpers import noted, notes, record_starts, screen_text, select_preset, wait_for
from textual import events
from textual.coordinate import Coordinate
from textual.message import Message
from textual.widgets import Input, OptionList, TabbedContent

from tui.widgets.preset_settings import SettingsTable
from tui.widgets.presets_pane import PresetsPane


class MessageCounter:
    """Counts the messages the app's widgets process (run_test's message_hook), less Pilot's own
    callbacks (every pause posts some)."""

    def __init__(self) -> None:
        self.names: Counter[str] = Counter()

    def __call__(self, message: Message) -> None:
        callback = getattr(message, "callback", None)
        if "Pilot" in getattr(callback, "__qualname__", "") or "Pilot" in repr(callback):
            return
        self.names[type(message).__qualname__] += 1

    @property
    def count(self) -> int:
        return sum(self.names.values())

    def busiest(self) -> str:
        return ", ".join(f"{n} x{c}" for n, c in self.names.most_common(5))


async def test_quick_bursts_in_the_presets_list_leave_the_console_idle(app_factory) -> None:
    """Down and Up pressed faster than the list's handlers run used to start a highlight
    ping-pong (highlight -> select -> highlight ...) that kept a core busy for good and snapped
    the tabs back to Presets."""
    counter = MessageCounter()
    app = app_factory()
    async with app.run_test(size=(80, 24), message_hook=counter) as pilot:
        await select_preset(pilot, "tiny-demo")
        options = app.screen.query_one("#preset-list", OptionList)
        options.focus()
        await pilot.pause()
        for burst in (["down"] * 3, ["up"] * 2, ["down"] * 4, ["up"] * 3, ["down", "up", "down"]):
            for key in burst:  # queued at once, as keys typed faster than they are handled arrive
                app.post_message(events.Key(key, None))
            await pilot.pause(0.05)
        pane = app.screen.query_one(PresetsPane)
        names = [str(options.get_option_at_index(i).id) for i in range(options.option_count)]
        await wait_for(
            pilot,
            lambda: pane.draft is not None and pane.draft.name == names[options.highlighted or 0],
            what="the highlighted preset to be shown",
        )
        await pilot.pause(0.5)  # the last preset's budget and data check land
        # Idle: over a second, hardly a message and hardly any CPU.
        counter.names.clear()
        cpu = time.process_time()
        await pilot.pause(1.0)
        messages, cpu = counter.count, time.process_time() - cpu
        assert messages < 20, f"{messages} messages in a second of idle: {counter.busiest()}"
        assert cpu < 0.3, f"{cpu:.2f} s of CPU in a second of idle"
        assert pane.selected == names[options.highlighted or 0]
        # The tab keys work and stay put.
        tabs = app.screen.query_one(TabbedContent)
        for key, pane_id in (
            ("4", "runs"),
            ("5", "sample"),
            ("2", "memory"),
            ("3", "dashboard"),
            ("1", "presets"),
        ):
            await pilot.press(key)
            await pilot.pause(0.3)
            assert tabs.active == pane_id, f"{key} showed {tabs.active}"
            assert app.focused is not None and pane_id in {a.id for a in app.focused.ancestors_with_self}


def footer(app) -> dict[str, str]:
    """What the footer offers: key -> description, for the bindings shown and enabled."""
    return {
        key: active.binding.description
        for key, active in app.screen.active_bindings.items()
        if active.binding.show and active.enabled
    }


async def test_text_boxes_give_the_keys_back(app_factory, finished_run) -> None:
    """No pane's natural focus is a text box; each box shows Escape in the footer and gives the
    keys back with it (or Enter where Enter finishes it), so 1-5 and q switch and quit again."""
    from textual.widgets import Input

    from tui.widgets.sample_pane import SamplePane

    app = app_factory()
    async with app.run_test(size=(80, 24)) as pilot:
        await select_preset(pilot, "tiny-demo")
        tabs = app.screen.query_one(TabbedContent)
        # Sample: the prompt takes keys only once asked for (i or Enter).
        await pilot.press("5")
        await pilot.pause()
        assert tabs.active == "sample" and not isinstance(app.focused, Input)
        assert footer(app).get("i") == "Type a prompt" and "escape" not in footer(app)
        await pilot.press("1")
        await pilot.pause()
        assert tabs.active == "presets"
        await pilot.press("5", "i", *"q1")
        prompt = app.screen.query_one("#prompt", Input)
        assert app.focused is prompt and prompt.value == "q1"
        assert footer(app).get("escape") == "Leave the box" and "q" not in footer(app)
        await pilot.press("escape", "3")
        await pilot.pause()
        assert tabs.active == "dashboard"
        await pilot.press("5", "enter")
        assert app.focused is prompt
        await pilot.press("escape")
        assert app.focused is app.screen.query_one(SamplePane).query_one("#replies")
        # Memory: a size is typed after `t`; Enter applies it and gives the keys back.
        await pilot.press("2", "t", *"24")
        size = app.screen.query_one("#gpu-size", Input)
        assert app.focused is size and size.value == "24"
        assert footer(app).get("escape") == "Leave the box" and "f" not in footer(app)
        await pilot.press("enter")
        assert app.focused is app.screen.query_one("#gpu-select")
        await pilot.press("a")
        assert app.focused is app.screen.query_one("#advice", OptionList)  # the advice is reachable
        await pilot.press("3")
        await pilot.pause()
        assert tabs.active == "dashboard" and size.value == "24"
        # Presets: Down in the filter reaches the list.
        await pilot.press("1", "slash", *"tiny")
        assert app.focused is app.screen.query_one("#preset-filter", Input)
        assert footer(app).get("escape") == "Leave the box"
        await pilot.press("down")
        assert app.focused is app.screen.query_one("#preset-list", OptionList)
        # Every text box of every pane shows the way out while it has focus.
        for box in app.screen.query(Input):
            app.action_show_pane(next(a.id for a in box.ancestors if a.id in ("presets", "memory", "sample")))
            await pilot.pause()
            box.focus()
            await pilot.pause()
            assert footer(app).get("escape") == "Leave the box", box.id
            await pilot.press("escape")
            assert not isinstance(app.focused, Input), box.id


async def test_a_completed_run_offers_no_stop_save_or_detach(app_factory, finished_run) -> None:
    from pilot_helpers import FINISHED_RUN

    app = app_factory(attach=FINISHED_RUN)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        await wait_for(pilot, lambda: app.client is not None and app.client.ended)
        await pilot.pause()
        offered = footer(app)
        assert "l" in offered  # the log scale still applies to a finished run's chart
        assert not {"x", "v", "d"} & set(offered), offered


async def test_a_training_run_offers_stop_save_and_detach(app_factory) -> None:
    app = app_factory(steps=400, rate=20)
    async with app.run_test(size=(80, 24)) as pilot:
        await select_preset(pilot, "tiny-demo")
        await pilot.press("s")
        await wait_for(pilot, lambda: app.history is not None and app.history.step >= 2, what="steps")
        offered = footer(app)
        assert {"x", "v", "d"} <= set(offered), offered
        await pilot.press("x")
        await pilot.pause()
        await pilot.press("y")
        await wait_for(pilot, lambda: app.history.finished is not None, what="the stop")
        await pilot.press("n")
        await wait_for(pilot, lambda: not {"x", "v", "d"} & set(footer(app)), what="the footer to drop them")


async def test_keys_typed_faster_than_handled_land_where_they_were_meant(app_factory) -> None:
    """Over SSH on a busy box keys arrive in bursts: a key that moves the focus (/, Enter, t, i,
    Escape, 1-5) must have moved it before the next key is read, or "/tiny" loses its t and
    "Enter 2" types the 2 into the box just left."""
    from textual.widgets import Input

    app = app_factory()
    async with app.run_test(size=(80, 24)) as pilot:
        await select_preset(pilot, "tiny-demo")
        app.screen.query_one("#preset-list", OptionList).focus()
        await pilot.pause()

        def burst(*keys: str) -> None:
            for key in keys:
                app.post_message(events.Key(key, key if len(key) == 1 else None))

        burst("slash", *"4060", "enter", "2", "t", *"24", "enter", "5", "i", *"hi", "escape", "3")
        tabs = app.screen.query_one(TabbedContent)
        await wait_for(pilot, lambda: tabs.active == "dashboard", what="the dashboard")
        await pilot.pause(0.3)
        assert app.screen.query_one("#preset-filter", Input).value == "4060"
        assert app.screen.query_one("#gpu-size", Input).value == "24"
        assert app.screen.query_one("#prompt", Input).value == "hi"
        assert app.focused is app.screen.query_one("#event-log")


def test_the_docs_list_every_key_of_every_pane() -> None:
    """docs/console.md's table names each key each pane binds (its row), and the App's own."""
    from pathlib import Path

    from textual.binding import Binding

    from tui.app import QlcApp
    from tui.screens.error import ErrorScreen
    from tui.screens.export import ExportScreen
    from tui.screens.quit import QuitScreen
    from tui.screens.stop import StopScreen
    from tui.widgets.dashboard import Dashboard
    from tui.widgets.memory_pane import MemoryPane, SizeInput
    from tui.widgets.presets_pane import FilterInput
    from tui.widgets.runs_pane import RunsPane
    from tui.widgets.sample_pane import SamplePane

    docs = (Path(__file__).resolve().parents[2] / "docs" / "console.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in docs.splitlines() if line.startswith("| ")}
    names = {"slash": "/", "escape": "Escape", "enter": "Enter", "down": "↓", "up": "↑", "delete": "Delete"}
    names |= {"pageup": "PgUp", "pagedown": "PgDn", "home": "Home", "end": "End", "left": "←", "right": "→"}
    names |= {"backspace": "Backspace", "f5": "F5", "question_mark": "?", "f1": "F1"}
    owners = {
        "1 Presets": [PresetsPane, FilterInput],
        "2 Memory budget": [MemoryPane, SizeInput],
        "3 Dashboard": [Dashboard],
        "4 Runs": [RunsPane],
        "5 Sample": [SamplePane],
        "Dialogs": [StopScreen, QuitScreen, ErrorScreen, ExportScreen],
    }
    missing = []
    for row, classes in owners.items():
        for cls in classes:
            for binding in cls.BINDINGS:
                assert isinstance(binding, Binding)
                for key in binding.key.split(","):
                    shown = names.get(key, key)
                    if f"`{shown}`" not in rows[row] and f" {shown} " not in rows[row]:
                        missing.append(f"{row}: {key} ({cls.__name__})")
    intro = docs.split("| Pane | Keys |")[0]
    for binding in QlcApp.BINDINGS:
        assert isinstance(binding, Binding)
        if f"`{names.get(binding.key, binding.key)}`" not in intro and binding.key not in "12345":
            missing.append(f"app: {binding.key}")
    assert not missing, missing


async def test_question_mark_shows_the_keys_and_escape_hides_them(app_factory) -> None:
    """Help was only the palette's "Keys", and Escape did not close it."""
    from textual.widgets import HelpPanel

    app = app_factory()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: app.screen.query(HelpPanel), what="the keys panel")
        await pilot.press("escape")
        await wait_for(pilot, lambda: not app.screen.query(HelpPanel), what="the panel to close")
        await pilot.press("f1")
        await wait_for(pilot, lambda: app.screen.query(HelpPanel), what="the keys panel (F1)")
        await pilot.press("f1")
        await wait_for(pilot, lambda: not app.screen.query(HelpPanel), what="F1 to close it")
        # In a text box `?` is a question mark.
        await pilot.press("slash", "question_mark")
        assert app.screen.query_one("#preset-filter").value == "?"
        assert not app.screen.query(HelpPanel)


@pytest.mark.parametrize(("width", "panel_width"), [(60, 60), (120, 39)])
async def test_the_keys_panel_covers_a_narrow_window_and_splits_a_wide_one(
    app_factory, width: int, panel_width: int
) -> None:
    """At 60 columns the panel's 30 left the pane 30, every setting cut in the middle; it now
    covers the window until closed. From 80 columns it splits off a third (39 of 120), as before."""
    from textual.widgets import HelpPanel

    app = app_factory()
    async with app.run_test(size=(width, 24)) as pilot:
        await pilot.pause()
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: app.screen.query(HelpPanel), what="the keys panel")
        await pilot.pause()
        assert app.screen.query_one(HelpPanel).outer_size.width == panel_width
        assert "tab Focus Next" in screen_text(app)
        await pilot.press("escape")
        await wait_for(pilot, lambda: not app.screen.query(HelpPanel), what="the panel to close")


async def test_a_burst_from_the_preset_list_into_a_setting_edits_that_setting(app_factory) -> None:
    """Enter on the preset list, two Downs, Enter, Ctrl-U, a value, Enter, all at once (over SSH):
    the list's Enter moved the focus to the settings only when its message came round, so the
    Downs moved the list, the next Enter edited row 0 and the value was lost; as priority
    bindings the Enters ran before the Downs (their own bindings, run when they bubbled back),
    and the burst still edited row 0. The row the Downs reach is the one edited."""
    from pilot_helpers import type_ahead

    from tui.widgets.overrides import OverridesEditor

    app = app_factory()
    async with app.run_test(size=(80, 24)) as pilot:
        await select_preset(pilot, "tiny-demo")
        app.screen.query_one("#preset-list", OptionList).focus()
        await pilot.pause()
        table = app.screen.query_one(SettingsTable)
        path = str(table.coordinate_to_cell_key(Coordinate(2, 0)).row_key.value)
        box = app.screen.query_one("#override-input", Input)
        type_ahead(pilot, "enter", "down", "down", "enter")
        await wait_for(pilot, lambda: app.focused is box, what="the override box")
        assert box.value.split("=")[0].rstrip(".") == path
        type_ahead(pilot, "ctrl+u", *"train.max_steps=70", "enter")
        editor = app.screen.query_one(OverridesEditor)
        await wait_for(pilot, lambda: editor.overrides == ["train.max_steps=70"], what="the override applied")
        await pilot.pause(0.3)  # the burst's keys that bubble back to the App, before it closes
        assert app.screen.query_one(TabbedContent).active == "presets"


async def test_downs_typed_ahead_on_the_preset_list_pick_the_preset_they_reach(app_factory) -> None:
    """Down, Down, Enter at once on the preset list open the preset two below, not the one the
    list showed when the Enter was read."""
    from pilot_helpers import type_ahead

    app = app_factory()
    async with app.run_test(size=(80, 24)) as pilot:
        await select_preset(pilot, "tiny-demo")
        presets = app.screen.query_one("#preset-list", OptionList)
        presets.focus()
        presets.highlighted = 0
        await pilot.pause()
        expected = presets.get_option_at_index(2).id
        type_ahead(pilot, "down", "down", "enter")
        table = app.screen.query_one(SettingsTable)
        await wait_for(pilot, lambda: app.focused is table, what="the settings")
        await pilot.pause(0.3)
        assert presets.highlighted == 2
        assert app.screen.query_one(PresetsPane).selected == expected
        assert table.cursor_row == 0


async def test_text_typed_outside_a_box_does_not_switch_panes(app_factory) -> None:
    """ "lr=2e-4" landing on the preset list: its 2 and 4 switched panes and its e opened an
    export on the Runs pane. From the third key of a burst on, keys typed outside a text box are
    dropped, with one note; two keys pressed quickly still act."""
    from pilot_helpers import type_ahead

    app = app_factory()
    async with app.run_test(size=(80, 24)) as pilot:
        await select_preset(pilot, "tiny-demo")
        app.screen.query_one("#preset-list", OptionList).focus()
        await pilot.pause()
        type_ahead(pilot, *"lr=2e-4")
        await wait_for(
            pilot,
            lambda: noted(app, "typing outside a text box is ignored"),
            what="the note",
        )
        await pilot.pause(0.3)
        tabs = app.screen.query_one(TabbedContent)
        assert tabs.active == "presets"
        said = [n for n in notes(app) if "ignored" in n]
        assert len(said) == 1  # one note for the burst
        await pilot.pause(1.0)
        type_ahead(pilot, "2", "a")  # Memory, then its advice list: two keys, both act
        await wait_for(pilot, lambda: app.focused is app.screen.query_one("#advice", OptionList), what="a")
        assert tabs.active == "memory"


async def test_a_run_key_typed_ahead_before_enter_is_still_refused(app_factory, monkeypatch) -> None:
    """ "ls" and Enter in one read on the preset list: the s's binding runs when the key has
    bubbled back, after the Enter was read, and the judgement looked at the last two keys read
    (s, Enter), so the run started. The s is judged among the keys as they came: after an l."""
    from pilot_helpers import type_ahead

    app = app_factory()
    started = record_starts(monkeypatch, app)
    async with app.run_test(size=(80, 24)) as pilot:
        await select_preset(pilot, "tiny-demo")
        for burst in (("l", "s", "enter"), ("x", "s", "down"), ("x", "s", "escape")):
            app.screen.query_one("#preset-list", OptionList).focus()
            await pilot.pause(0.5)
            app._notifications.clear()
            type_ahead(pilot, *burst)
            await wait_for(
                pilot,
                lambda: noted(app, "s came in the middle of typing"),
                what=f"the s of {burst} refused",
            )
            await pilot.pause(0.3)
        assert started == []
        # Pressed on its own, s starts the run.
        app.screen.query_one("#preset-list", OptionList).focus()
        await pilot.pause(0.5)
        type_ahead(pilot, "s")
        await wait_for(pilot, lambda: len(started) == 1, what="the run started")


async def test_a_pane_digit_then_f_quickly_auto_fits(app_factory) -> None:
    """ "2" then "f" a moment later (docs/console.md: two keys pressed quickly each work): the
    digit switched panes, it was not typing, so the f is not refused."""
    from pilot_helpers import type_ahead

    app = app_factory()
    async with app.run_test(size=(100, 30)) as pilot:
        await select_preset(pilot, "tiny-demo")
        app.screen.query_one("#preset-list", OptionList).focus()
        await pilot.pause(0.5)
        app._notifications.clear()
        type_ahead(pilot, "2")
        await pilot.pause(0.15)
        type_ahead(pilot, "f")
        await wait_for(pilot, lambda: list(app._notifications), what="the auto-fit's note")
        await pilot.pause(0.3)
        said = notes(app)
        assert app.screen.query_one(TabbedContent).active == "memory"
        assert not any("middle of typing" in n for n in said), said
        assert any("auto-fit" in n or "nothing to change" in n for n in said), said


async def test_home_and_end_go_to_the_first_and_last_setting(app_factory) -> None:
    """DataTable's Home and End scroll sideways: on the settings (rows only) they did nothing."""
    app = app_factory()
    async with app.run_test(size=(100, 30)) as pilot:
        await select_preset(pilot, "tiny-demo")
        table = app.screen.query_one(SettingsTable)
        table.focus()
        await pilot.pause()
        await pilot.press("end")
        await wait_for(pilot, lambda: table.cursor_row == table.row_count - 1, what="the last setting")
        await pilot.press("home")
        await wait_for(pilot, lambda: table.cursor_row == 0, what="the first setting")


@pytest.mark.parametrize(
    "burst",
    [
        tuple("seq_len=1024"),  # the s first: its binding runs after the rest was read
        ("l", "s", *"x" * 31),  # 31 keys after the s: the l before it had left the record
    ],
)
async def test_a_burst_that_begins_with_s_starts_no_run(app_factory, monkeypatch, burst) -> None:
    from pilot_helpers import type_ahead

    app = app_factory()
    started = record_starts(monkeypatch, app)
    async with app.run_test(size=(80, 24)) as pilot:
        await select_preset(pilot, "tiny-demo")
        app.screen.query_one("#preset-list", OptionList).focus()
        await pilot.pause(0.5)
        type_ahead(pilot, *burst)
        await wait_for(
            pilot,
            lambda: noted(app, "s came in the middle of typing"),
            what="the s refused",
        )
        await pilot.pause(0.3)
        assert started == []


async def test_tab_never_leaves_the_pane_keys_without_a_pane(app_factory) -> None:
    """Tab reached the tab bar, where the panes' keys (s, /, i, ctrl+g) did nothing."""
    from textual.widgets import Tabs

    app = app_factory()
    async with app.run_test(size=(100, 30)) as pilot:
        await select_preset(pilot, "tiny-demo")
        for pane in ("1", "5"):
            await pilot.press(pane)
            for _ in range(6):
                await pilot.press("tab")
                assert not isinstance(app.focused, Tabs)
