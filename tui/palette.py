"""The command palette's entries and the panes' names: everything a person can do, in words."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from textual.app import SystemCommand

from tui.screens.main import PANES

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
