"""Every wait between the processes of a run ends, with one line that names it; a hang leaves every
thread's stack in the run's folder. On CPUs: torchrun, gloo, the tiny model, the real `qlc`.

- torchrun's command line carries only flags an older torchrun knows (torch 2.11's refused
  --shutdown-timeout, and a world of one on the GPU machine never started); newer settings go by
  its PET_* variables.
- A torchrun that cannot start: `qlc train` says why, in one line, detached or not.
- The watchdog (engine/train/watchdog.py): a guarded wait past its limit reports and exits; SIGUSR1
  and a stall dump every thread's stack.
- A torchrun world of one (QLC_TORCHRUN=1, hardware.gpus=1): train, a live sample, the stacks on
  demand, `qlc stop`, `qlc resume`.
- A rank that stops answering (QLC_FAULT=stall_rank=R@POINT) at each point the others wait for
  it: their wait ends within its limit, with its message, in the events (rank 0) or engine.log
  (the others), and `qlc train` prints it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine import protocol
from engine.errors import UserError
from engine.run import distributed, runs
from engine.train import faults
from tests.conftest import REPO, qlc

TRAIN = [
    "train.logging_steps=1",
    "train.save_steps=100",
    "train.eval_steps=0",
    "data.val_fraction=0",
    "train.micro_batch=4",
]


def _sets(*overrides: str) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def _events(run_dir: Path) -> list[protocol.Event]:
    return runs.read_events(run_dir)[0]


def _processes_of(run_dir: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(run_dir).encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _gone(run_dir: Path, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while (_processes_of(run_dir) or runs.is_running(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _processes_of(run_dir) and not runs.is_running(run_dir)


# ---------------------------------------------------------------------------------------------
# torchrun's command line and environment
# ---------------------------------------------------------------------------------------------


def test_torchrun_gets_old_flags_and_new_settings_by_environment() -> None:
    from torch.distributed.run import get_args_parser

    cmd = distributed.torchrun_command(
        2, ["train", "/runs/x"], timeouts=distributed.Timeouts(rendezvous_s=77)
    )
    # torch 2.11's torchrun exits with "unrecognized arguments: --shutdown-timeout=120": only flags
    # torchrun has had since torch 2.4 go on the command line.
    assert not [a for a in cmd if a.startswith(("--shutdown-timeout", "--signals-to-handle", "--local-addr"))]
    env = distributed.torchrun_env()
    assert {k for k in env if k.startswith("PET_")} == {
        "PET_SHUTDOWN_TIMEOUT",
        "PET_SIGNALS_TO_HANDLE",
        "PET_LOCAL_ADDR",
    }
    assert "PET_LOCAL_ADDR" not in distributed.torchrun_env(distributed.Nodes(2, 0, "h:1"))
    # The installed torchrun reads them (argparse_util.env: PET_<DEST> is an option's default).
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        args = get_args_parser().parse_args(cmd[3:])
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert (args.standalone, args.nproc_per_node, args.module, args.training_script) == (
        True,
        "2",
        True,
        "engine",
    )
    assert args.rdzv_conf == "join_timeout=77,timeout=77" and args.training_script_args == [
        "train",
        "/runs/x",
    ]
    assert (args.signals_to_handle, args.local_addr) == ("SIGTERM,SIGINT", "127.0.0.1")
    assert str(args.shutdown_timeout) == str(distributed.SHUTDOWN_TIMEOUT_S)


def test_timeouts_come_from_the_environment_and_bad_values_name_the_variable() -> None:
    t = distributed.Timeouts.from_env({"QLC_COLLECTIVE_TIMEOUT_S": "45", "QLC_STALL_DUMP_S": "0"})
    assert (t.collective_s, t.stall_s, t.rendezvous_s) == (45.0, 0.0, distributed.Timeouts().rendezvous_s)
    for name, value in (
        ("QLC_COLLECTIVE_TIMEOUT_S", "0"),
        ("QLC_RDZV_TIMEOUT_S", "soon"),
        ("QLC_STALL_DUMP_S", "-1"),
    ):
        with pytest.raises(UserError, match=f"{name}='{value}': expected a number of seconds"):
            distributed.Timeouts.from_env({name: value})


def test_stall_fault_forms() -> None:
    assert faults.parse("stall_rank=1@step=3").stall_rank == "1@step=3"
    assert (
        faults.parse("slow_step=0.1,stall_rank=0@sources").describe() == "slow_step=0.1,stall_rank=0@sources"
    )
    for bad in ("stall_rank=1", "stall_rank=x@end", "stall_rank=1@step=0", "stall_rank=1@lunch"):
        with pytest.raises(UserError, match="has a bad value"):
            faults.parse(bad)


@pytest.mark.parametrize("detach", [True, False])
def test_a_torchrun_that_cannot_start_is_one_line(tmp_path: Path, detach: bool) -> None:
    """torchrun refusing its settings (here a PET_ variable with a bad value, as an unknown flag
    was refused by torch 2.11's) exits at once: `qlc train` says so with torchrun's own words."""
    result = qlc(
        "--runs-dir",
        str(tmp_path),
        "train",
        "tiny-demo",
        *_sets("hardware.device=cpu", "hardware.gpus=2"),
        *(["--detach"] if detach else []),
        env={"PET_MAX_RESTARTS": "many"},
        timeout=120,
    )
    assert result.returncode == (2 if detach else 1), result.stdout + result.stderr
    said = " ".join(result.stderr.split())  # the console wraps long lines
    assert "argument --max-restarts/--max_restarts: invalid int value: 'many'" in said
    assert ("before it started" if detach else "without finishing") in said and "Traceback" not in said
    (run_dir,) = runs.list_run_dirs(tmp_path)
    assert _gone(run_dir, 10)


# ---------------------------------------------------------------------------------------------
# The watchdog, in a process of its own (no torch)
# ---------------------------------------------------------------------------------------------

WATCHED = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from engine.run.events import Emitter, FileSink
    from engine.train import watchdog

    run_dir, mode = Path(sys.argv[1]), sys.argv[2]
    emitter = Emitter([FileSink(run_dir / "events.jsonl")])
    watchdog.install(run_dir, 0, emitter.emit, stall_s=1.0 if mode == "stall" else 0.0)
    print("ready", flush=True)

    def blocked_in_a_test_wait():
        time.sleep(60)

    if mode == "wait":
        with watchdog.waiting("the test's wait", 1.0, "nothing to do"):
            blocked_in_a_test_wait()
    else:
        blocked_in_a_test_wait()
    """
)


def _watched(tmp_path: Path, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WATCHED, str(tmp_path), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_a_guarded_wait_past_its_limit_reports_dumps_and_exits(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = _watched(tmp_path, "wait")
    assert proc.wait(timeout=30) == 1 and time.monotonic() - t0 < 20
    error, finished = _events(tmp_path)[-2:]
    assert isinstance(error, protocol.ErrorEvent) and error.kind == "timeout"
    assert error.message == "rank 0: the test's wait did not finish within 1 s"
    assert str(distributed.stack_file(tmp_path, 0)) in error.hint
    assert isinstance(finished, protocol.Finished) and finished.status == "failed"
    stacks = distributed.stack_file(tmp_path, 0).read_text()
    assert "timeout: the test's wait did not finish within 1 s" in stacks
    assert "in blocked_in_a_test_wait" in stacks


def test_sigusr1_and_a_stall_dump_every_thread(tmp_path: Path) -> None:
    proc = _watched(tmp_path, "stall")
    try:
        path = distributed.stack_file(tmp_path, 0)
        assert distributed._catches(proc.pid, signal.SIGUSR1)
        os.kill(proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while "in blocked_in_a_test_wait" not in path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        on_demand = path.read_text()
        assert "in blocked_in_a_test_wait" in on_demand and "in _monitor" in on_demand  # every thread
        assert proc.poll() is None  # dumped, and still running
        # No step for 1 s: faulthandler's timer dumps again, and a warning says where.
        deadline = time.monotonic() + 15
        while (
            not [e for e in _events(tmp_path) if isinstance(e, protocol.Log)] and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        (warning, *_) = [e for e in _events(tmp_path) if isinstance(e, protocol.Log)]
        assert warning.level == "warning" and "no optimizer step for" in warning.message
        assert str(path) in warning.message
        # faulthandler's timer thread writes the dump on its own clock, beside the warning: wait
        # for it (it lagged the warning once on a loaded machine).
        deadline = time.monotonic() + 10
        while "Timeout (0:00:01)!" not in path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "Timeout (0:00:01)!" in path.read_text()
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------
# A torchrun world of one on CPUs, through qlc
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_world_of_one_trains_samples_stops_and_resumes(tmp_path: Path) -> None:
    env = {distributed.FORCE_TORCHRUN: "1", "OMP_NUM_THREADS": "1"}
    overrides = ["hardware.device=cpu", "hardware.gpus=1", *TRAIN, "train.max_steps=10"]
    # Steps of a second at least: on a loaded machine the ten steps were over before the stop came.
    slow = {**env, "QLC_FAULT": "slow_step=1"}
    started = qlc("--runs-dir", str(tmp_path), "train", "tiny-demo", *_sets(*overrides), "--detach", env=slow)
    assert started.returncode == 0, started.stderr
    (run_dir,) = runs.list_run_dirs(tmp_path)
    assert runs.is_running(run_dir)  # qlc train --detach returns once the engine runs
    assert [
        p
        for p in _processes_of(run_dir)
        if b"torch.distributed.run" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]
    deadline = time.monotonic() + 180
    while not [e for e in _events(run_dir) if isinstance(e, protocol.Step)] and time.monotonic() < deadline:
        time.sleep(0.2)

    dumped = distributed.dump_stacks(run_dir)  # where rank 0 is, while it trains
    assert list(dumped) == [0]
    # faulthandler writes one thread after another (the FIFO reader's may come first): wait for the
    # main thread's frames, not just the first thread's header.
    deadline = time.monotonic() + 10
    while "engine/train/recipe.py" not in dumped[0].read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "engine/train/recipe.py" in dumped[0].read_text()

    live = qlc(
        "--runs-dir", str(tmp_path), "sample", run_dir.name, "--live", "Hi", "--max-new-tokens", "4", "--json"
    )
    assert live.returncode == 0, live.stderr
    stop = qlc("--runs-dir", str(tmp_path), "stop", run_dir.name)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert _gone(run_dir)
    resumed = qlc("--runs-dir", str(tmp_path), "resume", run_dir.name, env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    events = _events(run_dir)
    hellos = [e for e in events if isinstance(e, protocol.Hello)]
    assert [(h.mode, h.world_size, h.device) for h in hellos] == [
        ("train", 1, "1 x cpu (gloo, ddp)"),
        ("resume", 1, "1 x cpu (gloo, ddp)"),
    ]
    assert [e.status for e in events if isinstance(e, protocol.Finished)] == ["stopped", "completed"]
    assert len([e for e in events if isinstance(e, protocol.Sample)]) == 1
    assert not [e for e in events if isinstance(e, protocol.ErrorEvent)]
    assert any(
        isinstance(e, protocol.Log) and e.message.startswith("process group: gloo, 1 rank") for e in events
    )
    assert _gone(run_dir)


# ---------------------------------------------------------------------------------------------
# A rank that stops answering: the others' waits end, with their line
# ---------------------------------------------------------------------------------------------

LIMIT_S = 14  # the wait between ranks in these runs (QLC_COLLECTIVE_TIMEOUT_S): each case waits it out once
QUIET_S = 8  # rank 0's silence the others accept while waiting for sources.json


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, steps, where, needle",
    [
        (
            "stall_rank=1@init",
            3,
            "events",
            r"rank 0 waited \d+ s for the process group \(gloo, 2 ranks\) to start",
        ),
        (
            "stall_rank=0@sources",
            3,
            "log",
            r"\[rank 1\] error \(timeout\): no \S+sources\.json from rank 0 after \d+ s without an event from it",
        ),
        (
            "stall_rank=0@step=2",
            6,
            "log",
            r"\[rank 1\] error \(timeout\): rank 1 waited \d+ s for rank 0's commands after step 2",
        ),
        (
            "stall_rank=1@end",
            2,
            "events",
            r"rank 0 waited \d+ s at the end of the run: rank 1 did not arrive",
        ),
    ],
)
def test_a_stalled_rank_ends_the_others_waits_with_one_line(
    tmp_path: Path, fault: str, steps: int, where: str, needle: str
) -> None:
    import re

    env = {
        "QLC_FAULT": fault,
        "QLC_COLLECTIVE_TIMEOUT_S": str(LIMIT_S),
        "QLC_SOURCES_TIMEOUT_S": str(QUIET_S),
        "OMP_NUM_THREADS": "1",
        "PET_SHUTDOWN_TIMEOUT": "5",  # the stalled rank exits on SIGTERM at once anyway
    }
    overrides = ["hardware.device=cpu", "hardware.gpus=2", *TRAIN, f"train.max_steps={steps}"]
    t0 = time.monotonic()
    result = qlc("--runs-dir", str(tmp_path), "train", "tiny-demo", *_sets(*overrides), env=env, timeout=240)
    took = time.monotonic() - t0
    assert result.returncode == 1, result.stdout + result.stderr
    said = " ".join(result.stderr.split())  # the console wraps long lines
    (run_dir,) = runs.list_run_dirs(tmp_path)
    log = (run_dir / runs.ENGINE_LOG).read_text()
    if where == "events":  # rank 0 waited: an ErrorEvent and a failed end, on the console too
        events = _events(run_dir)
        error = next(e for e in events if isinstance(e, protocol.ErrorEvent))
        assert error.kind == "timeout" and re.match(needle, error.message), error
        assert "QLC_COLLECTIVE_TIMEOUT_S sets the limit" in error.hint
        assert isinstance(events[-1], protocol.Finished) and events[-1].status == "failed"
        assert re.search(needle, said)
    else:  # another rank waited: its line in engine.log, and `qlc train` prints it
        assert re.search(needle, log), log[-3000:]
        assert re.search(needle, said), said
    waited = int(re.search(r"(\d+) s", re.search(needle, said).group(0)).group(1))
    assert (QUIET_S if "sources" in fault else LIMIT_S) - 1 <= waited < took
    assert _gone(run_dir, 30)


@pytest.mark.slow
def test_qlc_stop_that_times_out_says_where_each_rank_is(tmp_path: Path) -> None:
    """A step slower than `qlc stop --timeout`: qlc stop gives up with every rank's stacks."""
    overrides = ["hardware.device=cpu", *TRAIN, "train.max_steps=50"]
    env = {"QLC_FAULT": "slow_step=6"}
    started = qlc("--runs-dir", str(tmp_path), "train", "tiny-demo", *_sets(*overrides), "--detach", env=env)
    assert started.returncode == 0, started.stderr
    (run_dir,) = runs.list_run_dirs(tmp_path)
    deadline = time.monotonic() + 120
    while not [e for e in _events(run_dir) if isinstance(e, protocol.StageEvent) and e.stage == "training"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    stop = qlc("--runs-dir", str(tmp_path), "stop", run_dir.name, "--timeout", "2")
    said = " ".join(stop.stderr.split())
    stacks = distributed.stack_file(run_dir, 0)
    assert stop.returncode == 1 and f"where each rank is: {stacks}" in said, said
    deadline = time.monotonic() + 10
    while "engine/train/faults.py" not in stacks.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "in before_step" in stacks.read_text()  # the slow step, where the run was
    assert _gone(run_dir, 60)  # the stop still applies at the step's end
    assert [e.status for e in _events(run_dir) if isinstance(e, protocol.Finished)] == ["stopped"]
