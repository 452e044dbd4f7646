"""`qlc train PRESET`, `qlc resume RUN` and `qlc join RUN`: start an engine child (torchrun for
several GPUs) and follow it, or --detach. `join` starts another host's share of a multi-host run."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine import preflight
from engine.config import load_preset, origin
from engine.errors import UserError
from engine.run import distributed, launcher, runs
from tui.commands.runs import find_run
from tui.follow import EventPrinter, follow_child
from tui.output import err, out


def _node_flags(p: argparse.ArgumentParser, joining: bool = False) -> None:
    """torchrun's multi-host settings (docs/multi-gpu.md); one host needs none of them."""
    p.add_argument(
        "--nnodes", type=int, default=2 if joining else 1, help="hosts taking part (default %(default)s)"
    )
    if joining:
        p.add_argument("--node-rank", type=int, required=True, help="this host's number, 1 to nnodes - 1")
    p.add_argument(
        "--rdzv-endpoint",
        default="",
        metavar="HOST:PORT",
        help="node 0's address and a free port, where the hosts meet (torchrun's --master-addr/--master-port), "
        "e.g. node0:29500; every host names the same",
    )


def _nodes(args: argparse.Namespace) -> distributed.Nodes:
    nodes = distributed.Nodes(args.nnodes, getattr(args, "node_rank", 0), args.rdzv_endpoint)
    nodes.check()
    return nodes


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
    _node_flags(p)
    p.set_defaults(func=run_train)

    r = sub.add_parser("resume", help="continue a stopped or crashed run from its newest checkpoint")
    r.add_argument("run", help="run id (or a unique part of it, or `last`)")
    r.add_argument("--detach", action="store_true", help="resume in the background")
    r.add_argument("--json", action="store_true", help="print the engine's events as JSON lines")
    r.add_argument(
        "--gpus",
        metavar="N",
        help="resume on another number of GPUs (or CPU processes): N or auto; ddp and fsdp checkpoints "
        "hold the full adapter and optimizer state, so any N works",
    )
    _node_flags(r)
    r.set_defaults(func=run_resume)

    j = sub.add_parser(
        "join",
        help="on another host: take part in a multi-host run started with `qlc train --nnodes`",
        description="Start this host's processes of a run whose node 0 was started with "
        "`qlc train PRESET --nnodes N --rdzv-endpoint HOST:PORT`. The run directory must be on a "
        "filesystem every host sees at the same path (--runs-dir). Node 0 writes the events and "
        "checkpoints; this host writes only its log, RUN/engine-node<R>.log.",
    )
    j.add_argument("run", help="run id (or a unique part of it, or `last`)")
    _node_flags(j, joining=True)
    j.add_argument("--detach", action="store_true", help="start and return")
    j.set_defaults(func=run_join)


def _start(
    run_dir: Path, resume: bool, detach: bool, json_lines: bool, nodes: distributed.Nodes | None = None
) -> int:
    if nodes is not None and nodes.multi_host:
        err.print(
            f"node 0 of {nodes.nnodes}: on each other host run\n"
            f"  qlc --runs-dir {run_dir.parent} join {run_dir.name} --nnodes {nodes.nnodes} "
            f"--node-rank R --rdzv-endpoint {nodes.rdzv_endpoint}"
        )
    if detach:
        proc = launcher.launch_train(run_dir, resume=resume, pipe=False, nodes=nodes)
        # Return once the engine runs (it holds the run's lock), or with the reason it did not
        # start: a torchrun that refused its command line exits within seconds. Node 0 of several
        # hosts starts its engine only once every host joined: watch it for an early exit only.
        several = nodes is not None and nodes.multi_host
        started = launcher.wait_started(run_dir, proc, timeout_s=10.0 if several else 120.0, lock=not several)
        if not started and not several:
            err.print(
                f"[yellow]run {run_dir.name} has not started after 120 s (still importing, or torchrun's "
                f"rendezvous); `qlc attach {run_dir.name}` follows it, {run_dir / runs.ENGINE_LOG} says more[/]"
            )
        if json_lines:
            out.print_json(data={"run": run_dir.name, "path": str(run_dir), "pid": proc.pid})
        else:
            out.print(
                f"run [bold]{run_dir.name}[/] {'resumed' if resume else 'started'} in the background (pid {proc.pid})"
            )
            out.print(f"  follow:  qlc attach {run_dir.name}\n  stop:    qlc stop {run_dir.name}")
        return 0
    proc = launcher.launch_train(run_dir, resume=resume, pipe=True, nodes=nodes)
    return follow_child(proc, run_dir, EventPrinter(json_lines))


def run_train(args: argparse.Namespace) -> int:
    cfg = load_preset(args.preset, args.overrides)
    if cfg.model.trust_remote_code and not args.trust_remote_code:
        raise UserError(
            f"preset {cfg.name}: model.trust_remote_code is true",
            "this runs code from the model's repository; confirm with --trust-remote-code",
        )
    nodes = _nodes(args)
    # A bad model path, bad data or absent GPUs fail here, before any run directory.
    preflight.check(cfg, lambda key: origin(args.preset, args.overrides, key))
    run_dir = runs.create_run(runs.runs_root(args.runs_dir), cfg)
    return _start(run_dir, resume=False, detach=args.detach, json_lines=args.json, nodes=nodes)


def run_resume(args: argparse.Namespace) -> int:
    run_dir = find_run(args)
    if runs.is_running(run_dir):
        raise UserError(f"run {run_dir.name} is still running", f"`qlc attach {run_dir.name}` follows it")
    runs.resume_point(run_dir)  # nothing to resume from, or the dataset changed: one line, exit 2
    nodes = _nodes(args)
    if args.gpus is not None:
        distributed.change_processes(run_dir, args.gpus)
    return _start(run_dir, resume=True, detach=args.detach, json_lines=args.json, nodes=nodes)


def run_join(args: argparse.Namespace) -> int:
    run_dir = find_run(args)
    nodes = _nodes(args)
    if nodes.node_rank == 0:
        raise UserError("--node-rank: node 0 is the host that ran `qlc train`", "give 1 to nnodes - 1")
    # Node 0 trains afresh or resumes; this host does the same (the hosts meet before any
    # checkpoint of this session can be written, so one existing means node 0 resumes).
    resume = bool(runs.checkpoints(run_dir))
    proc = launcher.launch_join(run_dir, resume=resume, nodes=nodes)
    out.print(
        f"node {nodes.node_rank} of {nodes.nnodes} joined run [bold]{run_dir.name}[/] (pid {proc.pid}); "
        f"log: {run_dir / launcher.node_log(nodes.node_rank)}"
    )
    if args.detach:
        launcher.wait_started(run_dir, proc, timeout_s=10.0, lock=False)  # an early exit: its reason
        return 0
    if proc.wait() == 0:
        return 0
    err.print(f"[red]node {nodes.node_rank} exited ({proc.returncode}): {launcher.start_failure(proc)}[/]")
    return 1
