"""Fault trials on the real engine (the tiny preset, real child processes, real `qlc`), shared by the
test suite (a few trials) and `bench/faults.py` (the 20-trial campaigns).

Each trial does one thing to a run and checks what it must leave behind; it raises AssertionError
(with the evidence) when the run did not survive, and returns what it saw otherwise. The checks:

- a checkpoint is listed only when every file of its manifest is there, and each one listed passes
  the full SHA-256 verification;
- a resume starts from the newest complete checkpoint, and reproduces the killed session's losses
  for every step both sessions trained (nothing that was saved is lost or changed);
- failures end with one structured error, a `finished` event naming the last good checkpoint, and
  a console (the `qlc` process) that reports them and exits cleanly.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine import protocol
from engine.run import checkpoints, runs
from tests.conftest import QLC, REPO, qlc

# One loss per step (resume equivalence is checked step by step), a checkpoint every 2 steps,
# no eval: about 0.2 s a step on a CPU core.
OVERRIDES = [
    "train.logging_steps=1",
    "train.save_steps=2",
    "train.save_total_limit=3",
    "train.eval_steps=0",
    "data.val_fraction=0",
    "train.micro_batch=4",
]
LOSS_TOLERANCE = 1e-4  # resumed CPU runs reproduce losses to this (tests/engine/test_training.py)
# Found in no file of a run directory, ever (checked by `secret_leaks`).
SECRET = "hf_" + secrets.token_hex(17)


def sets(*extra: str) -> list[str]:
    return [x for o in (*OVERRIDES, *extra) for x in ("--set", o)]


def env(fault: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of every `qlc` a trial runs: an HF token that must never be written
    anywhere, and the fault to inject, if any."""
    # One math thread per engine: the trials run consoles and `qlc` processes beside it, and on
    # a busy 2-core machine two OpenMP threads spin against them (a tiny step took 1.5-1.8 s with
    # two threads and 0.33 s with one, measured under a load average of 4).
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    return {"HF_TOKEN": SECRET, "QLC_FAULT": fault or "", "OMP_NUM_THREADS": threads, **extra}


# ---------------------------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------------------------


@dataclass
class Session:
    """What one engine process of a run emitted: from its hello to the next."""

    hello: protocol.Hello
    steps: dict[int, float] = field(default_factory=dict)
    saved: list[int] = field(default_factory=list)
    errors: list[protocol.ErrorEvent] = field(default_factory=list)
    logs: list[protocol.Log] = field(default_factory=list)
    samples: list[protocol.Sample] = field(default_factory=list)
    finished: protocol.Finished | None = None


def sessions(run_dir: Path) -> list[Session]:
    out: list[Session] = []
    for ev in runs.read_events(run_dir)[0]:
        if isinstance(ev, protocol.Hello):
            out.append(Session(ev))
        elif not out:
            continue
        elif isinstance(ev, protocol.Step):
            out[-1].steps[ev.step] = ev.loss
        elif isinstance(ev, protocol.CheckpointSaved):
            out[-1].saved.append(ev.step)
        elif isinstance(ev, protocol.ErrorEvent):
            out[-1].errors.append(ev)
        elif isinstance(ev, protocol.Log):
            out[-1].logs.append(ev)
        elif isinstance(ev, protocol.Sample):
            out[-1].samples.append(ev)
        elif isinstance(ev, protocol.Finished):
            out[-1].finished = ev
    return out


def wait_for(run_dir: Path, predicate: Callable[[], bool], timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    log = (run_dir / runs.ENGINE_LOG).read_text(errors="replace")[-3000:]
    raise AssertionError(f"timed out waiting for {what or predicate}; engine.log:\n{log}")


def wait_stopped(run_dir: Path, timeout: float = 120) -> None:
    wait_for(run_dir, lambda: not runs.is_running(run_dir), timeout, "the engine to exit")


def engine_pid(run_dir: Path) -> int:
    return runs.lock_pid(run_dir)


def kill_engine(run_dir: Path) -> None:
    """Leave no engine behind when a test fails half-way (they are detached: nothing else would)."""
    if runs.is_running(run_dir):
        with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
            os.kill(engine_pid(run_dir), signal.SIGKILL)


def checkpoint_state(run_dir: Path) -> dict:
    """What is on disk under checkpoints/: the complete ones, and leftovers of cut-short saves."""
    root = run_dir / runs.CHECKPOINTS
    listed = runs.checkpoints(run_dir)
    for path in listed:
        problem = checkpoints.problem(path, full=True)
        assert problem is None, f"{path.name} is listed as complete but {problem}"
    names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    for name in names:  # a checkpoint name is never a partial checkpoint
        if name.startswith(checkpoints.PREFIX):
            assert (root / name) in listed, f"{name} is under a checkpoint name but is not complete"
    return {
        "complete": [p.name for p in listed],
        "partial": [
            n for n in names if n.startswith((checkpoints.STAGING_PREFIX, checkpoints.DELETING_PREFIX))
        ],
    }


def check_resume_reproduces(run_dir: Path) -> int:
    """Every session that resumed from checkpoint-k must have logged, for each step it shares
    with the session before it, the loss that one logged. Returns the steps compared."""
    compared = 0
    all_sessions = sessions(run_dir)
    for before, after in itertools.pairwise(all_sessions):
        # An injected NaN changes that session's losses from its step on, on purpose.
        poisoned = min((e.step for e in before.errors if e.kind == "nan_loss" and e.step), default=None)
        for step in sorted(set(before.steps) & set(after.steps)):
            if poisoned is not None and step >= poisoned:
                continue
            a, b = before.steps[step], after.steps[step]
            assert abs(a - b) <= LOSS_TOLERANCE, (
                f"step {step}: {a} before the fault, {b} after resuming from {after.hello.resumed_from}"
            )
            compared += 1
    return compared


def secret_leaks(root: Path) -> list[str]:
    """Files under `root` that contain the trials' HF token (there must be none)."""
    needle = SECRET.encode()
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_fifo() and needle in path.read_bytes():
            found.append(str(path))
    return found


# ---------------------------------------------------------------------------------------------
# Driving a run
# ---------------------------------------------------------------------------------------------


def start(runs_dir: Path, *extra_sets: str, fault: str | None = None, data: Path | None = None) -> Path:
    """`qlc train tiny-demo --detach` with the trial overrides; returns the run directory."""
    args = sets(*extra_sets, *([f"data.source={data}"] if data else []))
    result = qlc(
        "--runs-dir", str(runs_dir), "train", "tiny-demo", *args, "--detach", "--json", env=env(fault)
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return Path(json.loads(result.stdout)["path"])


def resume_detached(run_dir: Path, fault: str | None = None) -> None:
    result = qlc("--runs-dir", str(run_dir.parent), "resume", run_dir.name, "--detach", env=env(fault))
    assert result.returncode == 0, result.stderr + result.stdout


def resume_foreground(run_dir: Path, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """`qlc resume RUN` following the run to its end: the console a person watches."""
    return qlc("--runs-dir", str(run_dir.parent), "resume", run_dir.name, env=env(fault))


def _session_count(run_dir: Path) -> int:
    return sum(1 for ev in runs.read_events(run_dir)[0] if isinstance(ev, protocol.Hello))


# ---------------------------------------------------------------------------------------------
# Trials
# ---------------------------------------------------------------------------------------------


def _kill_session(run_dir: Path, rng: random.Random, in_save: bool, max_delay: float) -> dict:
    """The newest session is starting: SIGKILL its engine a random time into training (unless the
    kill_in_save fault does it), then check what is on disk."""
    session = lambda: sessions(run_dir)[-1]  # noqa: E731
    if not in_save:
        wait_for(
            run_dir,
            lambda: bool(session().steps) or not runs.is_running(run_dir),
            what="the session's first step",
        )
        time.sleep(rng.uniform(0, max_delay))
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine_pid(run_dir), signal.SIGKILL)
    wait_stopped(run_dir)
    last = session()
    after = checkpoint_state(run_dir)
    return {
        "resumed_from": last.hello.resumed_from,
        "killed_after_step": max(last.steps, default=None),
        "in_save_fault": in_save,
        "partial_save_left": bool(after["partial"]),
        "complete_after": after["complete"],
        "finished_before_the_kill": last.finished is not None,
    }


def first_kill_trial(
    runs_dir: Path, rng: random.Random, *extra_sets: str, max_delay: float = 2.5
) -> tuple[Path, dict]:
    """Start a run; once it has a checkpoint, SIGKILL it at a random moment."""
    run_dir = start(runs_dir, *extra_sets)
    wait_for(run_dir, lambda: bool(runs.checkpoints(run_dir)), what="the first checkpoint")
    trial = _kill_session(run_dir, rng, in_save=False, max_delay=max_delay)
    return run_dir, {**trial, "expected_from": None}


def kill_trial(run_dir: Path, rng: random.Random, in_save: bool, max_delay: float = 2.5) -> dict:
    """Resume the run, SIGKILL its engine (at a random moment of training, or inside its first or
    second save through the kill_in_save fault), then check what is on disk. The session must
    have started from the newest complete checkpoint (check_resumed_from_newest)."""
    before = checkpoint_state(run_dir)
    n = _session_count(run_dir)
    resume_detached(run_dir, fault=f"kill_in_save={rng.choice([1, 2])}" if in_save else None)
    wait_for(run_dir, lambda: _session_count(run_dir) > n, what="the resumed engine's hello")
    trial = _kill_session(run_dir, rng, in_save, max_delay)
    return {**trial, "expected_from": before["complete"][-1]}


def check_resumed_from_newest(run_dir: Path, trial: dict) -> None:
    """A session started after a kill resumed from the newest complete checkpoint of that moment."""
    assert trial["resumed_from"] == trial["expected_from"], (
        f"resumed from {trial['resumed_from']}, the newest complete checkpoint was {trial['expected_from']}"
    )


def finish(run_dir: Path, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """Resume in the foreground to the end; the run must complete."""
    result = resume_foreground(run_dir, fault)
    last = sessions(run_dir)[-1]
    assert result.returncode == 0 and last.finished and last.finished.status == "completed", (
        result.stdout[-2000:] + result.stderr[-2000:]
    )
    return result


def audited_loads(run_dir: Path) -> list[str]:
    """What the last session unpickled, from engine.log under QLC_FAULT=audit_loads: each line
    names the file and its weights_only flag (anything but True was refused)."""
    log = (run_dir / runs.ENGINE_LOG).read_text(errors="replace")
    session = log.rsplit("QLC_FAULT: armed: audit_loads", 1)[-1]
    return [
        line.split("QLC_FAULT: torch.load ", 1)[1]
        for line in session.splitlines()
        if "QLC_FAULT: torch.load " in line
    ]


def _one_line_error(result: subprocess.CompletedProcess[str], kind: str) -> str:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"error ({kind})")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def oom_trial(run_dir: Path, steps_ahead: int = 3) -> dict:
    """Out of memory inside a training step: one structured error with the memory calculator's
    advice, the run failed with its last checkpoint named, the console reports it and exits 1."""
    start_step = checkpoints.step_of(runs.find_checkpoint(run_dir)) or 0
    at = start_step + steps_ahead
    result = resume_foreground(run_dir, fault=f"oom_at_step={at}")
    last = sessions(run_dir)[-1]
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    (error,) = last.errors
    assert error.kind == "out_of_memory" and error.advice, error
    assert last.finished and last.finished.status == "failed"
    newest = runs.find_checkpoint(run_dir)
    assert last.finished.last_checkpoint == str(newest), (last.finished.last_checkpoint, newest)
    line = _one_line_error(result, "out_of_memory")
    assert f"last checkpoint {newest}" in " ".join(result.stdout.split()), result.stdout[-1500:]
    checkpoint_state(run_dir)
    return {"at_step": at, "error": line, "advice": len(error.advice), "last_checkpoint": newest.name}


def nan_trial(run_dir: Path, steps_ahead: int = 3, at: int | None = None) -> dict:
    """A NaN loss (at `at`, or `steps_ahead` steps after the checkpoint the run resumes from): the
    run stops with a clear error naming the step, and no checkpoint is written from that step on."""
    start_step = checkpoints.step_of(runs.find_checkpoint(run_dir)) or 0
    at = at if at is not None else start_step + steps_ahead
    result = resume_foreground(run_dir, fault=f"nan_at_step={at}")
    last = sessions(run_dir)[-1]
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    (error,) = last.errors
    assert error.kind == "nan_loss" and error.step == at and f"at step {at}" in error.message, error
    assert last.finished and last.finished.status == "failed"
    state = checkpoint_state(run_dir)
    assert all((checkpoints.step_of(Path(n)) or 0) < at for n in state["complete"]), state
    assert all(step < at for step in last.saved), last.saved
    assert last.finished.last_checkpoint == str(runs.find_checkpoint(run_dir))
    return {
        "at_step": at,
        "error": _one_line_error(result, "nan_loss"),
        "last_checkpoint": state["complete"][-1],
    }


def disk_full_trial(run_dir: Path) -> dict:
    """ENOSPC in the middle of a checkpoint save: one clear error, the previous checkpoint intact
    (byte for byte), nothing partial left behind."""
    before = checkpoint_state(run_dir)
    newest = runs.find_checkpoint(run_dir)
    manifest = (newest / checkpoints.MANIFEST).read_bytes()
    result = resume_foreground(run_dir, fault="disk_full_in_save")
    last = sessions(run_dir)[-1]
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    (error,) = last.errors
    assert error.kind == "disk_full" and f"{newest.name} is intact" in error.message, error
    after = checkpoint_state(run_dir)
    assert after == before, (before, after)
    assert (newest / checkpoints.MANIFEST).read_bytes() == manifest
    assert checkpoints.problem(newest, full=True) is None
    return {"error": _one_line_error(result, "disk_full"), "intact": newest.name}


def dataset_trial(run_dir: Path, data: Path, how: str, engine_check: bool = True) -> dict:
    """Change (`edit`) or remove (`delete`) the run's dataset, ask for a resume: `qlc resume` says
    what changed in one line (exit 2) and starts nothing; the engine itself refuses too. Then put the
    file back."""
    original = data.read_bytes()
    n = _session_count(run_dir)
    try:
        if how == "edit":
            lines = original.splitlines(keepends=True)
            data.write_bytes(b"".join(lines[1:] + lines[:1]))  # same rows, another order
            expected = "changed since the run started"
        else:
            data.unlink()
            expected = "is gone since the run started"
        result = qlc("--runs-dir", str(run_dir.parent), "resume", run_dir.name, env=env())
        assert result.returncode == 2, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and str(data) in lines[0], result.stderr
        assert "Traceback" not in result.stderr and _session_count(run_dir) == n
        if not engine_check:
            return {"how": how, "error": lines[0]}
        # A console that skipped the check: the engine refuses before loading anything.
        engine = subprocess.run(
            [*QLC[:1], "-m", "engine", "resume", str(run_dir)],
            capture_output=True,
            cwd=REPO,
            env={**os.environ, **env()},
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        events = [protocol.decode_event(line) for line in engine.stdout.splitlines() if line.strip()]
        errors = [e for e in events if isinstance(e, protocol.ErrorEvent)]
        assert engine.returncode == 1 and [e.kind for e in errors] == ["data_changed"], events
        assert isinstance(events[-1], protocol.Finished) and events[-1].status == "failed"
    finally:
        data.write_bytes(original)
    return {"how": how, "error": lines[0]}


def restored_dataset_resumes(run_dir: Path) -> dict:
    """With its dataset back as it was, the run resumes from its newest checkpoint (then is stopped)."""
    expected = runs.find_checkpoint(run_dir).name
    n = _session_count(run_dir)
    resume_detached(run_dir)
    wait_for(
        run_dir, lambda: _session_count(run_dir) > n and bool(sessions(run_dir)[-1].steps), what="a step"
    )
    stop = qlc("--runs-dir", str(run_dir.parent), "stop", run_dir.name)
    session = sessions(run_dir)[-1]
    assert stop.returncode == 0 and session.hello.resumed_from == expected, (stop.stderr, session.hello)
    assert session.finished and session.finished.status == "stopped"
    return {"resumed_from": expected}


# ---------------------------------------------------------------------------------------------
# Consoles: killed like an SSH session dies, several at once
# ---------------------------------------------------------------------------------------------


class Console:
    """A `qlc ... --json` process in its own session and process group, as a terminal runs it,
    whose events are read as they come."""

    def __init__(self, runs_dir: Path, *args: str, fault: str | None = None) -> None:
        self.proc = subprocess.Popen(
            [*QLC, "--runs-dir", str(runs_dir), *args, "--json"],
            cwd=REPO,
            env={**os.environ, "NO_COLOR": "1", **env(fault)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        os.set_blocking(self._fd, False)
        self._buffer = b""
        self.events: list[protocol.Event] = []

    def poll(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                return
            self._buffer += chunk
            *lines, self._buffer = self._buffer.split(b"\n")
            self.events += [protocol.decode_event(line) for line in lines if line.strip()]

    def wait_for(self, predicate: Callable[[protocol.Event], bool], timeout: float = 120) -> protocol.Event:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            self.poll()
            for ev in self.events[seen:]:
                if predicate(ev):
                    return ev
            seen = len(self.events)
            if self.proc.poll() is not None:
                self.poll()
                break
            time.sleep(0.02)
        raise AssertionError(f"the console never showed the event (exit {self.proc.poll()})")

    def kill(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=30)

    def finish(self, timeout: float = 120) -> list[protocol.Event]:
        self.proc.wait(timeout=timeout)
        os.set_blocking(self._fd, True)
        rest = self.proc.stdout.read() if self.proc.stdout else b""
        self._buffer += rest
        self.events += [protocol.decode_event(line) for line in self._buffer.split(b"\n") if line.strip()]
        self._buffer = b""
        return self.events


def _last_step(run_dir: Path) -> int:
    return max((e.step for e in runs.read_events(run_dir)[0] if isinstance(e, protocol.Step)), default=0)


def _keeps_training(run_dir: Path, after_step: int, timeout: float = 60) -> int:
    wait_for(
        run_dir,
        lambda: _last_step(run_dir) > after_step or not runs.is_running(run_dir),
        timeout,
        "a step after the console died",
    )
    assert runs.is_running(run_dir), "the engine stopped when its console died"
    return _last_step(run_dir)


def launching_console_kill_trial(
    runs_dir: Path, sig: int, *extra_sets: str, fault: str | None = None
) -> tuple[Path, dict]:
    """`qlc train` in the foreground (the console that owns the engine's pipe) dies mid-run, by
    SIGHUP as when SSH drops or by SIGKILL: the run keeps training."""
    console = Console(runs_dir, "train", "tiny-demo", *sets(*extra_sets), fault=fault)
    step = console.wait_for(lambda e: isinstance(e, protocol.Step))
    (run_dir,) = runs.list_run_dirs(runs_dir)
    console.kill(sig)
    at_kill = _last_step(run_dir)
    later = _keeps_training(run_dir, at_kill)
    return run_dir, {
        "signal": signal.Signals(sig).name,
        "console_saw_step": step.step,
        "killed_at": at_kill,
        "next_step": later,
    }


def attach_kill_trial(run_dir: Path, sig: int) -> dict:
    """`qlc attach` following live dies (SIGHUP or SIGKILL): the run keeps training."""
    at_spawn = _last_step(run_dir)
    console = Console(run_dir.parent, "attach", run_dir.name)
    live = console.wait_for(lambda e: isinstance(e, protocol.Step) and e.step > at_spawn)
    console.kill(sig)
    at_kill = _last_step(run_dir)
    later = _keeps_training(run_dir, at_kill)
    return {
        "signal": signal.Signals(sig).name,
        "console_saw_step": live.step,
        "killed_at": at_kill,
        "next_step": later,
    }


def consoles_stop_trial(run_dir: Path, consoles: int = 2) -> dict:
    """Several consoles attach to the run, each sees the whole history and the live events, and
    each sends `stop` at the same moment: the stop is applied once (one checkpoint, one `finished`),
    every console ends with the same events, and a stop sent after it is refused in one line."""
    at_spawn = _last_step(run_dir)
    n = _session_count(run_dir)
    attached = [Console(run_dir.parent, "attach", run_dir.name) for _ in range(consoles)]
    for console in attached:
        console.wait_for(lambda e: isinstance(e, protocol.Step) and e.step > at_spawn)
    stops = [
        subprocess.Popen(
            [*QLC, "--runs-dir", str(run_dir.parent), "stop", run_dir.name],
            cwd=REPO,
            env={**os.environ, "NO_COLOR": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(consoles)
    ]
    stop_codes = [p.wait(timeout=120) for p in stops]
    outputs = [c.finish() for c in attached]
    history = runs.read_events(run_dir)[0]
    for events in outputs:
        assert events == history, f"a console saw {len(events)} events, the run has {len(history)}"
    session = sessions(run_dir)[-1]
    assert _session_count(run_dir) == n and session.finished is not None
    assert session.finished.status == "stopped", session.finished
    stopping = [log for log in session.logs if log.message.startswith("stopping after step")]
    assert len(stopping) == 1, [log.message for log in session.logs]
    assert session.saved.count(session.finished.step) == 1, session.saved
    # Each `qlc stop` saw the run stop (0); one that came after the engine had gone says so (2).
    assert all(code in (0, 2) for code in stop_codes) and 0 in stop_codes, stop_codes
    again = qlc("--runs-dir", str(run_dir.parent), "stop", run_dir.name)
    assert again.returncode == 2 and "is not running" in again.stderr, again.stderr
    return {
        "consoles": consoles,
        "events_each_saw": len(history),
        "stop_exit_codes": stop_codes,
        "stopped_at": session.finished.step,
        "stops_applied": len(stopping),
    }


def live_samples_trial(run_dir: Path, consoles: int = 2) -> dict:
    """Several consoles ask the running model for a sample at once: each request is answered
    exactly once, to the console that asked."""
    procs = [
        subprocess.Popen(
            [
                *QLC,
                "--runs-dir",
                str(run_dir.parent),
                "sample",
                run_dir.name,
                f"What is {i} plus {i}?",
                "--live",
                "--max-new-tokens",
                "6",
                "--json",
            ],
            cwd=REPO,
            env={**os.environ, "NO_COLOR": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(consoles)
    ]
    ids = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        sample = protocol.decode_event(out.splitlines()[-1])
        assert isinstance(sample, protocol.Sample) and sample.new_tokens > 0
        ids.append(sample.request_id)
    answered = [e.request_id for e in runs.read_events(run_dir)[0] if isinstance(e, protocol.Sample)]
    for request_id in ids:
        assert answered.count(request_id) == 1, (request_id, answered)
    return {"requests": len(ids), "answered_once": True}


# ---------------------------------------------------------------------------------------------
# A real full disk: a small tmpfs (root only)
# ---------------------------------------------------------------------------------------------


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


def small_disk_trial(base: Path, size_mb: int = 4) -> dict:
    """The run directory lives on a filesystem of `size_mb` MB: a checkpoint save runs it out of
    space for real. The run must fail with one disk_full error naming the intact checkpoint, leave
    nothing partial, and, once the filesystem is grown (space freed), resume to the end."""
    mount_point = Path(tempfile.mkdtemp(prefix="qlc-small-disk-", dir=base))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(mount_point)],
        check=True,
        capture_output=True,
    )
    try:
        runs_dir = mount_point / "runs"
        result = qlc(
            "--runs-dir",
            str(runs_dir),
            "train",
            "tiny-demo",
            *sets("train.max_steps=30", "train.save_total_limit=20"),
            env=env(),
        )
        (run_dir,) = runs.list_run_dirs(runs_dir)
        last = sessions(run_dir)[-1]
        assert result.returncode == 1, result.stdout[-1500:] + result.stderr[-1500:]
        (error,) = last.errors
        assert error.kind == "disk_full", error
        state = checkpoint_state(run_dir)
        assert state["partial"] == [] and state["complete"], state
        newest = runs.find_checkpoint(run_dir)
        assert f"{newest.name} is intact" in error.message, error.message
        assert last.finished and last.finished.last_checkpoint == str(newest)
        line = _one_line_error(result, "disk_full")
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount_point)], check=True, capture_output=True)
        finish(run_dir)
        compared = check_resume_reproduces(run_dir)
        return {
            "size_mb": size_mb,
            "error": line,
            "intact": newest.name,
            "resumed_and_completed": True,
            "steps_compared": compared,
        }
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)
        shutil.rmtree(mount_point, ignore_errors=True)
