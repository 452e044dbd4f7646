"""Two lines about where a run is: who and what state, then a bar with step, epoch, time and ETA.
A run that failed says why on the first line; one that ended before its first step says where it
stopped instead of an empty bar."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rich.text import Text
from textual.widget import Widget

from tui.history import RunHistory
from tui.output import fmt_progress

STATUS_MARK = {
    "training": "▶",
    "running": "▶",  # the Runs list's word for a run whose engine is up: the dashboard's ▶
    "starting": "…",
    "completed": "✓",
    "stopped": "■",
    "failed": "✗",
    "crashed": "✗",
    "stopping": "■",
    "created": "·",
}
ENDED = ("completed", "stopped", "failed", "crashed")  # nothing more will arrive from the engine
FAILED = ("failed", "crashed")


@dataclass(frozen=True)
class Failure:
    """Why a run failed, in one line, and what its engine advised."""

    reason: str
    hint: str = ""


def failure(history: RunHistory | None, status: str) -> Failure | None:
    """The newest engine error of a failed (or crashed) run's latest session; None for a run that
    did not fail. An engine that died before saying hello stays "created", with the client's
    crash report as its only error: that is a failure too."""
    if history is None:
        return None
    hello = history.hello
    # Errors of earlier sessions (a resume that failed before) are not this session's reason.
    # The console's own crash report carries no time: it is always this session's.
    errors = [e for e in history.errors if not e.time or hello is None or e.time >= hello.time]
    if status not in FAILED and not (status == "created" and errors):
        return None
    if errors:
        ev = errors[-1]
        # One line each: a message of several lines would push the bar out of the widget's two.
        return Failure(" ".join((ev.message or ev.kind.replace("_", " ")).split()), " ".join(ev.hint.split()))
    if status == "crashed":
        return Failure("the engine exited without finishing")
    return Failure("the engine gave no reason", "its log (engine.log) is in the run directory")


def never_trained(history: RunHistory | None, status: str) -> tuple[str, str] | None:
    """How a run that ended before its first step ended, and in which stage ("" when none had
    begun); None for a run that trained, or still may."""
    if history is None or history.last_step is not None or history.step:
        return None
    failed = failure(history, status)
    if status not in ENDED and failed is None:
        return None
    verb = "failed" if failed is not None and status not in FAILED else status
    if verb == "completed":
        verb = "ended"
    stage = history.stage.stage.replace("_", " ") if history.stage is not None else ""
    return f"{verb} before the first step", f"while {stage}" if stage else ""


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
        "run-progress--error",
    }

    DEFAULT_CSS = """
    RunProgress { height: 2; text-wrap: nowrap; text-overflow: ellipsis; }
    RunProgress > .run-progress--done { color: $success; }
    RunProgress > .run-progress--todo { color: $surface-lighten-2; }
    RunProgress > .run-progress--title { text-style: bold; }
    RunProgress > .run-progress--status-ok { color: $success; text-style: bold; }
    RunProgress > .run-progress--status-bad { color: $error; text-style: bold; }
    RunProgress > .run-progress--muted { color: $text-muted; }
    RunProgress > .run-progress--error { color: $error; }
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
        failed = failure(h, status)
        ended_early = never_trained(h, status)
        bad = failed is not None
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
        error = self.get_component_rich_style("run-progress--error")
        # Why it failed, before the device: what a person opens a failed run to see. A run that
        # never trained says it on the second line instead, where the reason has the whole width.
        if failed is not None and ended_early is None:
            top.append(f"  {failed.reason}", error)
        if h.hello and h.hello.device:
            top.append(f"  {h.hello.backend or ''} {h.hello.device}", muted)
        if stage:
            top.append(f"  {stage}", muted)

        step, total = h.step, h.total_steps
        last = h.last_step
        if ended_early is not None:  # it will never train: why, instead of an empty bar at 0/?
            out = Text("\n").join([top, self._never_trained(ended_early, failed)])
            out.no_wrap = True
            return out
        details = f" {step}/{total or '?'}"
        if last is not None:
            # Time spent training (the log's stamps count from the engine's start, loading too).
            details += f"  ep {last.epoch:.2f}  trained {format_duration(h.trained_s)}"
            if status == "training" and last.eta_seconds is not None:
                details += f"  ETA {format_duration(last.eta_seconds)}"
        bar_width = max(5, width - len(details))
        fraction = min(1.0, step / total) if total else 0.0
        done = round(fraction * bar_width)
        bottom = Text(no_wrap=True, overflow="crop")
        # Two glyphs, not only two colours: the bar reads under NO_COLOR.
        # A failed run's bar is in the error colour: where it stopped, not how far it got.
        done_style = error if failed is not None else self.get_component_rich_style("run-progress--done")
        bottom.append("━" * done, done_style)
        bottom.append("─" * (bar_width - done), self.get_component_rich_style("run-progress--todo"))
        bottom.append(details)
        out = Text("\n").join([top, bottom])
        out.no_wrap = True
        return out

    def _never_trained(self, ended: tuple[str, str], failed: Failure | None) -> Text:
        """The second line of a run that ended before its first step: why and what to do, or (a
        run stopped while it loaded) how it ended and where."""
        line = Text(no_wrap=True, overflow="ellipsis")
        if failed is not None:
            line.append(failed.reason, self.get_component_rich_style("run-progress--error"))
            if failed.hint:
                line.append(f" · {failed.hint}")
        else:
            line.append(", ".join(filter(None, ended)), self.get_component_rich_style("run-progress--muted"))
        return line
