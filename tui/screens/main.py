"""The one full screen: the five panes as tabs, and the footer. It only composes; the panes' messages
bubble to the App, which owns the run being watched."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer, TabbedContent, TabPane, Tabs

from tui.widgets.dashboard import Dashboard
from tui.widgets.gpu import Probe
from tui.widgets.memory_pane import MemoryPane
from tui.widgets.presets_pane import PresetsPane
from tui.widgets.runs_pane import RunsPane
from tui.widgets.sample_pane import SamplePane

PANES = ("presets", "memory", "dashboard", "runs", "sample")


class Panes(TabbedContent):
    """The panes as tabs. Focusing a widget shows its tab, through a message handled later: by
    then keys typed fast may have moved on to another pane, and a stale message would pull the
    tabs back ("4 shows Runs for a second, then Presets again"). Only the focus still inside a
    pane shows it."""

    def _on_tab_pane_focused(self, event: TabPane.Focused) -> None:
        focused = self.screen.focused
        if focused is not None and event.tab_pane not in focused.ancestors_with_self:
            event.prevent_default()  # TabbedContent's own handler (called after this one) would switch
            event.stop()

    def on_mount(self) -> None:
        # The tab bar takes no focus: there, the panes' keys (s, /, i, ctrl+g...) reached no pane
        # and did nothing, and Tab stopped on it between two panes' widgets. Digits and clicks
        # switch the tabs.
        self.query_one(Tabs).can_focus = False


class MainScreen(Screen[None]):
    def __init__(
        self, runs_root: Path, gpu_probe: Probe | None, initial: str = "presets", focus: str | None = None
    ) -> None:
        super().__init__()
        self._initial = initial
        # Focused as the screen is composed, with the first frame: a key typed as soon as the
        # presets show ("/tiny") reaches the pane, not an unfocused screen.
        self.AUTO_FOCUS = focus
        self._runs_root = runs_root
        self._gpu_probe = gpu_probe

    def compose(self) -> ComposeResult:
        with Panes(id="panes", initial=self._initial):
            with TabPane("1 Presets", id="presets"):
                yield PresetsPane(id="presets-pane")
            with TabPane("2 Memory", id="memory"):
                yield MemoryPane(id="memory-pane")
            with TabPane("3 Dashboard", id="dashboard"):
                yield Dashboard(self._gpu_probe, id="dashboard-pane")
            with TabPane("4 Runs", id="runs"):
                yield RunsPane(self._runs_root, id="runs-pane")
            with TabPane("5 Sample", id="sample"):
                yield SamplePane(id="sample-pane")
        yield Footer()
