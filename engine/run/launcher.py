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
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

from engine.config import load_resolved
from engine.errors import UserError
from engine.paths import cache_root
from engine.run import distributed, runs
from engine.run.runs import CONFIG, ENGINE_LOG


def engine_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine", *args]


def train_command(run_dir: Path, resume: bool = False, nodes: distributed.Nodes | None = None) -> list[str]:
    """The command line that trains (or resumes) a run: the engine itself for one process, torchrun
    for several (hardware.gpus, or several hosts, or QLC_TORCHRUN=1). Raises a UserError when the
    GPUs are not there."""
    nodes = nodes or distributed.Nodes()
    nodes.check()
    args = ["resume" if resume else "train", str(run_dir)]
    nproc = distributed.processes_per_node(load_resolved(run_dir / CONFIG))
    if nproc == 1 and not nodes.multi_host and not distributed.forced_torchrun():
        return engine_command(*args)
    return distributed.torchrun_command(nproc, args, nodes)


GOMP_SPINCOUNT = 10_000  # _env: spins before an idle OpenMP thread sleeps (libgomp's default: 300,000)


def _env(command: list[str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if command is not None and distributed.is_torchrun(command):
        one_host = "--standalone" in command
        for key, value in distributed.torchrun_env(distributed.Nodes(nnodes=1 if one_host else 2)).items():
            env.setdefault(key, value)  # what the user set wins
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
    if "OMP_WAIT_POLICY" not in env:
        # libgomp's threads spin 300,000 times before they sleep. Two engines on the CPU (a run and
        # a checkpoint sample, two runs) then spin against each other: on a 2-core box, 9.5 s a
        # tiny-demo step each where one alone takes 0.13. 10,000 spins keep one alone at 0.136 and
        # two at 0.57 (bench/results/cpu-two-engines-2026-12-05.json). A GPU run does not notice.
        env.setdefault("GOMP_SPINCOUNT", str(GOMP_SPINCOUNT))
    for key, value in compile_caches().items():
        env.setdefault(key, value)  # what the user set wins
    return env


def compile_caches() -> dict[str, str]:
    """Where compiled kernels persist between runs: Unsloth's generated modules (by default an
    `unsloth_compiled_cache` folder in whatever directory qlc was started from, so a run started
    elsewhere compiled again), Inductor's (by default under /tmp, which a reboot empties) and
    Triton's, all under the user cache folder. A second launch of the same recipe then reuses
    what the first one compiled."""
    root = cache_root() / "compiled"
    caches = {
        "UNSLOTH_COMPILE_LOCATION": root / "unsloth",
        "TORCHINDUCTOR_CACHE_DIR": root / "inductor",
        "TRITON_CACHE_DIR": root / "triton",
    }
    for folder in caches.values():
        folder.mkdir(parents=True, exist_ok=True)
    return {key: str(folder) for key, folder in caches.items()}


def open_log(run_dir: Path, name: str = ENGINE_LOG) -> BinaryIO:
    """RUN_DIR/engine.log (or a node's log) for appending, readable by its owner only: tracebacks
    quote paths and data."""
    return _open_append(run_dir / name)


def _open_append(path: Path) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
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
    command = command or engine_command(*args)
    log = open_log(run_dir, log_name)
    try:
        offset = os.fstat(log.fileno()).st_size
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe else subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
            env=_env(command),
            close_fds=True,
        )
    finally:
        log.close()
    # Where this process's part of the log begins: what it wrote if it fails to start.
    proc.log_offset = offset  # type: ignore[attr-defined]
    proc.log_path = run_dir / log_name  # type: ignore[attr-defined]
    return proc


START_TIMEOUT_S = 120.0


def wait_started(
    run_dir: Path, proc: subprocess.Popen[bytes], timeout_s: float = START_TIMEOUT_S, lock: bool = True
) -> bool:
    """Wait until the run's engine holds its lock (it started), for at most `timeout_s`. Raises a
    UserError with the reason from the log when the launched process (torchrun, or the engine)
    exits first; returns False at the timeout (still starting: torchrun's rendezvous, or a slow
    import). `lock=False` (node 0 of several hosts, whose rank 0 starts only once every host has
    joined) only watches for an early exit."""
    deadline = time.monotonic() + timeout_s
    events = run_dir / runs.EVENTS
    before = events.stat().st_size if events.exists() else 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if events.exists() and events.stat().st_size > before:
                return True  # it started, and already ended: its events say how
            raise UserError(
                f"run {run_dir.name}: the engine exited ({proc.returncode}) before it started: "
                f"{start_failure(proc)}",
                f"the whole log: {getattr(proc, 'log_path', run_dir / ENGINE_LOG)}",
            )
        if lock and runs.is_running(run_dir):
            return True
        time.sleep(0.1)
    return False


_REASONS = [
    # (pattern in the log, what it means): the first pattern found, in this order, wins.
    (re.compile(r"^[\w.-]+: error: .*$", re.M), "torchrun refused its settings ({0})"),
    (
        re.compile(r"RendezvousTimeoutError.*|rendezvous.*timed out.*", re.I),
        "torchrun's rendezvous timed out ({0})",
    ),
    (re.compile(r"\[rank \d+\] error .*"), "{0}"),
    (re.compile(r"^\w*(Error|Exception)\b.*$", re.M), "{0}"),
]


def start_failure(proc: subprocess.Popen[bytes]) -> str:
    """One line from what a launched process wrote to its log: the reason it ended."""
    path = getattr(proc, "log_path", None)
    try:
        with open(path, "rb") as f:  # type: ignore[arg-type]
            f.seek(getattr(proc, "log_offset", 0))
            text = f.read()[-200_000:].decode(errors="replace")
    except (OSError, TypeError):
        return "(no log)"
    for pattern, template in _REASONS:
        found = pattern.findall(text) if pattern.groups == 0 else [m.group(0) for m in pattern.finditer(text)]
        if found:
            return template.format(found[-1].strip())[:400]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:400] if lines else "(the log is empty)"


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
    return _launch_job(args, run_dir / ENGINE_LOG)


def launch_export(run_dir: Path, args: list[str]) -> subprocess.Popen[bytes]:
    """An export (engine.export.request.ExportRequest.engine_args): a short-lived engine process."""
    return _launch_job(args, run_dir / ENGINE_LOG)


def launch_pull(request_json: str, log: Path) -> subprocess.Popen[bytes]:
    """`qlc pull`: downloads in a short-lived engine process (no run directory: its stderr goes to
    `log`)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    return _launch_job(["pull", "--request", request_json], log)


def _launch_job(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """A short-lived engine process: no commands in, its events on stdout, its stderr appended to
    `log_path` (a run's engine.log)."""
    log = _open_append(log_path)
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
