"""`qlc pull PRESET|MODEL`: download a preset's model and hub dataset (or one model) ahead of time,
with the progress a run shows, so that a later `qlc train` starts from the cache (on a metered or
slow link, or before going offline). Always asks the hub for the newest commit of a branch.

The downloads run in an engine process (`python -m engine pull`); this command builds the request,
prints the progress and exits 0 (all there), 2 (a bad id, no access, no network: one line) or 130
(interrupted: run it again and it resumes).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess

from rich.markup import escape

from engine import protocol
from engine.config import RunConfig, is_preset, load_preset
from engine.errors import UserError
from engine.memory import catalog
from engine.models import check_source
from engine.paths import cache_root
from engine.run import launcher
from engine.run.pull import ModelPull, PullRequest, request_for
from tui.follow import EventPrinter, pipe_events
from tui.output import err, out

LOG = "pull.log"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pull",
        help="download a preset's model and dataset (or a model) ahead of time",
        description="Download what `qlc train` would: a preset's hub model and hub dataset, or one "
        "model by hub id: only the files a run loads (config, safetensors weights, "
        "tokenizer, chat template). Interrupted downloads resume.",
    )
    p.add_argument("target", metavar="PRESET|MODEL", help="a preset (name or YAML), or a model's hub id")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--revision", help="a branch, tag or commit of the model (default: its main branch)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="fetch PyTorch pickle weights when a repo has no safetensors",
    )
    p.add_argument("--json", action="store_true", help="print the engine's events as JSON lines")
    p.set_defaults(func=run_pull)


def build_request(args: argparse.Namespace) -> tuple[PullRequest, str]:
    """The request, and the preset it is for ("" for a model)."""
    if is_preset(args.target):
        cfg = load_preset(args.target, args.overrides)
        if args.revision:
            cfg.model.revision = args.revision
        if args.allow_pickle:
            cfg.model.allow_pickle = True
        check_source(cfg)
        return request_for(cfg), f"preset {cfg.name}"
    if args.overrides:
        raise UserError("--set: only for a preset", "name a preset, or give the model's --revision")
    arch = catalog().get(args.target)
    if arch is not None:
        ids = ", ".join(arch.hub_ids[:3]) or "a hub id"
        raise UserError(
            f"{args.target} is an architecture of the memory model's catalog, not a repo",
            f"pull a preset, or a hub id: {ids}",
        )
    repo = args.target
    cfg = RunConfig()
    cfg.model.name_or_path = repo
    check_source(cfg)  # a path that is not there, or not a hub id's shape: one line
    request = request_for(cfg)
    if request.models:
        request.models[0] = ModelPull(repo, args.revision, allow_pickle=args.allow_pickle)
    return request, ""


def run_pull(args: argparse.Namespace) -> int:
    request, what = build_request(args)
    if request.empty:
        out.print(
            f"{escape(what or args.target)}: nothing to download (a local or built-in model and local data)"
        )
        return 0
    log = cache_root() / LOG
    proc = launcher.launch_pull(request.to_json(), log)
    printer = EventPrinter(args.json)
    code: int | None = None
    try:
        for ev in pipe_events(proc):
            if args.json:
                printer(ev)
            elif isinstance(ev, protocol.Hello):
                names = [m.repo for m in request.models] + [d.repo for d in request.datasets]
                names_text = escape(", ".join(dict.fromkeys(names)))
                out.print(
                    f"[bold]pull[/] {escape(what)}: {names_text}" if what else f"[bold]pull[/] {names_text}"
                )
            elif isinstance(ev, protocol.ErrorEvent):
                hint = f" ({escape(ev.hint)})" if ev.hint else ""
                err.print(f"qlc: error: {escape(ev.message)}{hint}", soft_wrap=True)  # one line, however long
            else:
                printer(ev)
            if isinstance(ev, protocol.ErrorEvent):
                code = {"input": 2, "interrupted": 130}.get(ev.kind, 1)
        proc.wait()
    except KeyboardInterrupt:
        proc.terminate()  # the engine stops its transfers at the next chunk; partial files stay
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        err.print("pull interrupted; run it again to resume where it stopped")
        return 130
    if code is None and proc.returncode != 0:
        err.print(f"qlc: error: the engine exited ({proc.returncode}); see {log}")
        return 1
    return code if code is not None else 0
