"""Following a run from the command line: events rendered as text lines, from the engine's pipe (a
run this command started) or from the run's events file (`qlc attach`)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from rich.markup import escape
from rich.text import Text

from engine import protocol
from engine.data import bad_records
from engine.run import runs
from tui.budget import split_plan
from tui.history import utilisation
from tui.launch_clock import LaunchClock
from tui.output import err, fmt_duration, fmt_progress, fmt_ranks, out, plural


def _num(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _loss(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4f}" if math.isfinite(x) else f"[bold red]{x}[/]"


class EventPrinter:
    """One line per event (sample tokens stream inline). `json_lines` prints the raw protocol."""

    # Long work reports progress several times a second; a printed line every few seconds is
    # enough for a terminal and keeps a log file (qlc train > log) readable.
    PROGRESS_EVERY_S = 5.0

    def __init__(self, json_lines: bool = False) -> None:
        self.json_lines = json_lines
        self.status: str | None = None
        self._in_sample = False
        self._clock = LaunchClock()
        # The session's hello and estimate: its device (a CPU run's estimate is for hardware.gpu)
        # and the figures utilisation needs.
        self._hello: protocol.Hello | None = None
        self._estimate: protocol.EstimateEvent | None = None
        self._progress_printed: dict[str, float] = {}  # stage -> when its last progress line was printed

    def _progress_due(self, ev: protocol.StageEvent) -> bool:
        """Whether to print this stage event: always its first and last, else every few seconds."""
        if ev.unit == "" and ev.rate is None:
            return True  # a plain stage change, not a progress report
        now = time.monotonic()
        last = self._progress_printed.get(ev.stage)
        if last is None or ev.current >= ev.total > 0 or now - last >= self.PROGRESS_EVERY_S:
            self._progress_printed[ev.stage] = now
            return True
        return False

    def skipped(self, ev: protocol.Event) -> None:
        """An event left out of the printed history: the launch breakdown still counts it (the
        session's first step is often among the hidden ones)."""
        launch = self._clock.feed(ev)
        if launch and not self.json_lines:
            out.print(f"[dim]{escape(launch)}[/]")

    def __call__(self, ev: protocol.Event) -> None:
        if self.json_lines:
            sys.stdout.buffer.write(protocol.encode(ev))
            sys.stdout.flush()
            if isinstance(ev, protocol.Finished):
                self.status = ev.status
            return
        if self._in_sample and not isinstance(ev, protocol.SampleToken):
            out.print()
            self._in_sample = False
        launch = self._clock.feed(ev)
        match ev:
            case protocol.Hello():
                self.status = None  # a new engine session: how the previous one ended is history
                self._hello, self._estimate = ev, None
                resumed = f" · resumed from {ev.resumed_from}" if ev.resumed_from else ""
                out.print(
                    f"[bold]run {ev.run_id}[/] · {ev.mode}{resumed} · backend [cyan]{ev.backend}[/] "
                    f"({escape(ev.backend_reason)}) · {escape(ev.device)}"
                    + (
                        " · [bold red]⚠ trust_remote_code: the model's own code runs[/]"
                        if ev.trust_remote_code
                        else ""
                    )
                )
                if ev.compute_dtype:
                    out.print(f"[dim]compute dtype {ev.compute_dtype}: {escape(ev.compute_dtype_reason)}[/]")
            case protocol.StageEvent():
                if not self._progress_due(ev):
                    return
                progress = fmt_progress(ev.current, ev.total, ev.unit, ev.rate, ev.eta_s)
                progress = f" {progress}" if progress else ""
                stage = ev.stage.replace("_", " ")
                said = _beyond_the_stage(stage, ev.message, ev.total)
                out.print(f"[dim]{stage}{progress}" + (f": {escape(said)}" if said else "") + "[/]")
            case protocol.ModelReady():
                pct = 100 * ev.trainable_params / max(ev.total_params, 1)
                mem = (
                    f" · {ev.memory_reserved_gb:.2f} GiB reserved"
                    if ev.memory_reserved_gb is not None
                    else ""
                )
                source = f" · {escape(ev.repo)}@{ev.commit[:12]}" if ev.repo and ev.commit else ""
                out.print(
                    f"model ready: {_num(ev.total_params)} params, {_num(ev.trainable_params)} trainable "
                    f"({pct:.2f}%) · loaded in {ev.load_seconds:.1f} s{mem}{source}"
                )
                if ev.layers:
                    out.print(
                        f"[dim]checkpointing {ev.checkpointed_layers} of {ev.layers} layers: "
                        f"{escape(ev.checkpoint_reason)}[/]"
                    )
                if split := split_plan(ev):
                    out.print(f"[dim]batch split: {escape(split)}[/]")
                if ev.kernels:
                    out.print(f"[dim]kernels: {escape(', '.join(ev.kernels))}[/]")
                # The weights' source is on the model-ready line, their quantization on the
                # quantizing stage's: a weights line would say both again.
            case protocol.EstimateEvent():
                self._estimate = ev
                # The figure the console's Memory pane and `qlc estimate` show: the whole device
                # (what nvidia-smi reports), for the checkpointing plan named.
                # On the CPU the figure is what the run would take on hardware.gpu, planned as
                # there: say so, or its checkpointing reads as contradicting the CPU run's own.
                on_cpu = self._hello is not None and self._hello.device.startswith("cpu")
                where = f" for {escape(ev.gpu)} (this run is on the CPU)" if on_cpu and ev.gpu else ""
                card = "" if where else f" on {escape(ev.gpu)}"
                budget = f" of {ev.budget_gb:.2f} GiB{card}" if ev.budget_gb else ""
                verdict = f" · {ev.verdict.replace('_', ' ')}" if ev.verdict else ""
                plan = f" · checkpointing {escape(ev.checkpoint_reason)}" if ev.checkpoint_reason else ""
                out.print(
                    f"memory estimate{where}: {ev.device_total_gb:.2f} GiB{budget} (torch peak "
                    f"{ev.torch_peak_gb:.2f}){verdict}{plan}"
                )
            case protocol.DataReady():
                out.print(
                    f"data: {ev.train_examples} train / {ev.eval_examples} eval examples · "
                    f"{_num(ev.train_tokens)} tokens/epoch ({_num(ev.trained_tokens)} trained) · "
                    f"{ev.steps_per_epoch} steps/epoch · {ev.truncated} truncated, {ev.dropped} dropped"
                    + (f", {bad_records(ev.skipped)} skipped" if ev.skipped else "")
                )
            case protocol.Step():
                total = f"/{ev.total_steps}" if ev.total_steps else ""
                gn = f"{ev.grad_norm:.3f}" if ev.grad_norm is not None else "-"
                mem = (
                    f" · {ev.memory_peak_reserved_gb:.2f} GiB peak"
                    if ev.memory_peak_reserved_gb is not None
                    else ""
                )
                if ev.devices:  # several GPUs (or processes): each rank's
                    mem = f" · {fmt_ranks(ev.devices)}"
                # The first step's rate is not measured (it includes warm-up): a dash, not 0.
                rate = f"{ev.tokens_per_s:,.0f} tok/s" if ev.tokens_per_s > 0 else "– tok/s"
                share = utilisation(ev, self._estimate, self._hello)
                if share is not None:  # on a GPU the catalog knows: the share of its peak
                    rate += f" · MFU {share:.0%}"
                line = (
                    f"step {ev.step:>5}{total}  loss {_loss(ev.loss)}  lr {ev.lr:.2e}  grad {gn}  "
                    f"{rate}  {ev.step_seconds:.2f} s/step  ETA {fmt_duration(ev.eta_seconds)}{mem}"
                )
                if out.is_terminal and Text.from_markup(line).cell_len > out.width:
                    # A narrow terminal: the same figures without the padding and labels, so each
                    # step stays one line.
                    line = (
                        f"{ev.step}{total} loss {_loss(ev.loss)} lr {ev.lr:.1e} gn {gn} "
                        f"{rate} ETA {fmt_duration(ev.eta_seconds)}{mem}"
                    )
                out.print(line)
                if launch:
                    out.print(f"[dim]{escape(launch)}[/]")
            case protocol.Eval():
                out.print(f"[magenta]eval  step {ev.step}: loss {_loss(ev.loss)}[/]")
            case protocol.CheckpointSaved():
                out.print(f"[green]checkpoint[/] step {ev.step} → {escape(ev.path)} ({ev.size_mb:.1f} MB)")
            case protocol.SampleStarted():
                out.print(
                    f"[bold]sample[/] ({ev.source}{f', step {ev.step}' if ev.step is not None else ''}) "
                    f"[dim]{escape(ev.prompt)}[/]"
                )
                out.print("  → ", end="")
                self._in_sample = True
            case protocol.SampleToken():
                out.print(escape(ev.text), end="")
                self._in_sample = True
            case protocol.Sample():
                out.print(
                    f"[dim]  ({plural(ev.new_tokens, 'tokens')} in {ev.seconds:.1f} s, stopped by {ev.stopped_by})[/]"
                )
            case protocol.Log():
                if ev.level in ("warning", "error"):
                    err.print(f"[yellow]{ev.level}:[/] {escape(ev.message)}")
                elif ev.level == "info":
                    out.print(f"[dim]{escape(ev.message)}[/]")
            case protocol.WarningEvent():
                err.print(
                    f"[yellow]warning:[/] {escape(ev.message)}" + (f" ({escape(ev.hint)})" if ev.hint else "")
                )
            case protocol.ErrorEvent():
                err.print(
                    f"[bold red]error ({ev.kind}):[/] {escape(ev.message)}"
                    + (f"\n  hint: {escape(ev.hint)}" if ev.hint else "")
                )
                for line in ev.advice:
                    err.print(f"  • {escape(line)}")
            case protocol.Finished():
                self.status = ev.status
                colour = {"completed": "green", "stopped": "yellow"}.get(ev.status, "red")
                where = (
                    f" · adapter {escape(ev.adapter_path)}"
                    if ev.adapter_path
                    else (f" · last checkpoint {escape(ev.last_checkpoint)}" if ev.last_checkpoint else "")
                )
                out.print(
                    f"[bold {colour}]{ev.status}[/] at step {ev.step} · final loss {_loss(ev.final_loss)} · "
                    f"{fmt_duration(ev.elapsed_seconds)}{where}"
                )


# `qlc train`'s exit code after a Ctrl-C (the shell's 128 + SIGINT): the run stopped and saved, or
# (a second Ctrl-C) is stopping. A script told it from a completed run's 0 only by reading events.
INTERRUPTED = 130


def exit_code(status: str | None) -> int:
    return 0 if status in ("completed", "stopped") else 1


def pipe_events(proc: subprocess.Popen[bytes]) -> Iterator[protocol.Event]:
    assert proc.stdout is not None
    first = True
    for line in proc.stdout:
        for ev in protocol.decode_lines(line):  # a line that is no event (a library's print) is skipped
            if first and isinstance(ev, protocol.Hello):
                protocol.check_hello(ev)
            first = False
            yield ev


def follow_child(proc: subprocess.Popen[bytes], run_dir: Path, printer: EventPrinter) -> int:
    """Print a launched run's events. Ctrl-C once: stop (the engine finishes its step, saves a
    checkpoint and exits); twice: stop waiting for that. The stop was already sent: the run still
    stops and saves, and `qlc attach` shows it. (Leaving a run training: `qlc train --detach`.)"""
    interrupts = 0
    busy = False  # the first Ctrl-C's handler is at work: a second one waits for it
    stop_sent = False

    def send_stop() -> None:
        # One write(2) of one short line: no buffer a KeyboardInterrupt could leave unflushed.
        nonlocal stop_sent
        if stop_sent:
            return
        try:
            assert proc.stdin is not None
            os.write(proc.stdin.fileno(), protocol.encode(protocol.Stop()))
        except (BrokenPipeError, OSError, ValueError):
            pass
        stop_sent = True

    def on_interrupt(_signum: int, _frame: object) -> None:
        # Python runs a handler between any two bytecodes, another handler's included: a second
        # Ctrl-C landing inside the first's print once raised before the stop was sent at all.
        nonlocal interrupts, busy
        interrupts += 1
        if interrupts > 1:
            if not busy:
                raise KeyboardInterrupt
            return  # the first handler raises it once the stop is sent
        busy = True
        try:
            send_stop()
            err.print(
                "[yellow]stopping: finishing the current step and saving a checkpoint "
                "(Ctrl-C again to stop waiting; the run still stops and saves)[/]"
            )
        finally:
            busy = False
        if interrupts > 1:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        for ev in pipe_events(proc):
            printer(ev)
    except KeyboardInterrupt:
        send_stop()  # never leave without the stop the first Ctrl-C asked for
        err.print(
            f"detached; the run is stopping and saving a checkpoint. See it end with: qlc attach {run_dir.name}"
        )
        return INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, previous)
    proc.wait()
    if printer.status is None:
        from engine.run.launcher import start_failure

        # The reason is in the log: torchrun's own failure, or another rank's one-line error.
        err.print(f"[red]{escape(ended_without_finishing(run_dir, proc.returncode, start_failure(proc)))}[/]")
        return 1
    if interrupts and printer.status == "stopped":
        return INTERRUPTED  # stopped by this Ctrl-C and saved: not the 0 of a run that completed
    return exit_code(printer.status)


def ended_without_finishing(run_dir: Path, returncode: int | None = None, reason: str = "") -> str:
    """One line for an engine that died without its `finished` event: why, where its log is, and
    how to go on (resume from the newest checkpoint, or start again)."""
    code = f" ({returncode})" if returncode is not None else ""
    code += f": {reason}" if reason else ""
    done = runs.checkpoints(run_dir)
    if done:
        how = f"`qlc resume {run_dir.name}` continues it from {done[-1].name}"
    else:
        how = "it saved no checkpoint: start it again with `qlc train`"
    return f"the engine exited{code} without finishing; see {run_dir / runs.ENGINE_LOG}; {how}"


def follow_file(run_dir: Path, printer: EventPrinter, tail: int | None = 20) -> int:
    """`qlc attach`: the history (all but the oldest step lines beyond `tail`), then live events
    until the run finishes. Ctrl-C detaches and never stops the run."""
    history, offset = runs.read_events(run_dir)
    steps = [i for i, ev in enumerate(history) if isinstance(ev, protocol.Step)]
    hidden = set(steps[: len(steps) - tail]) if tail is not None and len(steps) > tail else set()
    for i, ev in enumerate(history):
        if i not in hidden:
            printer(ev)
            continue
        if i == steps[0]:  # where the steps start, after the run's header
            out.print(f"[dim]… {len(hidden)} earlier step events (--tail to see more)[/]")
        printer.skipped(ev)
    try:
        while runs.is_running(run_dir):
            events, offset = runs.read_events(run_dir, offset)
            for ev in events:
                printer(ev)
            time.sleep(0.2)
        events, offset = runs.read_events(run_dir, offset)
        for ev in events:
            printer(ev)
    except KeyboardInterrupt:
        err.print("detached; the run goes on.")
        return 0
    if printer.status is None:
        # Its last engine session has no `finished`: it crashed (or was killed), here or before.
        err.print(f"[red]{escape(ended_without_finishing(run_dir))}[/]")
        return 1
    return exit_code(printer.status)


def iter_file_from(run_dir: Path, offset: int, timeout: float) -> Iterable[protocol.Event]:
    """New events after `offset` while the run is alive, for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events, offset = runs.read_events(run_dir, offset)
        yield from events
        if not runs.is_running(run_dir):
            return
        time.sleep(0.1)


def _beyond_the_stage(stage: str, message: str, total: int | None) -> str:
    """What the message says beyond the stage line's own words and count: "training 0/2000", not
    "training 0/2000: training 2000 steps"; "saving: the final adapter". A message that only
    begins with the stage's letters keeps them ("preparing data: preparing databricks/...")."""
    if message == stage:
        return ""
    if not message.startswith(stage + " "):
        return message
    rest = message.removeprefix(stage + " ")
    return "" if rest == f"{total} steps" else rest
