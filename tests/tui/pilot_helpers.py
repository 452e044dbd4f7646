"""Helpers and fixed data for the console's tests (importable from test modules, unlike conftest)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import fake_engine
from rich.console import Console
from textual import events
from textual.app import App
from textual.pilot import Pilot

from engine import protocol
from tui.widgets.gpu import NoGpu


def type_ahead(pilot: Pilot, *keys: str) -> None:
    """Keys as a slow SSH link delivers a burst: all queued at once, none waiting for the app to
    handle the one before (Pilot.press waits between keys, so it never meets this)."""
    for key in keys:
        event = events.Key(key, key if len(key) == 1 else None)
        event.set_sender(pilot.app)
        pilot.app._driver.send_message(event)  # type: ignore[union-attr]


async def wait_for(
    pilot: Pilot, condition: Callable[[], object], timeout: float = 10.0, what: str = ""
) -> None:
    """Let the app run until `condition()` is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting for {what or condition}; the screen:\n{screen_text(pilot.app)}"
            )
        await pilot.pause(0.05)


def screen_text(app: App) -> str:
    """The screen as plain text, as a person (or tmux capture-pane) would read it."""
    width, height = app.size
    console = Console(
        width=width, height=height, file=io.StringIO(), record=True, color_system=None, legacy_windows=False
    )
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


def notes(app: App) -> list[str]:
    """The notifications shown so far, as text."""
    return [str(n.message) for n in app._notifications]


def noted(app: App, text: str) -> bool:
    """Whether a notification saying `text` has been shown (a condition for wait_for)."""
    return any(text in note for note in notes(app))


def record_notes(app: App) -> list[str]:
    """Every notification posted from now on, as text, including those already withdrawn."""
    from textual.notifications import Notify

    shown: list[str] = []
    original = app.post_message

    def post_message(message: Any) -> bool:
        if isinstance(message, Notify):
            shown.append(str(message.notification.message))
        return original(message)

    app.post_message = post_message  # type: ignore[method-assign]
    return shown


def record_starts(monkeypatch: Any, app: App) -> list[Any]:
    """The runs the app would start (its start flow's drafts), recorded instead of started."""
    started: list[Any] = []
    monkeypatch.setattr(app, "_start_flow", lambda draft: started.append(draft))
    return started


FINISHED_RUN = "20260101-120000-tiny-demo"
CRASHED_RUN = "20260102-090000-tiny-demo"


def no_gpu() -> list:
    raise NoGpu("no driver", "NVML Shared Library Not Found")


def recorded_events() -> list[protocol.Event]:
    """The committed recording of a real tiny run, or a synthetic run until one is recorded."""
    if fake_engine.RECORDED.is_file():
        return fake_engine.load_events(fake_engine.RECORDED)
    return list(fake_engine.synthetic_run(120, run_id=FINISHED_RUN))


async def select_preset(pilot: Pilot, name: str, overrides: list[str] | None = None) -> None:
    """Pick a preset on the Presets pane and wait until it is read and shown (a worker reads it)."""
    from tui.widgets.presets_pane import PresetsPane

    pane = pilot.app.screen_stack[0].query_one(PresetsPane)
    await wait_for(pilot, lambda: pane.draft is not None, what="the first preset to be shown")
    pane.select(name, overrides)
    await wait_for(
        pilot,
        lambda: (
            pane.draft is not None
            and pane.draft.name == name
            and pilot.app._preset is not None
            and pilot.app._preset.draft is pane.draft
        ),
        what=f"preset {name} to be shown (selected: {pane.selected}, shown: {pane.draft and pane.draft.name})",
    )
    await pilot.pause()


# The memory budget's five terms, in the order the breakdown lists them.
MEMORY_TERMS = ("weights", "gradients", "optimizer", "activations", "workspace")


async def memory_pane_shows(pilot: Pilot, preset: str, text: str, what: str) -> None:
    """Pick `preset`, go to the Memory pane, and wait until it shows `text`."""
    await select_preset(pilot, preset)
    await pilot.press("2")
    await wait_for(pilot, lambda: text in screen_text(pilot.app), what=what)


async def overrides_shown(pilot: Pilot, overrides: list[str]) -> None:
    """Wait until the Presets pane shows exactly these overrides (applied in a worker)."""
    from tui.widgets.presets_pane import PresetsPane

    pane = pilot.app.screen_stack[0].query_one(PresetsPane)
    await wait_for(
        pilot,
        lambda: pane.draft is not None and list(pane.draft.overrides) == overrides,
        what=f"overrides {overrides}",
    )
    await pilot.pause()
