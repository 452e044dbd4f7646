"""The command palette's entries and the panes' names: everything a person can do, in words."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from textual.app import SystemCommand

from tui.screens.main import PANES
from tui.widgets.memory_pane import MemoryPane
from tui.widgets.presets_pane import PresetsPane
from tui.widgets.runs_pane import RunsPane

if TYPE_CHECKING:
    from tui.app import QlcApp

# Each pane's natural focus: never a text box, which would type the keys that switch panes.
PANE_FOCUS = {
    "presets": "#preset-list",
    "memory": "#gpu-select",
    "dashboard": "#event-log",
    "runs": "#runs-table",
    "sample": "#replies",
}
# Where Escape goes from a text box, when not to its pane's natural focus.
LEAVE_TO = {"override-input": "#settings", "gpu-size": "#gpu-select"}
PANE_TITLES = {
    "presets": "Presets",
    "memory": "Memory budget",
    "dashboard": "Dashboard",
    "runs": "Runs",
    "sample": "Sample",
}


def system_commands(app: QlcApp) -> Iterable[SystemCommand]:
    for i, pane in enumerate(PANES, 1):
        yield SystemCommand(
            f"Show {PANE_TITLES[pane]}", f"switch to pane {i}", lambda p=pane: app.action_show_pane(p)
        )
    yield SystemCommand("Start run", "train the selected preset with its overrides", app.action_start_run)
    if app.live():  # as in the footer: only while a run trains here
        yield SystemCommand("Stop run", "finish the step, save a checkpoint, exit", app.action_stop_run)
        yield SystemCommand(
            "Save checkpoint now", "the run saves at the next step and goes on", app.action_save_checkpoint
        )
        yield SystemCommand("Detach from run", "stop watching; the run keeps training", app.action_detach_run)
    yield SystemCommand("Toggle log scale", "the loss chart on a log10 axis", app.action_toggle_log_scale)
    yield SystemCommand(
        "Auto-fit memory", "change settings until the budget fits the GPU", app.action_auto_fit
    )
    yield SystemCommand("Reset overrides", "back to the preset as written", app.action_reset_overrides)
    # The panes' own keys (g, t, a, /, space): their pane is shown first, as its key would need.
    for title, help_text, pane, kind, action in (
        ("Filter presets", "type part of a preset's name", "presets", PresetsPane, "focus_filter"),
        ("Choose GPU", "the memory budget against another card", "memory", MemoryPane, "focus_gpu"),
        ("Type a GPU size", "such as 24GB, for the memory budget", "memory", MemoryPane, "focus_size"),
        (
            "Memory advice",
            "the ranked changes that make the budget fit",
            "memory",
            MemoryPane,
            "focus_advice",
        ),
        ("Mark selected run", "for Compare marked runs", "runs", RunsPane, "mark"),
    ):
        yield SystemCommand(title, help_text, lambda p=pane, k=kind, a=action: _pane_action(app, p, k, a))
    for title, help_text, action in (
        ("Open selected run", "its dashboard from its events file", "open"),
        ("Attach to selected run", "follow a running run", "attach"),
        ("Resume selected run", "from its newest checkpoint", "resume"),
        ("Compare marked runs", "their loss curves on one chart", "compare"),
        ("Reload runs", "re-read the runs directory", "reload"),
        ("Export selected run", "merge its adapter into the base model, or copy it", "export"),
    ):
        yield SystemCommand(title, help_text, lambda a=action: app.runs_action(a))
    yield SystemCommand("Generate sample", "from the live model or a checkpoint", app.action_generate_sample)


def _pane_action(app: QlcApp, pane: str, kind: type, action: str) -> None:
    """A pane's key binding from the palette: the pane shown and focused, then its action."""
    app.action_show_pane(pane)
    getattr(app.pane(kind), f"action_{action}")()
