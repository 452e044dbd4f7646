"""The Dashboard pane: the run being watched, alive at a glance.

It draws from a `RunHistory` and is told when the history changed; it never reads events itself,
so a live run, an attached one and a finished one opened from its file look the same.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.timer import Timer
from textual.widgets import RichLog, Static

from engine.data import bad_records
from tui.history import LogLine, RunHistory
from tui.views import RunView
from tui.widgets.gpu import GpuPanel, Probe
from tui.widgets.line_chart import ChartSeries, LineChart, format_sci
from tui.widgets.progress import RunProgress, format_duration, never_trained
from tui.widgets.stats import RunStats

LEVEL_MARK = {"info": " ", "debug": "·", "warning": "!", "error": "✗"}
LOG_REPLAY = 300  # lines written to the log view when a run is opened
LOG_VIEW_LINES = 1000  # the most the log view holds
REDRAW_SECONDS = 0.5
# What the charts say before they have a point, for a run that may still train. One that never
# will says how it ended instead (progress.never_trained).
WAITING = ("waiting for the first step…", "no learning rate yet")
NO_LR = "no learning rate"
_NOT_SHOWN = object()  # the checkpoints box before its first draw


def format_log_line(line: LogLine, one_line: bool = False) -> Table:
    """The time, the level's mark, and the message, which wraps under itself (a hanging indent:
    a wrapped path or warning read as lines of their own at column 0). `one_line`: the message
    cut to the row instead (under 22 rows, where a 2-row log following its tail showed a wrapped
    message's last rows, without its stamp or start)."""
    m, s = divmod(int(line.elapsed), 60)
    h, m = divmod(m, 60)
    stamp = f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
    style = {"warning": "bold yellow", "error": "bold red", "debug": "dim"}.get(line.level, "")
    head = Text.assemble((stamp, "dim"), " ", (LEVEL_MARK.get(line.level, " "), style), " ")
    grid = Table.grid()
    grid.add_column(no_wrap=True, min_width=head.cell_len)  # the stamp is never the part cut
    grid.add_column(overflow="ellipsis" if one_line else "fold", no_wrap=one_line)
    grid.add_row(head, Text(line.text, style=style))
    return grid


class Dashboard(Vertical):
    """Progress, loss and learning-rate charts, metrics, GPU, checkpoints and the event log."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("x", "app.stop_run", "Stop"),
        Binding("v", "app.save_checkpoint", "Save now"),
        Binding("l", "toggle_log_scale", "Log scale"),
        Binding("d", "app.detach_run", "Detach"),
    ]

    def __init__(self, gpu_probe: Probe | None = None, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._gpu_probe = gpu_probe
        self._history: RunHistory | None = None
        self._log_shown = 0
        self._log_first = 0  # the first line the log view holds (of the run's count)
        self._log_follows = True  # the log shows its tail as lines come (_log_scrolled)
        self._status = ""
        self._drawn_status: str | None = None
        self._last_draw = 0.0
        self._pending: Timer | None = None
        self._checkpoints_shown: object = _NOT_SHOWN
        self._log_width: int | None = None  # the log's width when its lines were last wrapped
        self._log_tiny = False  # whether they were written one row each (under 22 rows)

    def compose(self) -> ComposeResult:
        yield RunProgress(id="progress")
        with Horizontal(id="dash-top"):
            yield LineChart(WAITING[0], id="loss-chart")
            with Vertical(id="dash-side"):
                yield RunStats(id="stats")
                yield GpuPanel(self._gpu_probe, id="gpu")
        with Horizontal(id="dash-mid"):
            yield LineChart(WAITING[1], id="lr-chart", format_y=format_sci)
            yield Static(id="checkpoints")
        # Wrapped at the box's own width: a long line (an error, where the start went) stays whole
        # at 80 columns. RichLog's default min_width (78) renders wider than the box there, cutting
        # a character at every wrap and growing a horizontal scrollbar that takes one of its rows.
        yield RichLog(
            id="event-log", max_lines=LOG_VIEW_LINES, wrap=True, min_width=1, markup=False, highlight=False
        )

    def on_mount(self) -> None:
        self.query_one("#loss-chart", LineChart).border_title = "loss"
        self.query_one("#lr-chart", LineChart).border_title = "learning rate"
        self.query_one("#dash-side").border_title = "metrics"
        self.query_one("#checkpoints", Static).border_title = "checkpoints"
        self.query_one("#event-log", RichLog).border_title = "log"
        self.show(None, "")
        self.watch(self.app, "run_view", self._follow, init=False)
        self.watch(self.query_one("#event-log", RichLog), "scroll_y", self._log_scrolled, init=False)

    def _log_scrolled(self) -> None:
        """Whether the log follows its tail, as the log last moved: a person scrolling up stops it,
        reaching the bottom (or the tail written) starts it again. Judged when it moves, not when
        lines come: a smaller window leaves the view where it was with more below it, which read
        as "scrolled up", and the log stopped following."""
        log = self.query_one("#event-log", RichLog)
        self._log_follows = log.max_scroll_y == 0 or log.is_vertical_scroll_end

    def _follow(self, view: RunView) -> None:
        """The App's watched run: another run is shown whole, the same one as it grows."""
        if view.history is not self._history:
            self.show(view.history, view.status)
        else:
            self.changed(view.status)

    # ---- drawing ----------------------------------------------------------------------

    def show(self, history: RunHistory | None, status: str) -> None:
        """Switch to another run (or none): everything redrawn, the log replayed from its tail."""
        self._history = history
        loss = self.query_one("#loss-chart", LineChart)
        lr = self.query_one("#lr-chart", LineChart)
        if history is None:
            loss.set_series([])
            lr.set_series([])
        else:
            loss.set_series(
                [ChartSeries(history.loss, "train"), ChartSeries(history.eval_loss, "eval", kind="points")]
            )
            lr.set_series([ChartSeries(history.lr, "lr")])
        log = self.query_one("#event-log", RichLog)
        log.clear()
        self._log_shown, self._log_follows = 0, True
        self._checkpoints_shown = _NOT_SHOWN
        self._drawn_status = None
        if history is not None:
            self._log_shown = max(0, history.log_total - LOG_REPLAY)
        self._log_first = self._log_shown
        self.changed(status)

    def changed(self, status: str) -> None:
        """The history grew. Redraws are coalesced to REDRAW_SECONDS: a person reads a chart at a
        glance, and repainting it for each of 20 events a second would cost a good share of a
        core. A change of status (finished, stopping) is drawn at once."""
        self._status = status
        since = time.monotonic() - self._last_draw
        if status != self._drawn_status or since >= REDRAW_SECONDS:
            self._redraw()
        elif self._pending is None:
            self._pending = self.set_timer(REDRAW_SECONDS - since, self._redraw)

    def _redraw(self) -> None:
        if self._pending is not None:
            self._pending.stop()
            self._pending = None
        self._last_draw = time.monotonic()
        status = self._drawn_status = self._status
        h = self._history
        self.query_one(RunProgress).show(h, status)
        self.query_one(RunStats).show(h)
        loss = self.query_one("#loss-chart", LineChart)
        lr = self.query_one("#lr-chart", LineChart)
        loss.refresh()
        lr.refresh()
        scale = " (log)" if loss.log_scale else ""
        loss.border_title = f"loss{scale}"
        loss.show_legend()
        lr.border_subtitle = format_sci(h.lr.last_y) if h is not None and len(h.lr) else ""
        ended = never_trained(h, status)
        texts = ("\n".join(filter(None, ended)), NO_LR) if ended else WAITING
        for chart, text in zip((loss, lr), texts, strict=True):
            if chart.empty_text != text:
                chart.empty_text = text
                chart.set_series(chart.series)  # drops the chart's drawn cache, keyed on its data
        self._show_checkpoints(h)
        # What data.bad_records: skip left out stays in sight: its warning line scrolls out of a
        # 3-line log (80x24) within a few steps.
        skipped = h.data.skipped if h is not None and h.data is not None else 0
        self.query_one("#event-log", RichLog).border_subtitle = (
            f"[bold yellow]{bad_records(skipped)} skipped[/]" if skipped else ""
        )
        if h is not None:
            self._append_log(h)
            if h.hello is not None and h.hello.device.startswith("cuda:"):
                index = h.hello.device.split()[0].removeprefix("cuda:")
                if index.isdigit():
                    self.query_one(GpuPanel).select_device(int(index))

    def _show_checkpoints(self, h: RunHistory | None) -> None:
        shown = tuple(c.step for c in h.checkpoints) if h is not None else None
        if shown == self._checkpoints_shown:
            return  # Static.update lays the screen out again: only when the list changed
        self._checkpoints_shown = shown
        box = self.query_one("#checkpoints", Static)
        if h is None or not h.checkpoints:
            box.update(Text("none yet", style="dim italic"))
            return
        lines = []
        # In columns: names, sizes and times line up (checkpoint-80 beside checkpoint-120).
        rows = [
            (
                Path(c.path).name,
                f"{c.size_mb:.0f} MB" if c.size_mb >= 10 else f"{c.size_mb:.1f} MB",
                format_duration(h.elapsed(c.time)),
            )
            for c in reversed(h.checkpoints)
        ]
        name_w = max(len(r[0]) for r in rows)
        size_w = max(len(r[1]) for r in rows)
        for name, size, when in rows:
            line = Text.assemble(f"{name:<{name_w}}", (f"  {size:>{size_w}}  {when}", "dim"))
            line.no_wrap, line.overflow = True, "ellipsis"
            lines.append(line)
        box.update(Text("\n").join(lines))

    def on_show(self) -> None:
        # The lines that came while another pane was shown (_append_log waits for a width).
        self.call_after_refresh(self._catch_up_log)

    def _catch_up_log(self) -> None:
        if self._history is not None:
            self._append_log(self._history)

    def on_resize(self) -> None:
        # RichLog wraps a line once, at the width it was written at: after the terminal is made
        # narrower its lines ran past the box (cut), after wider they kept their short rows.
        self.call_after_refresh(self._rewrap_log)

    def _rewrap_log(self) -> None:
        log = self.query_one("#event-log", RichLog)
        width = log.scrollable_content_region.width
        tiny = self.screen.has_class("-tiny")
        if (width == self._log_width and tiny == self._log_tiny) or width <= 0:
            return
        drawn, self._log_width, self._log_tiny = self._log_width, width, tiny
        h = self._history
        if drawn is None or h is None:
            return  # the first layout: nothing written at another width yet
        # Written again at the new width: every line the view held, and where it was scrolled
        # (a person reading further up stays about there; clear() had sent them to the tail).
        follow = self._log_follows
        fraction = log.scroll_y / log.max_scroll_y if log.max_scroll_y else 1.0
        log.clear()
        self._log_follows = follow  # (clearing scrolled it to the top)
        self._log_first = self._log_shown = max(
            self._log_first, h.log_total - min(len(h.log), LOG_VIEW_LINES)
        )
        self._append_log(h, follow)
        if not follow:
            self.call_after_refresh(
                lambda: log.scroll_to(y=round(fraction * log.max_scroll_y), animate=False)
            )

    def _append_log(self, h: RunHistory, follow: bool | None = None) -> None:
        fresh = h.log_total - self._log_shown
        if fresh <= 0:
            return
        log = self.query_one("#event-log", RichLog)
        if log.scrollable_content_region.width <= 0:
            # Hidden behind another pane: RichLog would wrap the lines at no width ("…" rows
            # when the pane came back); on_show writes them.
            return
        lines = list(h.log)[-min(fresh, len(h.log)) :]
        # Follow the tail only from the bottom: a person who scrolled up to read stays there.
        if follow is None:
            # Or all of it fits: no scrollbar says "scrolled up" (grown until it fit, from the top).
            follow = self._log_follows or log.max_scroll_y == 0
        one_line = self.screen.has_class("-tiny")
        for line in lines:
            log.write(format_log_line(line, one_line), scroll_end=follow)
        self._log_shown = h.log_total

    def action_toggle_log_scale(self) -> None:
        chart = self.query_one("#loss-chart", LineChart)
        chart.log_scale = not chart.log_scale
        self._redraw()
