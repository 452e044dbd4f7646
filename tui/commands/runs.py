"""`qlc runs`, `qlc attach RUN`, `qlc stop RUN`: find runs, follow one, stop one."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from engine import protocol
from engine.errors import UserError
from engine.run import distributed, runs
from tui.follow import EventPrinter, follow_file
from tui.output import err, out, print_json, print_unpadded

STATUS_STYLE = {
    "running": "bold cyan",
    "completed": "green",
    "stopped": "yellow",
    "failed": "red",
    "crashed": "red",
    "created": "dim",
}
MIN_ERROR_WIDTH = 16  # of a failed run's error in `qlc runs`: "CUDA out of mem…"; less says nothing
# And at most this, in a wide terminal or a pipe: every row is padded to the error column's width,
# so one long error made the whole table that wide; `--json` has the errors whole.
MAX_ERROR_WIDTH = 100
# How a run that is not running ended, as the end of "the newest, RUN, …".
ENDED = {"created": "has not started", "stopped": "was stopped"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="list runs with their status")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=run_list)

    a = sub.add_parser("attach", help="follow a run's events (its whole history, then live) until it ends")
    a.add_argument("run", help="run id (or a unique part of it, or `last`)")
    a.add_argument("--tail", type=_count, default=20, help="step lines of history to show (0: none)")
    a.add_argument("--all", action="store_true", help="show the whole history")
    a.add_argument("--json", action="store_true", help="print events as JSON lines")
    a.set_defaults(func=run_attach)

    s = sub.add_parser("stop", help="stop a run: it finishes the current step, saves a checkpoint and exits")
    s.add_argument("run", help="run id (or a unique part of it, or `last`: the newest one running)")
    s.add_argument("--no-save", action="store_true", help="exit without saving a checkpoint")
    s.add_argument("--no-wait", action="store_true", help="return once the command is sent")
    s.add_argument("--timeout", type=float, default=600, help="seconds to wait for the run to stop")
    s.set_defaults(func=run_stop)


def _count(text: str) -> int:
    """A whole number, 0 or more (argparse's type for --tail)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n}: must be 0 or more")
    return n


def run_list(args: argparse.Namespace) -> int:
    # Newest first, as the console lists them: the run a user just started is the first line.
    summaries = [runs.summarize(d) for d in reversed(runs.list_run_dirs(runs_root(args)))]
    if args.json:
        print_json([s.to_dict() for s in summaries])
        return 0
    if not summaries:
        out.print("no runs yet: start one with `qlc train tiny-demo`")
        return 0
    rows = [_row(s) for s in summaries]
    errors = [_error_line(s) for s in summaries]
    table = _table(summaries, rows)
    # Why the failed runs failed, in what the terminal leaves beside the other columns (through a
    # pipe, MAX_ERROR_WIDTH): a long error must not cut the run id or squeeze the step or loss. A
    # terminal with no room for a useful part of one shows none; `--json` has them whole.
    room = min(out.width - out.measure(table).maximum - 2, MAX_ERROR_WIDTH)  # 2: the column's padding
    if any(errors) and room >= MIN_ERROR_WIDTH:
        table = _table(summaries, rows, errors, room)
    print_unpadded(table)
    return 0


def _row(s: runs.RunSummary) -> list[str]:
    step = f"{s.step}/{s.total_steps}" if s.total_steps else str(s.step)
    loss = f"{s.last_loss:.4f}" if s.last_loss is not None else "-"
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.started))
    # No style, no markup: "[]created[/]" was a MarkupError that took the whole list down.
    style = STATUS_STYLE.get(s.status)
    status = f"[{style}]{s.status}[/]" if style else escape(s.status)
    return [s.id, status, s.preset, s.model, step, loss, started]


def _table(
    summaries: list[runs.RunSummary], rows: list[list[str]], errors: list[str] | None = None, width: int = 0
) -> Table:
    table = Table(box=None, header_style="bold")
    # The run id is what a user copies into `qlc attach`: never cut it; narrow terminals cut the
    # preset and model instead.
    table.add_column("run", no_wrap=True, min_width=max(len(s.id) for s in summaries))
    for col in ("status", "preset", "model", "step", "loss", "started"):
        table.add_column(
            col,
            justify="right" if col in ("step", "loss") else "left",
            no_wrap=True,
            overflow="ellipsis" if col in ("preset", "model") else "fold",
        )
    if errors is None:
        for row in rows:
            table.add_row(*row)
        return table
    table.add_column("error", no_wrap=True, overflow="ellipsis", max_width=width)
    for row, error in zip(rows, errors, strict=True):
        table.add_row(*row, Text(error))  # Text: an error's "[...]" is not markup
    return table


def _error_line(s: runs.RunSummary) -> str:
    """Why a failed run failed, in one line: its error's first. Other runs get none, since an error
    left by an earlier session of a resumed run says nothing about how the run stands now."""
    lines = (s.error or "").strip().splitlines() if s.status == "failed" else []
    return lines[0] if lines else ""


def run_attach(args: argparse.Namespace) -> int:
    run_dir = find_run(args)
    return follow_file(run_dir, EventPrinter(args.json), tail=None if args.all or args.json else args.tail)


def runs_root(args: argparse.Namespace, ref: str | None = None) -> Path:
    """The runs folder of a command that reads runs (`train` makes its own). A --runs-dir given
    must be a folder it can list: one that is not there is a typo or an unmounted share, and read
    as "no runs yet" it hid both. The default folder and $QLC_RUNS_DIR are not checked: before the
    first `qlc train` they are not there yet either. Checked when the command reads the folder, so
    that its own arguments are judged first."""
    root = runs.runs_root(args.runs_dir)
    problem = _unreadable(root) if args.runs_dir and not _names_a_run_dir(ref) else ""
    if problem:
        subject = f"no run {ref!r}" if ref and ref not in runs.LAST else "no runs"
        raise UserError(
            f"{subject} under --runs-dir {root}: {problem}",
            "give the folder your runs are in, or leave --runs-dir out for the default",
        )
    return root


def _unreadable(root: Path) -> str:
    """What keeps `root` from being listed as a runs folder, or "" when nothing does."""
    if not root.exists():
        return "no such folder"
    if not root.is_dir():
        return "not a folder"
    return "" if os.access(root, os.R_OK | os.X_OK) else "cannot read it (permission denied)"


def _names_a_run_dir(ref: str | None) -> bool:
    """A run given by its path (`qlc attach ~/runs/X`) is found without the runs folder."""
    return ref is not None and (Path(ref).expanduser() / runs.CONFIG).is_file()


def find_run(args: argparse.Namespace, live: bool = False) -> Path:
    """The run `args.run` names, under the runs folder. `live`: for commands that act on a live
    engine (stop, sample --live), where `last` is the newest run still running."""
    root = runs_root(args, args.run)
    return find_live_run(root, args.run) if live else runs.find_run(root, args.run)


def find_live_run(root: Path, ref: str) -> Path:
    """`runs.find_run`, but `last` is the newest run still running: a newer one may have failed
    while an older one trains on, and stopping the failed one stops nothing."""
    if ref not in runs.LAST:
        return runs.find_run(root, ref)
    dirs = runs.list_run_dirs(root)
    running = [d for d in dirs if runs.is_running(d)]
    if running:
        return running[-1]
    if not dirs:
        return runs.find_run(root, ref)  # its own "no runs yet" error
    status = runs.summarize(dirs[-1]).status
    raise UserError(
        f"no run is running under {root}: the newest, {dirs[-1].name}, {ENDED.get(status, status)}",
        "`qlc runs` lists them",
    )


def run_stop(args: argparse.Namespace) -> int:
    run_dir = find_run(args, live=True)
    _, offset = runs.read_events(run_dir)
    runs.send_command(run_dir, protocol.Stop(save=not args.no_save))
    if args.no_wait:
        out.print(f"stop sent to {run_dir.name}")
        return 0
    out.print(
        f"stopping {run_dir.name}: finishing the current step"
        + ("" if args.no_save else " and saving a checkpoint")
    )
    deadline = time.monotonic() + args.timeout
    printer = EventPrinter()
    while time.monotonic() < deadline:
        events, offset = runs.read_events(run_dir, offset)
        for ev in events:
            if isinstance(ev, (protocol.CheckpointSaved, protocol.Finished, protocol.ErrorEvent)):
                printer(ev)
        if printer.status is not None and not runs.is_running(run_dir):
            return 0 if printer.status in ("stopped", "completed") else 1
        if not runs.is_running(run_dir) and printer.status is None:
            # Another stop (a second `qlc stop`, a console) may have ended the run between our
            # first read and the command: its end is then in the history before our offset.
            ended = [
                e for e in runs.read_events(run_dir)[0] if isinstance(e, (protocol.Hello, protocol.Finished))
            ]
            if ended and isinstance(ended[-1], protocol.Finished):
                printer(ended[-1])
                return 0 if ended[-1].status in ("stopped", "completed") else 1
            err.print("the engine exited without a finished event")
            return 1
        time.sleep(0.2)
    # Where it is: every rank of this host writes every thread's stack to the run's folder.
    dumped = distributed.dump_stacks(run_dir)
    where = f"; where each rank is: {', '.join(str(p) for p in dumped.values())}" if dumped else ""
    err.print(
        f"the run has not stopped after {args.timeout:.0f} s; it may be in a long step or a save{where}"
    )
    return 1
