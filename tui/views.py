"""What the App shows, as plain values: the panes watch the App's reactives holding these
(`self.watch(self.app, ...)`) instead of the App pushing into each pane."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.app import ScreenStackError
from textual.css.query import NoMatches
from textual.dom import NoScreen
from textual.widget import Widget

from tui.budget import BudgetView
from tui.history import RunHistory


@dataclass(frozen=True, eq=False)
class RunView:
    """The Dashboard's run: its history (None: no run watched), which grows in place as events
    arrive, and its status as the App sees it (training, stopping, crashed, detached, ...)."""

    history: RunHistory | None
    status: str

    @property
    def run_id(self) -> str | None:
        return self.history.run_id if self.history is not None else None


@dataclass(frozen=True)
class SampleSources:
    """What the Sample pane may sample from: the watched run live, and its saved checkpoints."""

    run_id: str | None = None
    live: bool = False
    checkpoints: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class BudgetState:
    """The memory budget of the selected preset: the Memory pane's view, the Presets pane's line."""

    view: BudgetView
    preset: str | None
    summary: Text | None = None


def focus_now(widget: Widget) -> None:
    """Focus `widget` before the App reads the next key. (Widget.focus() waits its turn in the
    App's queue: keys typed meanwhile, "/tiny" or Enter then 3, would reach the widget that had
    the focus, a text box typing the 3.)"""
    with contextlib.suppress(NoScreen, ScreenStackError, IndexError):
        widget.screen.set_focus(widget)


def while_panes_exist(handler: Callable[..., None]) -> Callable[..., None]:
    """Client (and late preset) messages can still arrive while the app shuts down and its panes
    are removed (the screen stack is then empty: IndexError)."""

    @functools.wraps(handler)
    def guarded(*args: Any, **kwargs: Any) -> None:
        with contextlib.suppress(NoMatches, ScreenStackError, IndexError):
            handler(*args, **kwargs)

    return guarded
