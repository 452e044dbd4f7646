"""The trainer's link to the outside: step, eval and checkpoint events out, commands in.

`EngineCallback` turns the trainer's logs into protocol events, applies commands at optimizer-step
boundaries (stop, save, sample), and refuses to save a checkpoint once the loss is no longer
finite. What it learns (a stop, a failure, the last loss) it leaves in a RunState
(engine.train.state) the recipe reads when training ends. Imported in the engine child only, after the backend's `prepare`
(transformers).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from engine import protocol
from engine.run import checkpoints, runs
from engine.run.distributed import Ranks
from engine.run.events import Emitter
from engine.train import collectives, failures
from engine.train.sampling import generate
from engine.train.state import EvalInterrupted, RunState
from engine.train.usage import cuda_memory, host_rss_gb, reset_peak_memory


@dataclass(frozen=True)
class Context:
    """Where the callback reports and what it samples with."""

    emitter: Emitter
    commands: Any  # a CommandQueue, or collectives.SharedCommands on several ranks
    tokenizer: Any
    template: str
    ranks: Ranks = field(default_factory=Ranks)
    device: str = "cpu"
    sharded: bool = False  # FSDP: every rank takes part in a sample
    chat: bool = True  # prompts go through the chat template (False: the run trained on plain text)


class Pace:
    """Seconds per step and tokens per second since the last log, and an ETA that the run's
    pauses (evaluations, saves) do not swing.

    The ETA divides the time since the first log by the steps since: evaluations and saves
    recur, so their share of that mean is what the rest of the run will pay too. An average of the
    intervals swung with each one: on the CPU demo (2 steps a log, an evaluation of seconds), the
    ETA went 24m, 12m, 22m, 8m within 20 seconds. The first interval (warm-up, compiles) is not
    counted; live samples are not training time (exclude)."""

    def __init__(self) -> None:
        self.last_time = 0.0
        self.last_step = 0
        self.last_tokens = 0
        self.since: tuple[float, int] | None = None  # (time, step) of the first log
        self.step_seconds: float | None = None

    def start(self, step: int) -> None:
        self.last_step, self.last_time = step, time.perf_counter()
        self.since, self.step_seconds = None, None

    def exclude(self, seconds: float) -> None:
        """Time spent on something that is not training (a live sample)."""
        self.last_time += seconds
        if self.since is not None:
            self.since = (self.since[0] + seconds, self.since[1])

    def update(self, step: int, tokens: int) -> tuple[float, float]:
        """(seconds per step, tokens per second) since the last update."""
        now = time.perf_counter()
        seconds = (now - self.last_time) / max(step - self.last_step, 1)
        tok_s = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9) if self.last_tokens else 0.0
        if self.since is None:
            self.since, self.step_seconds = (now, step), seconds
        elif step > self.since[1]:
            self.step_seconds = (now - self.since[0]) / (step - self.since[1])
        self.last_time, self.last_step, self.last_tokens = now, step, tokens
        return seconds, tok_s

    def eta(self, remaining_steps: int) -> float:
        return remaining_steps * (self.step_seconds or 0.0)


class EvalProgress:
    """Where an evaluation is, batch by batch: reported at its first and last batch and every
    few seconds between (an eval split can take minutes)."""

    EVERY_S = 2.0

    def __init__(self) -> None:
        self.batches = 0
        self.started = 0.0
        self.shown = 0.0

    def advance(self) -> bool:
        """Count a batch; whether to report it."""
        now = time.monotonic()
        if self.batches == 0:
            self.started = now
        self.batches += 1
        if self.batches == 1 or now - self.shown >= self.EVERY_S:
            self.shown = now
            return True
        return False

    def rate(self) -> float | None:
        seconds = time.monotonic() - self.started
        return (self.batches - 1) / seconds if self.batches > 1 and seconds > 0 else None


class EngineCallback(TrainerCallback):
    def __init__(self, context: Context, state: RunState) -> None:
        self.ctx = context
        self.state = state
        self.pace = Pace()
        self.eval = EvalProgress()
        self.deferred: list[protocol.Message] = []  # commands that came during an evaluation

    # ---- the trainer's hooks ----------------------------------------------------------------

    def on_train_begin(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
        reset_peak_memory()  # the peaks a step reports are training's, not the load's
        self.state.total_steps = st.max_steps
        self.state.first_step = st.global_step
        self.pace.start(st.global_step)
        self.ctx.emitter.emit(
            protocol.StageEvent(
                stage="training",
                message=f"training {st.max_steps} steps",
                current=st.global_step,
                total=st.max_steps,
            )
        )

    def on_step_end(self, args: Any, st: Any, control: Any, model: Any = None, **kw: Any) -> None:
        commands, self.deferred = [*self.deferred, *self.ctx.commands.drain()], []
        for command in commands:
            if isinstance(command, protocol.Stop):
                self._stop(command, st, control)
            elif isinstance(command, protocol.Save):
                control.should_save = True
            elif isinstance(command, protocol.SampleRequest):
                self._sample(command, st, model)
        if st.global_step >= st.max_steps or control.should_training_stop:
            # The last step's loss is logged even off the logging interval: a run that completes
            # at step 5 with logging_steps 2 reports step 5 and its loss, not step 4's.
            control.should_log = True

    def on_prediction_step(
        self, args: Any, st: Any, control: Any, eval_dataloader: Any = None, **kw: Any
    ) -> None:
        """Each evaluation batch: progress, and the commands a person sends meanwhile. A stop
        ends the evaluation (EvalInterrupted, caught by the trainer's evaluate) and the run, as
        at a step boundary; a save or a sample waits for the next step."""
        if self.eval.advance():
            try:
                total = len(eval_dataloader) if eval_dataloader is not None else 0
            except TypeError:  # an iterable dataset: no length
                total = 0
            rate = self.eval.rate()
            eta = (total - self.eval.batches) / rate if rate and total else None
            self.ctx.emitter.emit(
                protocol.StageEvent(
                    stage="evaluating",
                    message=f"eval at step {st.global_step}",
                    current=self.eval.batches,
                    total=total,
                    unit="batches",
                    rate=rate,
                    eta_s=eta,
                )
            )
        for command in self.ctx.commands.drain():  # every rank drains at every batch: in step
            if isinstance(command, protocol.Stop):
                self._stop(command, st, control)
                self.ctx.emitter.log(f"eval at step {st.global_step} interrupted by the stop")
                self.eval = EvalProgress()
                # Done with: the trainer clears this flag only after an evaluation that finished,
                # and would evaluate again at the epoch's end.
                control.should_evaluate = False
                raise EvalInterrupted
            self.deferred.append(command)

    def on_evaluate(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
        self._eval_done(st)

    def _eval_done(self, st: Any) -> None:
        """The evaluation's last progress line (all its batches), once. The Trainer logs the eval
        loss before it calls on_evaluate: emitted from there too, the line comes before the loss."""
        if self.eval.batches:
            n = self.eval.batches
            self.ctx.emitter.emit(
                protocol.StageEvent(
                    stage="evaluating",
                    message=f"eval at step {st.global_step}",
                    current=n,
                    total=n,
                    unit="batches",
                )
            )
        self.eval = EvalProgress()

    def on_log(
        self, args: Any, st: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
    ) -> None:
        logs = logs or {}
        if "eval_loss" in logs:
            self._eval_done(st)
            self._emit_eval(st.global_step, logs["eval_loss"])
        if "loss" in logs:
            loss = float(logs["loss"])
            self._emit_step(st, loss, logs)
            self._check_finite(st, control, loss, logs)

    def on_save(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
        path = Path(args.output_dir) / f"{runs.CHECKPOINT_PREFIX}{st.global_step}"
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
        self.state.last_checkpoint = path.name
        # The trainer rotated old checkpoints out before this hook: say which are left, so that no
        # console offers to sample or export one that is gone.
        kept = tuple(
            s for s in (checkpoints.step_of(c) for c in checkpoints.complete(path.parent)) if s is not None
        )
        self.ctx.emitter.emit(
            protocol.CheckpointSaved(step=st.global_step, path=str(path), size_mb=size / 2**20, kept=kept)
        )

    # ---- commands ---------------------------------------------------------------------------

    def _stop(self, command: protocol.Stop, st: Any, control: Any) -> None:
        if self.state.stop_requested:  # a second console's stop, or a second Ctrl-C
            self.ctx.emitter.log("already stopping", level="debug")
            return
        self.state.stop_requested = True
        control.should_training_stop = True
        control.should_save = command.save
        self.ctx.emitter.log(
            f"stopping after step {st.global_step}" + (", saving a checkpoint" if command.save else "")
        )

    def _sample(self, request: protocol.SampleRequest, st: Any, model: Any) -> None:
        ctx = self.ctx
        if not collectives.samples_here(ctx.ranks, ctx.sharded):
            return
        t0 = time.perf_counter()
        generate(
            model,
            ctx.tokenizer,
            request,
            ctx.emitter,
            source="live",
            step=st.global_step,
            template=ctx.template,
            chat=ctx.chat,
            # Sharded ranks generate together: the same draws keep them in step.
            seed=st.global_step if ctx.sharded else None,
        )
        self.pace.exclude(time.perf_counter() - t0)  # sampling is not training time

    # ---- events -----------------------------------------------------------------------------

    def _emit_eval(self, step: int, loss: float) -> None:
        perplexity = math.exp(loss) if loss < 50 else None
        self.ctx.emitter.emit(protocol.Eval(step=step, loss=loss, perplexity=perplexity))

    def _emit_step(self, st: Any, loss: float, logs: dict[str, float]) -> None:
        # The trainer's exact count (engine.train.backends.safe_trainer), restored on resume; TRL's
        # own only where a patched training loop skipped it.
        tokens = int(logs.get("num_input_tokens_seen") or logs.get("num_tokens", 0))
        seconds, tok_s = self.pace.update(st.global_step, tokens)
        rss = host_rss_gb()
        ctx = self.ctx
        devices = collectives.gather_devices(ctx.ranks, ctx.device, rss)  # every rank calls: a collective
        ctx.emitter.emit(
            protocol.Step(
                step=st.global_step,
                total_steps=st.max_steps,
                epoch=float(st.epoch or 0.0),
                loss=loss,
                lr=float(logs.get("learning_rate", 0.0)),
                grad_norm=logs.get("grad_norm"),
                tokens_seen=tokens,
                tokens_per_s=tok_s,
                step_seconds=seconds,
                elapsed_seconds=time.time() - self.state.started,
                eta_seconds=self.pace.eta(max(st.max_steps - st.global_step, 0)),
                host_rss_gb=rss,
                devices=devices,
                **cuda_memory(),
            )
        )

    def _check_finite(self, st: Any, control: Any, loss: float, logs: dict[str, float]) -> None:
        if math.isfinite(loss):
            self.state.last_loss = loss
            return
        # Keep the last good checkpoint: never save weights trained on a non-finite loss.
        first = int(logs.get("nonfinite_since_step", st.global_step))
        self.state.failure = failures.nonfinite_loss(loss, first, st.global_step)
        control.should_training_stop = True
        control.should_save = False
