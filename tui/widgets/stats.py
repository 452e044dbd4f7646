"""The numbers beside the loss chart: learning rate, grad norm and throughput (with a sparkline of
their history), and the memory the estimate promised against what the run actually reserved."""

from __future__ import annotations

import math
from typing import ClassVar

from rich.text import Text
from textual.widget import Widget

from tui.history import RunHistory
from tui.output import fmt_ranks
from tui.widgets.line_chart import format_sci, format_value
from tui.widgets.series import Series

BLOCKS = "▁▂▃▄▅▆▇█"
LABEL = 11


def sparkline(series: Series, width: int) -> str:
    """The series' recent shape in `width` cells, downsampled like the charts (cost ~ width)."""
    if width <= 0 or not len(series):
        return ""
    cols = [c.hi for c in series.columns(width)]
    finite = [v for v in cols if math.isfinite(v)]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    span = (hi - lo) or 1.0
    return "".join(BLOCKS[min(7, int((v - lo) / span * 7.999))] if math.isfinite(v) else " " for v in cols)


def _norm(value: float | None) -> str:
    """A gradient norm at a fixed two decimals under 100 (2.00 beside 1.78, not 2 beside 1.781)."""
    if value is None:
        return "–"
    return f"{value:.2f}" if math.isfinite(value) and abs(value) < 100 else format_value(value)


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _gb(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def memory_figures(est_gb: float | None, peak: float | None, room: int) -> tuple[str, str]:
    """(the torch peak the estimate promised against the one reserved, how far over) in at most
    `room` cells: the most precise spelling that fits, so a narrow panel never cuts a figure."""
    over = f" +{100 * (peak / est_gb - 1):.0f}%" if est_gb and peak and peak > est_gb * 1.1 else ""

    def fmt(v: float | None, spec: str) -> str:
        return "–" if v is None else format(v, spec)

    spellings = [
        f"est {fmt(est_gb, '.2f')} · peak {fmt(peak, '.2f')}",
        f"est {fmt(est_gb, '.1f')} · peak {fmt(peak, '.1f')}",
        f"est {fmt(est_gb, '.1f')} · pk {fmt(peak, '.1f')}",
        f"{fmt(est_gb, '.0f')} est · {fmt(peak, '.0f')} pk",
    ]
    for text in spellings:
        if len(text) + len(over) <= room:
            return text, over
    return spellings[-1], over


class RunStats(Widget):
    COMPONENT_CLASSES: ClassVar[set[str]] = {"run-stats--label", "run-stats--spark", "run-stats--warn"}

    DEFAULT_CSS = """
    RunStats { height: auto; text-wrap: nowrap; text-overflow: ellipsis; }
    RunStats > .run-stats--label { color: $text-muted; }
    RunStats > .run-stats--spark { color: $accent; }
    RunStats > .run-stats--warn { color: $warning; text-style: bold; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._history: RunHistory | None = None

    def show(self, history: RunHistory | None) -> None:
        self._history = history
        height = self.get_content_height(None, None, 0)  # type: ignore[arg-type]
        # A layout pass costs far more than a repaint: only when the number of rows changes.
        self.refresh(layout=height != getattr(self, "_height", None))
        self._height = height

    def get_content_height(self, container, viewport, width: int) -> int:  # type: ignore[override]
        h = self._history
        return 6 if h is not None and h.hello is not None and h.hello.device.startswith("cpu") else 5

    def _memory_row(self, est_gb: float | None, peak: float | None, width: int) -> Text:
        # Torch's peak reserved memory, estimated and measured: the calculator is judged on it.
        text, over = memory_figures(est_gb, peak, max(0, width - LABEL))
        row = Text.assemble(
            (f"{'torch GiB':<{LABEL}}", self.get_component_rich_style("run-stats--label")),
            text,
            no_wrap=True,
            overflow="crop",
        )
        if over:  # the estimate was low: say by how much
            row.append(over, self.get_component_rich_style("run-stats--warn"))
        return row

    def render(self) -> Text:
        h = self._history
        label = self.get_component_rich_style("run-stats--label")
        spark = self.get_component_rich_style("run-stats--spark")
        width = self.content_size.width
        last = h.last_step if h else None

        def row(name: str, value: str, series: Series | None = None) -> Text:
            line = Text.assemble((f"{name:<{LABEL}}", label), value, no_wrap=True, overflow="crop")
            room = width - line.cell_len - 1
            if series is not None and room >= 4:
                line.append(" ")
                line.append(sparkline(series, min(room, 16)), spark)
            return line

        if h is None or last is None:
            rows = [row("lr", "–"), row("grad norm", "–"), row("tokens/s", "–"), row("step", "–")]
        else:
            rows = [
                row("lr", format_sci(last.lr), h.lr),
                row("grad norm", _norm(last.grad_norm), h.grad_norm),
                row("tokens/s", _count(last.tokens_per_s) + _mfu(h.utilisation(last)), h.tokens_per_s),
                row("step", f"{last.step_seconds:.2f} s · Σ{_count(last.tokens_seen)} tok"),
            ]
        estimate = h.estimate if h else None
        est_gb = estimate.torch_peak_gb if estimate and estimate.torch_peak_gb else None
        peak = h.peak_reserved_gb if h else None
        rows.append(self._memory_row(est_gb, peak, width))
        # "cpu", or "2 x cpu (gloo, ddp)" for several processes
        on_cpu = h is not None and h.hello is not None and "cpu" in h.hello.device.split(" (")[0]
        if on_cpu:  # on a GPU run the GPU's memory (below) is what matters; on a CPU run, RAM
            rss = last.host_rss_gb if last else (h.model.host_rss_gb if h.model else None)
            rows.append(row("host RSS", f"{_gb(rss)} GiB"))
        if last is not None and last.devices:  # several GPUs (or processes): each rank's
            rows.append(row("per rank", fmt_ranks(last.devices)))
        out = Text("\n").join(rows)
        out.no_wrap, out.overflow = True, "crop"  # join() makes a fresh Text that would wrap
        return out


def _mfu(share: float | None) -> str:
    """ " · MFU 41%": the share of the card's dense 16-bit peak (engine.memory.flops)."""
    return f" · MFU {share:.0%}" if share is not None else ""
