"""The engine child process.

    python -m engine train  RUN_DIR     train the run described by RUN_DIR/config.yaml
    python -m engine resume RUN_DIR     continue it from its newest complete checkpoint
    python -m engine sample RUN_DIR --request JSON [--checkpoint NAME]
    python -m engine data   CONFIG.yaml prepare the data (progress events), then the report as one JSON line
    python -m engine export RUN_DIR [--checkpoint S] [--out DIR] [--dtype D] [--adapter-only] [--gguf T]
    python -m engine pull   --request JSON  download models and hub datasets ahead of time
    python -m engine standby --backend B --minutes M   a warm engine: B imported, waiting for a run

Events go to stdout, one JSON line each (and, for train/resume, to RUN_DIR/events.jsonl);
commands come in on stdin and through RUN_DIR/control.
"""

from __future__ import annotations

import argparse
import os
import signal
import stat
import sys
from pathlib import Path

from engine import allocator, protocol
from engine.errors import UserError
from engine.run import runs, standby


def _claim_stdout() -> os.PathLike | int:
    """Keep the real stdout for events only. Libraries print (progress bars, notices): point fd 1
    at stderr, which the launcher sends to RUN_DIR/engine.log, so nothing corrupts the stream."""
    events_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    return events_fd


EXIT_LIMIT_S = 120.0  # from the run's end to the process's: past it, stacks and exit


def _stall_s() -> float:
    from engine.run.distributed import Timeouts

    try:
        return Timeouts.from_env().stall_s
    except UserError:
        return Timeouts().stall_s  # the recipe reports the bad value as the run's error


def _train(run_dir: Path, resume: bool) -> int:
    from engine.run.control import CommandQueue
    from engine.run.distributed import RankLogSink, Ranks
    from engine.run.events import Emitter, FileSink, PipeSink
    from engine.train import watchdog

    ranks = Ranks.from_env()
    events_fd = _claim_stdout()
    if ranks.is_main:
        lock_fd = runs.acquire_lock(run_dir)  # noqa: F841 - held until the process exits
        emitter = Emitter([PipeSink(os.fdopen(events_fd, "wb")), FileSink(run_dir / runs.EVENTS)])
    else:
        # Rank 0 speaks for the run; the others write their errors and warnings as lines of their
        # stderr (engine.log).
        os.close(events_fd)
        emitter = Emitter([RankLogSink(ranks.rank)])
    # First: SIGUSR1 and stalls write every thread's stack to RUN_DIR/stacks-rank<R>.log.
    guard = watchdog.install(run_dir, ranks.rank, emitter.emit, _stall_s())
    commands = CommandQueue(emitter)

    signalled: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        if signalled:  # torchrun and the kernel may both deliver one: a single stop is enough
            return
        signalled.append(signum)
        emitter.log(f"received {signal.Signals(signum).name}: stopping at the next step and saving")
        commands.put(protocol.Stop())

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a lost terminal is no reason to stop
    for signum in standby.pending_signals:  # a stop that came while a warm engine took the launch
        on_signal(signum, None)
    standby.pending_signals.clear()
    guard.on_terminate()  # where a rank was when torchrun (or anyone) ended it: its stacks
    if ranks.distributed:
        from engine.train.collectives import die_with_parent

        die_with_parent()
    if ranks.is_main:
        # Only rank 0 reads commands (a FIFO has one reader); it hands them to the other ranks.
        if _stdin_is_a_pipe():  # a console that launched it (a detached launch has /dev/null)
            commands.read_stdin()
        commands.read_fifo(run_dir / runs.CONTROL)
    from engine.train.recipe import run

    try:
        return run(run_dir, emitter, commands, resume=resume, ranks=ranks)
    finally:
        emitter.close()
        guard.exiting(EXIT_LIMIT_S)  # a library's exit hook that hangs: stacks, then exit


def _stdin_is_a_pipe() -> bool:
    """Commands come down stdin only from the console that launched the run. A detached launch
    (`qlc train --detach`, `qlc resume --detach`) gives /dev/null, whose end at once logged
    "the console ... has let go of it", before the run's hello."""
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        return False


def _sample(run_dir: Path, request_json: str, checkpoint: str | None) -> int:
    from engine.run.events import Emitter, PipeSink
    from engine.train.sample_checkpoint import sample_checkpoint

    events_fd = _claim_stdout()
    emitter = Emitter([PipeSink(os.fdopen(events_fd, "wb"))])
    try:
        request = protocol.decode_command(request_json)
        if not isinstance(request, protocol.SampleRequest):
            raise UserError("--request: expected a sample command")
        return sample_checkpoint(run_dir, checkpoint, request, emitter)
    except (UserError, protocol.ProtocolError) as exc:
        hint = exc.hint if isinstance(exc, UserError) else ""
        emitter.emit(protocol.ErrorEvent(kind="input", message=getattr(exc, "message", str(exc)), hint=hint))
        return 2
    finally:
        emitter.close()


def _export(args: argparse.Namespace) -> int:
    from engine.export.job import main as export_main
    from engine.run.events import Emitter, PipeSink

    events_fd = _claim_stdout()
    emitter = Emitter([PipeSink(os.fdopen(events_fd, "wb"))])

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds into the export's cleanup: nothing half-written stays

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return export_main(args, emitter)
    finally:
        emitter.close()


def _pull(request_json: str) -> int:
    from engine.run.events import Emitter, PipeSink
    from engine.run.pull import PullRequest
    from engine.train.pull import run

    events_fd = _claim_stdout()
    emitter = Emitter([PipeSink(os.fdopen(events_fd, "wb"))])

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # stops the transfers at their next chunk; partial files stay

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return run(PullRequest.from_json(request_json), emitter)
    except UserError as exc:
        emitter.emit(protocol.ErrorEvent(kind="input", message=exc.message, hint=exc.hint))
        return 2
    except KeyboardInterrupt:
        emitter.emit(protocol.ErrorEvent(kind="interrupted", message="the download was interrupted"))
        return 130
    finally:
        emitter.close()


def _data(config: Path) -> int:
    from engine.run.events import PipeSink
    from engine.train.data_job import main as data_main

    sink = PipeSink(os.fdopen(_claim_stdout(), "wb"))
    try:
        return data_main(config, sink)
    finally:
        sink.close()


def _hand_over(args: argparse.Namespace) -> int | None:
    """A warm engine of this environment trains the run, this process relaying (engine.run.standby);
    None when none takes it. Starting cold, every idle one is stopped first: each holds GPU memory
    that the run's budget does not count."""
    from engine.run.distributed import Ranks

    if Ranks.from_env().distributed:
        standby.stop_all()
        return None
    argv = [args.mode, str(args.run_dir)]
    try:
        status = standby.hand_over(argv, os.environ, _asked_backend(args.run_dir), log=sys.stderr)
        if status is None:
            standby.stop_all()
    except OSError as exc:  # no private folder for standbys (someone else's /tmp/qlc-UID): cold
        print(f"qlc: no warm engine: {exc}", file=sys.stderr)
        return None
    return status


def _asked_backend(run_dir: Path) -> str | None:
    """The run's hardware.backend when it names one (only a standby of that one can serve it),
    None for auto or an unreadable config (a standby decides; the cold start reports the error)."""
    from engine import stacks
    from engine.config import load_resolved

    try:
        asked = load_resolved(run_dir / runs.CONFIG).hardware.backend
    except Exception:  # reported by whichever engine trains it
        return None
    return None if asked == stacks.AUTO else asked


def main(argv: list[str] | None = None, warm: bool = False) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine")
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("train", "resume"):
        sub.add_parser(mode).add_argument("run_dir", type=Path)
    sample = sub.add_parser("sample")
    sample.add_argument("run_dir", type=Path)
    sample.add_argument("--request", required=True)
    sample.add_argument("--checkpoint")
    data = sub.add_parser("data")
    data.add_argument("config", type=Path)
    from engine.export.job import add_arguments

    add_arguments(sub.add_parser("export"))
    sub.add_parser("pull").add_argument("--request", required=True)
    warm_parser = sub.add_parser("standby")
    warm_parser.add_argument("--backend", required=True)
    warm_parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.mode == "standby":
        from engine.train.warm import serve

        return serve(args.backend, args.minutes, lambda argv: main(argv, warm=True))
    if not warm:  # (a warm engine running its launch has done both for it)
        # The environment as launched, before anything edits it: a warm engine kept after this run
        # (engine.run.standby) starts with it, so that the next launch from the same place matches.
        standby.launch_env.clear()
        standby.launch_env.update(os.environ)
        if args.mode in ("train", "resume") and (status := _hand_over(args)) is not None:
            return status
    allocator.configure()  # before anything imports torch
    if args.mode in ("train", "resume"):
        return _train(args.run_dir, resume=args.mode == "resume")
    if args.mode == "sample":
        return _sample(args.run_dir, args.request, args.checkpoint)
    if args.mode == "export":
        return _export(args)
    if args.mode == "pull":
        return _pull(args.request)
    return _data(args.config)


if __name__ == "__main__":
    sys.exit(main())
