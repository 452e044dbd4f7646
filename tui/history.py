"""Everything the console knows about one run, folded from its events.

The same fold serves a live run (events from the child's pipe), an attached one (events.jsonl
tailed from an offset) and a finished one opened from the Runs pane, so the dashboard has one
source of truth whichever way the events arrived. Folding is O(1) per event; the charts' series
keep their own downsampling summaries.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from engine import protocol
from tui.budget import split_plan
from tui.launch_clock import LaunchClock
from tui.output import plural
from tui.widgets.series import Series

LOG_LINES = 2000  # the log pane keeps the newest lines; the events file keeps everything


@dataclass
class LogLine:
    elapsed: float  # seconds since the run's first engine started (its hello): stable across time zones and replays
    level: str  # info, warning, error, debug
    text: str


@dataclass
class SampleText:
    request_id: str
    prompt: str = ""
    source: str = "live"
    step: int | None = None
    text: str = ""
    done: bool = False
    new_tokens: int = 0
    seconds: float = 0.0
    stopped_by: str = ""
    run_id: str | None = None  # the run it samples: the Sample pane shows that run's replies only


@dataclass
class RunHistory:
    run_id: str = ""
    run_dir: Path | None = None
    hello: protocol.Hello | None = None
    stage: protocol.StageEvent | None = None
    model: protocol.ModelReady | None = None
    estimate: protocol.EstimateEvent | None = None
    data: protocol.DataReady | None = None
    last_step: protocol.Step | None = None
    finished: protocol.Finished | None = None
    errors: list[protocol.ErrorEvent] = field(default_factory=list)
    checkpoints: list[protocol.CheckpointSaved] = field(default_factory=list)
    samples: dict[str, SampleText] = field(default_factory=dict)
    log: deque[LogLine] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    loss: Series = field(default_factory=lambda: Series("loss"))
    eval_loss: Series = field(default_factory=lambda: Series("eval"))
    lr: Series = field(default_factory=lambda: Series("lr"))
    grad_norm: Series = field(default_factory=lambda: Series("grad norm"))
    tokens_per_s: Series = field(default_factory=lambda: Series("tokens/s"))
    peak_reserved_gb: float | None = None
    sessions: int = 0  # engine processes seen: 1 + resumes
    # Training time: the sessions before this one (each up to its last report), and this one's.
    earlier_sessions_s: float = 0.0
    session_s: float = 0.0
    events: int = 0
    log_total: int = 0  # lines ever logged: a view appends the ones past what it has shown
    _t0: float | None = None
    _clock: LaunchClock = field(default_factory=LaunchClock)

    # ------------------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """starting, training, completed, stopped, failed (of the newest engine session)."""
        if self.finished is not None:
            return self.finished.status
        if self.hello is None:
            return "created"
        if self.last_step is not None or (self.stage and self.stage.stage == "training"):
            return "training"
        return "starting"

    @property
    def step(self) -> int:
        """The newest step: a stop lands between logged steps, and `finished` says where."""
        logged = self.last_step.step if self.last_step else 0
        return max(logged, self.finished.step) if self.finished is not None else logged

    @property
    def total_steps(self) -> int:
        if self.last_step and self.last_step.total_steps:
            return self.last_step.total_steps
        return self.data.total_steps if self.data else 0

    def utilisation(self, step: protocol.Step | None = None) -> float | None:
        """Model FLOPs utilisation at `step` (default: the newest); see `utilisation`."""
        step = step or self.last_step
        return utilisation(step, self.estimate, self.hello) if step is not None else None

    @property
    def trained_s(self) -> float:
        """Seconds spent training over every session (a resume's clock starts at 0 again)."""
        return self.earlier_sessions_s + self.session_s

    def elapsed(self, event_time: float) -> float:
        return max(0.0, event_time - self._t0) if self._t0 is not None else 0.0

    # ------------------------------------------------------------------------------------------

    def apply_all(self, events: Iterable[protocol.Event]) -> None:
        for ev in events:
            self.apply(ev)

    def apply(self, ev: protocol.Event) -> None:
        self.events += 1
        if self._t0 is None and ev.time:
            # From the engine's start where its hello says it (the import time before the hello
            # counted nowhere: "model ready" read 00:02 after 4.7 s): the log's clock, and the
            # launch line's "N s after the engine started", then agree.
            started = ev.started if isinstance(ev, protocol.Hello) else 0.0
            self._t0 = started if 0 < started <= ev.time else ev.time
        launch = self._clock.feed(ev)
        if isinstance(ev, protocol.Step):
            self._step(ev)
            if launch:  # the one step that is logged: where the session's start went
                self._log(ev, "info", launch)
            return  # steps are charted, not logged: 20 a second would drown the log
        if isinstance(ev, protocol.Hello):
            self.hello, self.finished, self.sessions = ev, None, self.sessions + 1
            self.earlier_sessions_s, self.session_s = self.earlier_sessions_s + self.session_s, 0.0
            self.run_id = self.run_id or ev.run_id  # the run directory's name wins: it is what qlc resolves
            what = f"resumed from {ev.resumed_from}" if ev.resumed_from else ev.mode
            self._log(
                ev, "info", f"engine {ev.engine_version} {what} · {ev.backend or '?'} on {ev.device or '?'}"
            )
        elif isinstance(ev, protocol.StageEvent):
            self.stage = ev
            # An evaluation's progress shows on the progress line; its loss is logged (Eval).
            if ev.stage != "evaluating" and (ev.current == 0 or ev.current == ev.total):
                counter = f" ({ev.current}/{ev.total})" if ev.total else ""
                name = ev.stage.replace("_", " ")
                text = ev.message if ev.message.startswith(name.split()[0]) else f"{name}: {ev.message}"
                self._log(ev, "info", (text if ev.message else name) + counter)
        elif isinstance(ev, protocol.ModelReady):
            self.model = ev
            share = 100 * ev.trainable_params / ev.total_params if ev.total_params else 0
            self._log(
                ev,
                "info",
                f"model ready: {_count(ev.total_params)} params, {_count(ev.trainable_params)} trainable "
                f"({share:.2f}%) in {ev.load_seconds:.1f}s",
            )
            if ev.layers:
                what = f"checkpointing {ev.checkpointed_layers} of {ev.layers} layers"
                self._log(ev, "info", f"{what}: {ev.checkpoint_reason}" if ev.checkpoint_reason else what)
            if split := split_plan(ev):
                self._log(ev, "info", f"batch split: {split}")
            if ev.kernels:
                self._log(ev, "info", f"kernels: {', '.join(ev.kernels)}")
        elif isinstance(ev, protocol.EstimateEvent):
            self.estimate = ev
        elif isinstance(ev, protocol.DataReady):
            self.data = ev
            self._log(
                ev,
                "info",
                f"data: {ev.train_examples} examples, {_count(ev.train_tokens)} tokens/epoch, "
                f"{ev.total_steps} steps" + (f", {ev.truncated} truncated" if ev.truncated else ""),
            )
        elif isinstance(ev, protocol.Eval):
            self.eval_loss.truncate_before(ev.step)
            self.eval_loss.append(ev.step, ev.loss)
            self._log(ev, "info", f"eval at step {ev.step}: loss {ev.loss:.4f}")
        elif isinstance(ev, protocol.CheckpointSaved):
            self.checkpoints = [c for c in self.checkpoints if c.step != ev.step] + [ev]
            if ev.kept is not None:  # the ones train.save_total_limit rotated out are gone
                self.checkpoints = [c for c in self.checkpoints if c.step in ev.kept]
            self._log(ev, "info", f"saved {Path(ev.path).name} ({ev.size_mb:.1f} MB, {ev.seconds:.1f}s)")
        elif isinstance(ev, protocol.SampleStarted):
            # Update in place: the Sample pane may already hold this request's placeholder.
            sample = self.samples.setdefault(ev.request_id, SampleText(ev.request_id, run_id=self.run_id))
            sample.prompt, sample.source, sample.step = ev.prompt or sample.prompt, ev.source, ev.step
        elif isinstance(ev, protocol.SampleToken):
            sample = self.samples.setdefault(ev.request_id, SampleText(ev.request_id, run_id=self.run_id))
            sample.text += ev.text
        elif isinstance(ev, protocol.Sample):
            sample = self.samples.setdefault(ev.request_id, SampleText(ev.request_id, run_id=self.run_id))
            sample.prompt, sample.text, sample.source, sample.step = ev.prompt, ev.text, ev.source, ev.step
            sample.done, sample.new_tokens, sample.seconds, sample.stopped_by = (
                True,
                ev.new_tokens,
                ev.seconds,
                ev.stopped_by,
            )
            self._log(
                ev, "info", f"sample ({ev.source}, {plural(ev.new_tokens, 'tokens')}): {ev.text[:60]!r}"
            )
        elif isinstance(ev, protocol.Log):
            self._log(ev, ev.level, ev.message)
        elif isinstance(ev, protocol.WarningEvent):
            self._log(ev, "warning", ev.message + (f" — {ev.hint}" if ev.hint else ""))
        elif isinstance(ev, protocol.ErrorEvent):
            self.errors.append(ev)
            self._log(ev, "error", f"{ev.kind}: {ev.message}" + (f" — {ev.hint}" if ev.hint else ""))
        elif isinstance(ev, protocol.Finished):
            self.finished = ev
            self.session_s = max(self.session_s, ev.elapsed_seconds)
            ckpt = f", last checkpoint {Path(ev.last_checkpoint).name}" if ev.last_checkpoint else ""
            self._log(
                ev,
                "error" if ev.status == "failed" else "info",
                f"finished: {ev.status} at step {ev.step}{ckpt}",
            )

    def _step(self, ev: protocol.Step) -> None:
        if self.last_step is not None and ev.step <= self.last_step.step:
            # A resumed session logs again from its checkpoint: keep one curve, the newest.
            for series in (self.loss, self.lr, self.grad_norm, self.tokens_per_s, self.eval_loss):
                series.truncate_before(ev.step)
        self.last_step = ev
        self.session_s = max(self.session_s, ev.elapsed_seconds)
        self.loss.append(ev.step, ev.loss)
        self.lr.append(ev.step, ev.lr)
        self.grad_norm.append(ev.step, ev.grad_norm if ev.grad_norm is not None else math.nan)
        self.tokens_per_s.append(ev.step, ev.tokens_per_s)
        if ev.memory_peak_reserved_gb is not None:
            self.peak_reserved_gb = max(self.peak_reserved_gb or 0.0, ev.memory_peak_reserved_gb)

    def _log(self, ev: protocol.Event, level: str, text: str) -> None:
        self.log.append(LogLine(self.elapsed(ev.time), level, text))
        self.log_total += 1


def utilisation(
    step: protocol.Step, estimate: protocol.EstimateEvent | None, hello: protocol.Hello | None
) -> float | None:
    """The step's tokens/s times the estimate's FLOPs per token, over the cards' dense 16-bit
    peak: None off a GPU, or where the card's peak or the count is unknown."""
    if estimate is None or hello is None or "cuda" not in hello.device:
        return None
    from engine import memory  # on first use: the console starts without the memory model

    return memory.utilisation(
        step.tokens_per_s, estimate.flops_per_token, estimate.peak_tflops, hello.world_size
    )


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
