"""The downsampling series and the braille chart: correct extremes, cost independent of length."""

from __future__ import annotations

import math
import random

import pytest
from rich.text import Text
from textual.app import App, ComposeResult

from tui.widgets.line_chart import ChartSeries, LineChart
from tui.widgets.series import Series


def _chart_text(chart: LineChart) -> str:
    return "\n".join(chart.render_line(y).text for y in range(chart.content_size.height))


class _ChartApp(App[None]):
    """One chart on a screen of its own."""

    def compose(self) -> ComposeResult:
        yield LineChart(id="chart")


def _series(values: list[float]) -> Series:
    s = Series()
    for i, v in enumerate(values, 1):
        s.append(i, v)
    return s


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 65, 1000, 4097, 30_001])
@pytest.mark.parametrize("width", [1, 3, 40, 160])
def test_columns_keep_every_extreme(n: int, width: int) -> None:
    rng = random.Random(n * 1000 + width)
    values = [rng.uniform(-5, 5) for _ in range(n)]
    cols = _series(values).columns(width)
    assert 1 <= len(cols) <= min(n, width)
    assert min(c.lo for c in cols) == min(values)
    assert max(c.hi for c in cols) == max(values)
    assert cols[-1].x == n and cols[-1].last == values[-1]
    assert [c.x for c in cols] == sorted(c.x for c in cols)


def test_nan_is_a_gap_not_an_extreme() -> None:
    s = _series([1.0, math.nan, 3.0, math.inf, 2.0] * 20)
    cols = s.columns(10)
    assert min(c.lo for c in cols) == 1.0 and max(c.hi for c in cols) == 3.0
    assert s.extent() == (1.0, 3.0)


def test_truncate_rebuilds_summaries() -> None:
    values = [float(i % 17) for i in range(5000)]
    s = _series(values)
    s.truncate_before(1001)  # a resumed run re-logs from step 1001
    assert len(s) == 1000
    for i in range(1001, 1201):
        s.append(i, 100.0)
    cols = s.columns(50)
    assert max(c.hi for c in cols) == 100.0 and cols[-1].x == 1200


class Folded:
    """How many values the series has folded into minima and maxima (through _extremes)."""

    count = 0


@pytest.fixture
def folded(monkeypatch: pytest.MonkeyPatch) -> Folded:
    """Count the work of folding points into columns, instead of timing it: the suite stays
    deterministic on a busy machine (bench/ times the console)."""
    from tui.widgets import series as series_module

    counter = Folded()
    real = series_module._extremes

    def counting(lo_values, hi_values):
        counter.count += len(lo_values)
        return real(lo_values, hi_values)

    monkeypatch.setattr(series_module, "_extremes", counting)
    return counter


def test_columns_fold_a_bounded_number_of_values(folded: Folded) -> None:
    """Folding 100k points into 200 columns touches a few values per column (the summary blocks),
    not the points."""
    big = _series([math.sin(i) for i in range(100_000)])  # its summaries, built as points arrive
    folded.count = 0
    columns = big.columns(200)
    assert len(columns) == 200 and 0 < folded.count <= 16 * 200


async def test_drawing_100k_points_folds_as_few_values_as_drawing_a_few_hundred(folded: Folded) -> None:
    """The chart's cost depends on its width, not on the series' length: count the values the
    series folds into columns for one draw."""
    from textual.app import App

    class ChartApp(App[None]):
        def compose(self):
            yield LineChart(id="chart")

    counts = {}
    for n in (300, 100_000):
        app = ChartApp()
        async with app.run_test(size=(120, 30)) as pilot:
            chart = app.query_one(LineChart)
            chart.set_series([ChartSeries(_series([2 + math.exp(-i / n * 5) for i in range(n)]), "loss")])
            await pilot.pause()
            chart._cache_key = None
            folded.count = 0
            text = _chart_text(chart)
            counts[n] = folded.count
            assert any(0x2800 < ord(ch) <= 0x28FF for ch in text)
    width = 2 * 120  # braille: two dot columns per cell, at most
    assert counts[300] > 0 and 0 < counts[100_000] <= 16 * width, counts
    assert counts[100_000] < 10 * counts[300], counts


async def test_log_scale_labels_are_real_values() -> None:
    app = _ChartApp()
    async with app.run_test(size=(60, 12)) as pilot:
        chart = app.query_one(LineChart)
        chart.set_series([ChartSeries(_series([10 ** (-i / 50) for i in range(200)]), "loss")])
        chart.log_scale = True
        await pilot.pause()
        text = _chart_text(chart)
        assert "1┤" in text and "0.0" in text  # 10**0 at the top, 10**-3.98 at the bottom


async def test_a_flat_line_at_zero_has_no_negative_axis() -> None:
    """The learning-rate chart of a run at its first step (lr 0 in warm-up) read `1 … -1`."""
    app = _ChartApp()
    async with app.run_test(size=(60, 12)) as pilot:
        chart = app.query_one(LineChart)
        chart.set_series([ChartSeries(_series([0.0]), "lr")])
        await pilot.pause()
        text = _chart_text(chart)
        assert "-1" not in text and "1┤" in text and "0┤" in text


def test_a_learning_rate_keeps_one_notation_along_its_schedule() -> None:
    """format_value switched a cosine schedule between 0.0015, 3.0e-3 and 0.0029 from one step to
    the next; the lr chart and the stats row read powers of ten throughout."""
    from tui.widgets.line_chart import format_sci

    assert [format_sci(v) for v in (0.0015, 0.00299, 0.0029, 2e-4, 9.4e-4)] == [
        "1.5e-3", "3.0e-3", "2.9e-3", "2.0e-4", "9.4e-4",
    ]  # fmt: skip
    assert format_sci(0.0) == "0" and format_sci(float("nan")) == "–"


def test_a_gradient_norm_keeps_two_decimals() -> None:
    from tui.widgets.stats import _norm

    assert [_norm(v) for v in (2.0, 1.781, 0.5, None)] == ["2.00", "1.78", "0.50", "–"]
    assert _norm(1234.5) == "1234"  # format_value above 100


async def test_the_legend_keeps_its_values_whole_in_a_narrow_chart() -> None:
    """The loss chart at 60 columns cut its legend to "train 3.644  eval 3.6…": the gaps close and
    the labels shorten before any value does."""
    train, evals = Series(), Series()
    train.append(1, 3.644)
    evals.append(1, 3.627)

    class One(App):
        def compose(self) -> ComposeResult:
            yield LineChart(id="c")

    app = One()
    async with app.run_test(size=(60, 10)) as pilot:
        chart = app.query_one(LineChart)
        chart.set_series([ChartSeries(train, "train"), ChartSeries(evals, "eval")])
        chart.show_legend()
        await pilot.pause()
        assert Text.from_markup(str(chart.border_subtitle)).plain == "train 3.644  eval 3.627"
        # The legend in the border follows the chart's width as the window resizes.
        await pilot.resize_terminal(27, 10)
        await pilot.pause()
        assert Text.from_markup(str(chart.border_subtitle)).plain == "tr 3.644 ev 3.627"
        await pilot.resize_terminal(60, 10)
        await pilot.pause()
        assert Text.from_markup(str(chart.border_subtitle)).plain == "train 3.644  eval 3.627"
