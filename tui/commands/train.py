"""`qlc train PRESET` and `qlc resume RUN`: start an engine child and follow it, or --detach."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine import data, launcher, model_source, runs
from engine.config import load_preset
from engine.errors import UserError
from tui.follow import EventPrinter, follow_child
from tui.output import out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a preset (follows the run; --detach to leave it in the background)"
    )
    p.add_argument("preset", help="a preset name (`qlc presets`) or a path to a preset YAML")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set train.lr=1e-4 (repeatable)",
    )
    p.add_argument(
        "--detach", action="store_true", help="start the run and return; it trains on in the background"
    )
    p.add_argument("--json", action="store_true", help="print the engine's events as JSON lines")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="confirm running code shipped with the model when the preset sets model.trust_remote_code",
    )
    p.set_defaults(func=run_train)

    r = sub.add_parser("resume", help="continue a stopped or crashed run from its newest checkpoint")
    r.add_argument("run", help="run id (or a unique part of it, or `last`)")
    r.add_argument("--detach", action="store_true", help="resume in the background")
    r.add_argument("--json", action="store_true", help="print the engine's events as JSON lines")
    r.set_defaults(func=run_resume)


def _start(run_dir: Path, resume: bool, detach: bool, json_lines: bool) -> int:
    if detach:
        proc = launcher.launch_train(run_dir, resume=resume, pipe=False)
        if json_lines:
            out.print_json(data={"run": run_dir.name, "path": str(run_dir), "pid": proc.pid})
        else:
            out.print(
                f"run [bold]{run_dir.name}[/] {'resumed' if resume else 'started'} in the background (pid {proc.pid})"
            )
            out.print(f"  follow:  qlc attach {run_dir.name}\n  stop:    qlc stop {run_dir.name}")
        return 0
    proc = launcher.launch_train(run_dir, resume=resume, pipe=True)
    return follow_child(proc, run_dir, EventPrinter(json_lines))


def run_train(args: argparse.Namespace) -> int:
    cfg = load_preset(args.preset, args.overrides)
    if cfg.model.trust_remote_code and not args.trust_remote_code:
        raise UserError(
            f"preset {cfg.name}: model.trust_remote_code is true",
            "this runs code from the model's repository; confirm with --trust-remote-code",
        )
    model_source.check(cfg)  # a bad model path or bad data fails here, before any run directory exists
    data.check_source(cfg)
    run_dir = runs.create_run(runs.runs_root(args.runs_dir), cfg)
    return _start(run_dir, resume=False, detach=args.detach, json_lines=args.json)


def run_resume(args: argparse.Namespace) -> int:
    run_dir = runs.find_run(runs.runs_root(args.runs_dir), args.run)
    if runs.is_running(run_dir):
        raise UserError(f"run {run_dir.name} is still running", f"`qlc attach {run_dir.name}` follows it")
    runs.resume_point(run_dir)  # nothing to resume from, or the dataset changed: one line, exit 2
    return _start(run_dir, resume=True, detach=args.detach, json_lines=args.json)
