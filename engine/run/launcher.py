"""Start engine processes that outlive whoever started them.

The child runs in its own session (setsid): no controlling terminal, so an SSH drop's SIGHUP and
a Ctrl-C in the console never reach it. Its stdout is a pipe the launching console may read; when
that console goes away the engine keeps writing events to RUN_DIR/events.jsonl. Its stderr goes
to RUN_DIR/engine.log.

A run on several GPUs (hardware.gpus > 1) starts torchrun instead, in the same detached session:
torchrun starts one engine process per GPU, forwards SIGTERM to them and ends them all when one
fails; rank 0 alone writes events (engine/run/distributed.py).

Pure Python: the console imports this module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

from engine.config import load_resolved
from engine.run import distributed
from engine.run.runs import CONFIG, ENGINE_LOG


def engine_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine", *args]


def train_command(run_dir: Path, resume: bool = False, nodes: distributed.Nodes | None = None) -> list[str]:
    """The command line that trains (or resumes) a run: the engine itself for one process, torchrun
    for several (hardware.gpus, or several hosts). Raises a UserError when the GPUs are not there."""
    nodes = nodes or distributed.Nodes()
    nodes.check()
    args = ["resume" if resume else "train", str(run_dir)]
    nproc = distributed.processes_per_node(load_resolved(run_dir / CONFIG))
    if nproc == 1 and not nodes.multi_host:
        return engine_command(*args)
    return distributed.torchrun_command(nproc, args, nodes)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The child must find this engine even when the console was started from another folder.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # huggingface_hub's own bars would only fill engine.log: the engine downloads hub files itself
    # and reports their progress as `downloading` events (engine/hub).
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # TRL reports each trainer it builds to the hub (`/api/telemetry/trl/...`): no calls home from
    # a training box, and a warm cache must start with no network request at all.
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    return env


def open_log(run_dir: Path, name: str = ENGINE_LOG) -> BinaryIO:
    """RUN_DIR/engine.log (or a node's log) for appending, readable by its owner only: tracebacks
    quote paths and data."""
    fd = os.open(run_dir / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return os.fdopen(fd, "ab")


def node_log(node_rank: int) -> str:
    """Each host of a multi-host run logs to its own file: appends from several hosts to one file
    on a network filesystem interleave."""
    return ENGINE_LOG if node_rank == 0 else f"engine-node{node_rank}.log"


def launch(
    run_dir: Path,
    *args: str,
    pipe: bool = True,
    command: list[str] | None = None,
    log_name: str = ENGINE_LOG,
) -> subprocess.Popen[bytes]:
    """Start `python -m engine <args>` (or `command`) for a run, detached into its own session.

    With pipe=True the caller gets stdin/stdout pipes (commands in, events out); without, both go to
    /dev/null and the run is reached only through its events file and control FIFO.
    """
    log = open_log(run_dir, log_name)
    try:
        return subprocess.Popen(
            command or engine_command(*args),
            stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe else subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
            env=_env(),
            close_fds=True,
        )
    finally:
        log.close()


def launch_train(
    run_dir: Path, resume: bool = False, pipe: bool = True, nodes: distributed.Nodes | None = None
) -> subprocess.Popen[bytes]:
    return launch(run_dir, pipe=pipe, command=train_command(run_dir, resume, nodes))


def launch_join(run_dir: Path, resume: bool, nodes: distributed.Nodes) -> subprocess.Popen[bytes]:
    """Another host's share of a multi-host run: its ranks write no events, read no commands."""
    command = train_command(run_dir, resume, nodes)
    return launch(run_dir, pipe=False, command=command, log_name=node_log(nodes.node_rank))


def launch_sample(run_dir: Path, checkpoint: str | None, request_json: str) -> subprocess.Popen[bytes]:
    """Sample from a saved checkpoint (or the final adapter): a short-lived engine process."""
    args = ["sample", str(run_dir), "--request", request_json]
    if checkpoint:
        args += ["--checkpoint", checkpoint]
    return _launch_job(run_dir, args)


def launch_export(run_dir: Path, args: list[str]) -> subprocess.Popen[bytes]:
    """An export (engine.export.request.ExportRequest.engine_args): a short-lived engine process."""
    return _launch_job(run_dir, args)


def launch_pull(request_json: str, log: Path) -> subprocess.Popen[bytes]:
    """`qlc pull`: downloads in a short-lived engine process (no run directory: its stderr goes to
    `log`)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(
            engine_command("pull", "--request", request_json),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=fd,
            start_new_session=True,
            env=_env(),
        )
    finally:
        os.close(fd)


def _launch_job(run_dir: Path, args: list[str]) -> subprocess.Popen[bytes]:
    """A short-lived engine process: no commands in, its events on stdout, its log in the run's
    engine.log."""
    log = open_log(run_dir)
    try:
        return subprocess.Popen(
            engine_command(*args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            env=_env(),
        )
    finally:
        log.close()
