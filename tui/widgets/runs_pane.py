"""The Runs pane: every run under the runs directory, and a chart comparing their losses.

Summaries and compared histories are read in worker threads: a run's summary folds its whole
events file. Summaries are cached by the file's size and mtime, so the periodic refresh re-reads
only the runs that moved.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Static

from engine.run import runs
from tui.client import load_history
from tui.history import RunHistory
from tui.output import plural
from tui.views import RunView
from tui.widgets.line_chart import ChartSeries, LineChart
from tui.widgets.progress import STATUS_MARK
from tui.widgets.rows_table import RowsTable

REFRESH_SECONDS = 5.0
STATUS_STYLE = {
    "running": "bold green",
    "completed": "green",
    "stopped": "yellow",
    "failed": "bold red",
    "crashed": "bold red",
}


def short_id(run_id: str, seconds: bool = False) -> str:
    """20261123-150102-tiny-demo -> 1123-1501 tiny-demo: date to the minute and the preset (to
    the second with `seconds`, for runs started in the same minute)."""
    parts = run_id.split("-", 2)
    if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
        return f"{parts[0][4:]}-{parts[1] if seconds else parts[1][:4]} {parts[2]}"
    return run_id


def short_ids(run_ids: list[str]) -> dict[str, str]:
    """Each run's short id; to the second where two would read the same."""
    counts = Counter(short_id(r) for r in run_ids)
    return {r: short_id(r, seconds=counts[short_id(r)] > 1) for r in run_ids}


class RunsPane(Vertical):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "open", "Open", show=False),
        Binding("a", "attach", "Attach"),
        Binding("r", "resume", "Resume"),
        Binding("space", "mark", "Mark"),
        Binding("c", "compare", "Compare"),
        Binding("x", "stop", "Stop"),
        Binding("e", "export", "Export"),
        Binding("R,f5", "reload", "Reload", show=False),
    ]

    class Open(Message):
        """Show this run on the Dashboard (following it if it is running)."""

        def __init__(self, run_dir: Path, action: str) -> None:
            super().__init__()
            self.run_dir = run_dir
            self.action = action  # open, attach, resume, stop, export

    class Loaded(Message):
        def __init__(self, summaries: list[runs.RunSummary]) -> None:
            super().__init__()
            self.summaries = summaries

    class Compared(Message):
        def __init__(self, histories: list[RunHistory]) -> None:
            super().__init__()
            self.histories = histories

    def __init__(self, root: Path, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.root = root
        self.summaries: list[runs.RunSummary] = []
        self.marked: set[str] = set()
        self._cache: dict[str, tuple[tuple[int, float, bool], runs.RunSummary]] = {}

    def compose(self) -> ComposeResult:
        yield RowsTable(id="runs-table", cursor_type="row")
        yield Static(id="runs-empty")
        yield LineChart("mark two or more runs (space), then c", id="compare-chart")

    def on_mount(self) -> None:
        table = self.query_one("#runs-table", DataTable)
        table.add_column("", key="mark", width=1)
        table.add_column("status", key="status", width=11)
        table.add_column("run", key="run")
        # The figures before the model: at 60 columns the last column is the one cut off (the
        # loss was hidden behind a horizontal scroll), and the model is the run's name's preset.
        table.add_column("step", key="step")
        table.add_column("loss", key="loss")
        table.add_column("model", key="model")
        table.border_title = "runs"
        self.query_one("#compare-chart").border_title = "compare loss"
        self.set_interval(REFRESH_SECONDS, self._tick)
        self._loaded_once = False
        self._watched: tuple[str | None, str] | None = None
        self.watch(self.app, "run_view", self._watched_run, init=False)

    def _watched_run(self, view: RunView) -> None:
        """A run started, opened, stopped or finished in the console: list it as it is now, once
        the list has been looked at (it said "running" after this console had stopped the run)."""
        if (view.run_id, view.status) != self._watched:
            self._watched = (view.run_id, view.status)
            if self._loaded_once:
                self.reload()

    def on_show(self) -> None:
        # Summaries fold every run's events file: not at start-up (where they would compete with
        # opening the run being watched), but when the list is first looked at, and again each
        # time (only changed runs are read again: _load's cache).
        self._loaded_once = True
        self.reload()

    def _tick(self) -> None:
        if self.is_on_screen:  # only while the pane is showing: the refresh reads files
            self.reload()

    def reload(self) -> None:
        self.run_worker(self._load, thread=True, exclusive=True, group="runs-list", exit_on_error=False)

    def _load(self) -> None:
        out = []
        for run_dir in reversed(runs.list_run_dirs(self.root)):
            try:
                st = os.stat(run_dir / runs.EVENTS)
                key = (st.st_size, st.st_mtime, runs.is_running(run_dir))
            except FileNotFoundError:
                key = (0, 0.0, runs.is_running(run_dir))
            cached = self._cache.get(run_dir.name)
            if cached is None or cached[0] != key:
                cached = (key, runs.summarize(run_dir))
                self._cache[run_dir.name] = cached
            out.append(cached[1])
        self.post_message(self.Loaded(out))

    def on_runs_pane_loaded(self, message: Loaded) -> None:
        message.stop()
        # The run under the cursor stays under it when a new run comes in at the top (the list is
        # read again each time the pane is shown): by its id, not its row.
        before = self.selected()
        self.summaries = message.summaries
        table = self.query_one("#runs-table", DataTable)
        keep = table.cursor_row
        table.clear()
        names = short_ids([s.id for s in self.summaries])
        for s in self.summaries:
            status = Text(
                f"{STATUS_MARK.get(s.status, '·')} {s.status}", style=STATUS_STYLE.get(s.status, "")
            )
            loss = f"{s.last_loss:.4f}" if s.last_loss is not None and math.isfinite(s.last_loss) else "–"
            steps = f"{s.step}/{s.total_steps}" if s.total_steps else str(s.step)
            model = s.model.removeprefix("builtin:").rsplit("/", 1)[-1]
            table.add_row(
                "✓" if s.id in self.marked else "", status, names[s.id], steps, loss, model[:20], key=s.id
            )
        if self.summaries:
            ids = [x.id for x in self.summaries]
            row = ids.index(before.id) if before is not None and before.id in ids else keep
            table.move_cursor(row=min(row, len(self.summaries) - 1))
        table.border_subtitle = (
            f"{plural(len(self.summaries), 'runs')} · space marks · c compares" if self.summaries else ""
        )
        self.refresh_bindings()  # Resume and Stop follow the selected run's status
        empty = self.query_one("#runs-empty", Static)
        empty.display = not self.summaries
        empty.update(Text(f"No runs yet under {self.root}. Start one from Presets (1).", style="italic"))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The footer offers Stop for a running run only, Resume for one that can go on, and
        nothing that needs a run while the list is empty."""
        if action in ("open", "attach", "mark", "compare", "export"):
            return self.selected() is not None
        if action not in ("resume", "stop"):
            return True
        summary = self.selected()
        if summary is None:
            return False
        if action == "stop":
            return summary.status == "running"
        return summary.status not in ("running", "completed")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        self.refresh_bindings()

    def selected(self) -> runs.RunSummary | None:
        table = self.query_one("#runs-table", DataTable)
        if not self.summaries or table.cursor_row < 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return next((s for s in self.summaries if s.id == key), None)

    # ---- actions -----------------------------------------------------------------------------

    def request(self, action: str) -> None:
        """Act on the selected run (open, attach, resume, stop, export), or on the list."""
        if action == "compare":
            self.action_compare()
            return
        if action == "reload":
            self.reload()
            return
        summary = self.selected()
        if summary is None:
            self.notify("no run selected", severity="warning", timeout=2)
            return
        self.post_message(self.Open(summary.path, action))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.request("open")

    def action_open(self) -> None:
        self.request("open")

    def action_attach(self) -> None:
        self.request("attach")

    def action_resume(self) -> None:
        self.request("resume")

    def action_stop(self) -> None:
        self.request("stop")

    def action_export(self) -> None:
        self.request("export")

    def action_reload(self) -> None:
        self.reload()

    def action_mark(self) -> None:
        summary = self.selected()
        if summary is None:
            return
        self.marked ^= {summary.id}
        table = self.query_one("#runs-table", DataTable)
        table.update_cell(summary.id, "mark", "✓" if summary.id in self.marked else "")

    def action_compare(self) -> None:
        chosen = [s for s in self.summaries if s.id in self.marked]
        current = self.selected()
        if len(chosen) < 2 and current is not None and current not in chosen:
            chosen.append(current)  # one marked and the one under the cursor: a pair
        if len(chosen) < 2:
            self.notify("mark two or more runs with space, then press c", timeout=3)
            return
        dirs = [s.path for s in chosen]
        self.run_worker(
            lambda: self._compare(dirs), thread=True, exclusive=True, group="compare", exit_on_error=False
        )

    def _compare(self, dirs: list[Path]) -> None:
        histories = [load_history(d)[0] for d in dirs]
        self.post_message(self.Compared(histories))

    def on_runs_pane_compared(self, message: Compared) -> None:
        message.stop()
        chart = self.query_one("#compare-chart", LineChart)
        # Two runs of one minute read the same at minutes: to the second there.
        names = short_ids([h.run_id for h in message.histories])
        chart.set_series([ChartSeries(h.loss, names[h.run_id]) for h in message.histories])
        chart.show_legend()
        chart.display = True
        self.add_class("-comparing")
