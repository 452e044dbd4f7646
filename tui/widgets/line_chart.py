"""A terminal line chart drawn in braille dots (2x4 per cell), downsampled by column.

Each series is folded to one min/max/last triple per dot column (see `series.Series.columns`),
so drawing costs the same for 100 points and 100,000. A column draws the vertical span of its
points joined to the previous column, which keeps spikes visible that averaging would hide.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from rich.style import Style
from rich.text import Text
from textual.reactive import reactive
from textual.strip import Strip
from textual.widget import Widget

from tui.widgets.series import Column, Series

_BRAILLE = 0x2800
# Dot bits by (dot column within the cell, dot row within the cell).
_DOTS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
GUTTER = 7  # y-axis labels
POINT = "•"


@dataclass
class ChartSeries:
    series: Series
    label: str
    kind: Literal["line", "points"] = "line"


def format_value(value: float) -> str:
    """At most 6 characters, so axis labels fit the gutter: 3.644, 0.003, 5.7e-7, 1.2e+5."""
    if not math.isfinite(value):
        return "–"
    text = f"{value:.4g}"
    if len(text) > 6 or "e" in text:
        text = f"{value:.3g}"
    if len(text) > 6 or "e" in text:
        mantissa, exponent = f"{value:.1e}".split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def format_sci(value: float) -> str:
    """Always in powers of ten, two figures: a learning rate reads 2.0e-4, 3.0e-3, 9.4e-4 along a
    schedule, where format_value switched between 0.0015 and 3.0e-3 from one step to the next."""
    if not math.isfinite(value):
        return "–"
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def format_x(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    return f"{value:.0f}"


class LineChart(Widget):
    """A braille line chart of one or more series sharing an x axis (steps)."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "line-chart--axis",
        "line-chart--empty",
        *(f"line-chart--series-{i}" for i in range(6)),
    }

    DEFAULT_CSS = """
    LineChart { height: 1fr; min-height: 4; text-wrap: nowrap; text-overflow: clip; }
    LineChart > .line-chart--axis { color: $text-muted; }
    LineChart > .line-chart--empty { color: $text-muted; text-style: italic; }
    LineChart > .line-chart--series-0 { color: $success; }
    LineChart > .line-chart--series-1 { color: $warning; }
    LineChart > .line-chart--series-2 { color: $accent; }
    LineChart > .line-chart--series-3 { color: $error; }
    LineChart > .line-chart--series-4 { color: $primary; }
    LineChart > .line-chart--series-5 { color: $secondary; }
    """

    log_scale: reactive[bool] = reactive(False)
    """Plot log10(y): a loss falling over orders of magnitude stays readable."""

    def __init__(
        self,
        empty_text: str = "no data yet",
        *,
        format_y: Callable[[float], str] = format_value,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self._series: list[ChartSeries] = []
        self.empty_text = empty_text
        self.format_y = format_y  # the axis labels' and the legend's numbers
        self._legend_shown = False  # show_legend: the legend in the lower border
        self._cache_key: tuple | None = None
        self._cache: list[Strip] | None = None

    def set_series(self, series: Sequence[ChartSeries]) -> None:
        self._series = list(series)
        self._cache = None
        self.refresh()

    @property
    def series(self) -> list[ChartSeries]:
        return self._series

    def watch_log_scale(self) -> None:
        self.refresh()

    def legend(self) -> Text:
        """Each series' label and last value, in the series' own colour: in grey, nothing told
        which line of a comparison was which run. Where the border is too narrow for it (the
        loss chart at 60 columns cut "eval 3.6…", the number that matters), the gaps close and
        then the labels shorten: the values stay whole."""
        shown = [(i, item) for i, item in enumerate(self._series) if len(item.series)]
        room = self.size.width - 6  # the corners and the border's "─ " either side
        for gap, label_len in (("  ", None), (" ", None), (" ", 2), (" ", 1)):
            legend = Text()
            for i, item in shown:
                if legend:
                    legend.append(gap)
                style = self.get_component_rich_style(f"line-chart--series-{i % 6}")
                label = item.label if label_len is None else item.label[:label_len]
                legend.append(f"{label} {self.format_y(item.series.last_y)}", style=style)
            if room <= 0 or legend.cell_len <= room:
                break
        return legend

    def show_legend(self) -> None:
        """The legend in the chart's lower border, kept to its width as the chart resizes."""
        self._legend_shown = True
        self.border_subtitle = self.legend()

    def on_resize(self) -> None:
        if self._legend_shown:
            self.border_subtitle = self.legend()

    def render_line(self, y: int) -> Strip:
        """Line API: the chart is drawn once per change into cached strips, one per row, so a
        repaint of anything else on screen costs nothing here."""
        width, height = self.content_size
        key = (width, height, self.log_scale, tuple((id(s.series), s.series.version) for s in self._series))
        if key != self._cache_key or self._cache is None:
            base = self.rich_style
            text = self._draw(width, height)
            lines = text.split("\n", allow_blank=True)
            console = self.app.console
            self._cache = [
                Strip(list(line.render(console)), line.cell_len).apply_style(base).crop_extend(0, width, base)
                for line in lines[:height]
            ]
            self._cache_key = key
        return self._cache[y] if y < len(self._cache) else Strip.blank(width, self.rich_style)

    # -----------------------------------------------------------------------------------------

    def _transform(self) -> Callable[[float], float]:
        if self.log_scale:
            return lambda v: math.log10(v) if v > 0 and math.isfinite(v) else math.nan
        return lambda v: v if math.isfinite(v) else math.nan

    def _draw(self, width: int, height: int) -> Text:
        plot_w, plot_h = width - GUTTER, height - 1  # leave the gutter and the x-axis row
        drawn = [s for s in self._series if len(s.series)]
        if plot_w < 4 or plot_h < 1 or not drawn:
            return Text(self.empty_text, style=self.get_component_rich_style("line-chart--empty"))
        f = self._transform()
        dots_w, dots_h = plot_w * 2, plot_h * 4

        # Fold every series to the dot columns first; the y range comes from the folded extremes.
        folded: list[tuple[int, ChartSeries, list[Column]]] = []
        x0 = min(s.series.xs[0] for s in drawn)
        x1 = max(s.series.last_x for s in drawn)
        span_x = (x1 - x0) or 1.0
        y_lo, y_hi = math.inf, -math.inf
        for index, item in enumerate(self._series):
            if not len(item.series):
                continue
            share = max(1, round(dots_w * ((item.series.last_x - x0) / span_x)))
            cols = [
                Column(c.x, f(c.lo), f(c.hi), f(c.last))
                for c in item.series.columns(share if len(item.series) > 1 else 1)
            ]
            folded.append((index, item, cols))
            for c in cols:
                if math.isfinite(c.lo):
                    y_lo = min(y_lo, c.lo)
                if math.isfinite(c.hi):
                    y_hi = max(y_hi, c.hi)
        if not math.isfinite(y_lo):
            return Text(self.empty_text, style=self.get_component_rich_style("line-chart--empty"))
        if y_hi - y_lo < 1e-12:
            # A flat line (one point, or the lr at 0 in warm-up): an axis around it, never below
            # 0 for a quantity that is not (it read "1 … -1" for an lr of 0).
            pad = abs(y_hi) * 0.05 or 1.0
            y_lo, y_hi = (y_lo - pad if y_lo < 0 else max(0.0, y_lo - pad)), y_hi + pad
        span_y = y_hi - y_lo

        def dot_row(v: float) -> int:
            return min(dots_h - 1, max(0, round((y_hi - v) / span_y * (dots_h - 1))))

        def dot_col(x: float) -> int:
            return min(dots_w - 1, max(0, round((x - x0) / span_x * (dots_w - 1))))

        # cells[row][col] = (braille bits, style index of the top-most series there, point glyph?)
        bits = [[0] * plot_w for _ in range(plot_h)]
        owner = [[-1] * plot_w for _ in range(plot_h)]
        points: dict[tuple[int, int], int] = {}

        def plot(dc: int, r0: int, r1: int, index: int) -> None:
            if r0 > r1:
                r0, r1 = r1, r0
            cell_c, sub_c = divmod(dc, 2)
            for r in range(r0, r1 + 1):
                cell_r, sub_r = divmod(r, 4)
                bits[cell_r][cell_c] |= _DOTS[sub_c][sub_r]
                owner[cell_r][cell_c] = index

        for index, item, cols in folded:
            if item.kind == "points":
                for c in cols:
                    if math.isfinite(c.last):
                        points[(dot_row(c.last) // 4, dot_col(c.x) // 2)] = index
                continue
            prev_col, prev_row = -1, -1
            for c in cols:
                if not math.isfinite(c.lo):
                    prev_col = -1  # a gap (NaN) breaks the line
                    continue
                dc = dot_col(c.x)
                lo_r, hi_r, last_r = dot_row(c.lo), dot_row(c.hi), dot_row(c.last)
                if prev_col >= 0 and dc > prev_col + 1:
                    # Sparse points: a straight segment across the empty dot columns between them.
                    first_r = dot_row(c.lo) if c.lo == c.hi else last_r
                    for step in range(prev_col + 1, dc):
                        t = (step - prev_col) / (dc - prev_col)
                        r = round(prev_row + (first_r - prev_row) * t)
                        plot(step, r, r, index)
                top, bottom = min(lo_r, hi_r), max(lo_r, hi_r)
                if prev_col >= 0 and dc == prev_col + 1:
                    top, bottom = min(top, prev_row), max(bottom, prev_row)
                plot(dc, top, bottom, index)
                prev_col, prev_row = dc, last_r

        styles = [
            self.get_component_rich_style(f"line-chart--series-{i % 6}") for i in range(len(self._series))
        ]
        axis = self.get_component_rich_style("line-chart--axis")
        inverse = self.log_scale
        bold, blank = Style(bold=True), Style()
        labels = {0: y_hi, plot_h - 1: y_lo}
        if plot_h >= 5:
            labels[(plot_h - 1) // 2] = y_lo + span_y * (plot_h - 1 - (plot_h - 1) // 2) / (plot_h - 1)
        text = Text(no_wrap=True, overflow="crop")
        for r in range(plot_h):
            if r in labels:
                value = 10 ** labels[r] if inverse else labels[r]
                text.append(f"{self.format_y(value):>{GUTTER - 1}}┤", axis)
            else:
                text.append(" " * (GUTTER - 1) + "│", axis)
            # Runs of cells with one style become one span: far fewer segments to paint.
            run_style: Style | None = None
            run: list[str] = []
            for c in range(plot_w):
                if (r, c) in points:
                    ch, style = POINT, styles[points[(r, c)]] + bold
                elif bits[r][c]:
                    ch, style = chr(_BRAILLE + bits[r][c]), styles[owner[r][c]]
                else:
                    ch, style = " ", blank
                if style is not run_style and run:
                    text.append("".join(run), run_style)
                    run = []
                run_style = style
                run.append(ch)
            if run:
                text.append("".join(run), run_style)
            text.append("\n")
        # The x axis: first and last step, and the middle when there is room.
        axis_row = [" "] * plot_w
        left, right = format_x(x0), format_x(x1)
        axis_row[: len(left)] = left
        axis_row[plot_w - len(right) :] = right
        middle = format_x((x0 + x1) / 2)
        if x1 == x0:  # one point so far: one label
            axis_row = [" "] * plot_w
            axis_row[: len(left)] = left
        elif plot_w > len(left) + len(right) + len(middle) + 6:
            start = (plot_w - len(middle)) // 2
            axis_row[start : start + len(middle)] = middle
        text.append(" " * (GUTTER - 1) + "└", axis)
        text.append("".join(axis_row)[:plot_w], axis)
        return text
