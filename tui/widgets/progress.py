"""Two lines about where a run is: who and what state, then a bar with step, epoch, time and ETA."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.widget import Widget

from tui.history import RunHistory
from tui.output import fmt_progress

STATUS_MARK = {
    "training": "▶",
    "starting": "…",
    "completed": "✓",
    "stopped": "■",
    "failed": "✗",
    "crashed": "✗",
    "stopping": "■",
    "created": "·",
}


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "–"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class RunProgress(Widget):
    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "run-progress--done",
        "run-progress--todo",
        "run-progress--title",
        "run-progress--status-ok",
        "run-progress--status-bad",
        "run-progress--muted",
    }

    DEFAULT_CSS = """
    RunProgress { height: 2; text-wrap: nowrap; text-overflow: ellipsis; }
    RunProgress > .run-progress--done { color: $success; }
    RunProgress > .run-progress--todo { color: $surface-lighten-2; }
    RunProgress > .run-progress--title { text-style: bold; }
    RunProgress > .run-progress--status-ok { color: $success; text-style: bold; }
    RunProgress > .run-progress--status-bad { color: $error; text-style: bold; }
    RunProgress > .run-progress--muted { color: $text-muted; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._history: RunHistory | None = None
        self._status = ""

    def show(self, history: RunHistory | None, status: str) -> None:
        self._history, self._status = history, status
        self.refresh()

    def render(self) -> Text:
        h = self._history
        muted = self.get_component_rich_style("run-progress--muted")
        if h is None:
            return Text.assemble(
                ("No run being watched.", self.get_component_rich_style("run-progress--title")),
                ("\nStart one from Presets (1) or open one from Runs (4).", muted),
            )
        width = max(20, self.content_size.width)
        status = self._status
        bad = status in ("failed", "crashed")
        status_style = self.get_component_rich_style(
            "run-progress--status-bad" if bad else "run-progress--status-ok"
        )
        stage = ""
        evaluating = h.stage is not None and h.stage.stage == "evaluating" and h.stage.current < h.stage.total
        if (status == "starting" or (status == "training" and evaluating)) and h.stage is not None:
            stage = h.stage.stage.replace("_", " ")
            progress = fmt_progress(h.stage.current, h.stage.total, h.stage.unit, h.stage.rate, h.stage.eta_s)
            if progress:
                stage += f" {progress}"
            if h.stage.message:
                stage += f": {h.stage.message}"
        top = Text(no_wrap=True, overflow="ellipsis")
        top.append(f"{STATUS_MARK.get(status, '·')} {status}", status_style)
        top.append("  ")
        top.append(h.run_id, self.get_component_rich_style("run-progress--title"))
        if h.hello and h.hello.trust_remote_code:  # before the device: never cut off
            top.append("  ⚠ remote code", self.get_component_rich_style("run-progress--status-bad"))
        if h.hello and h.hello.device:
            top.append(f"  {h.hello.backend or ''} {h.hello.device}", muted)
        if stage:
            top.append(f"  {stage}", muted)

        step, total = h.step, h.total_steps
        last = h.last_step
        details = f" {step}/{total or '?'}"
        if last is not None:
            details += f"  ep {last.epoch:.2f}  {format_duration(h.trained_s)}"
            if status == "training" and last.eta_seconds is not None:
                details += f"  ETA {format_duration(last.eta_seconds)}"
        bar_width = max(5, width - len(details))
        fraction = min(1.0, step / total) if total else 0.0
        done = round(fraction * bar_width)
        bottom = Text(no_wrap=True, overflow="crop")
        # Two glyphs, not only two colours: the bar reads under NO_COLOR.
        bottom.append("━" * done, self.get_component_rich_style("run-progress--done"))
        bottom.append("─" * (bar_width - done), self.get_component_rich_style("run-progress--todo"))
        bottom.append(details)
        out = Text("\n").join([top, bottom])
        out.no_wrap = True
        return out
