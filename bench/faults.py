"""The fault campaigns: each fault of docs/reliability.md repeated (20 trials by default) on the
real engine and the tiny preset, on this machine's CPU. Writes bench/results/faults-<date>.json
with every trial's outcome and the counts. `make faults` runs it (about half an hour on 2 cores).

    python -m bench.faults [--trials 20] [--only engine_kill,console_kill,...] [--seed N]

Campaigns (the trial functions, and what each one checks, are in tests/reliability/trials.py):
  engine_kill   one run, SIGKILLed 20 times at random moments of training (one in three inside a
                checkpoint save, through QLC_FAULT=kill_in_save) and resumed each time, then run to
                the end. A trial survives when nothing partial was ever listed as a checkpoint,
                every listed checkpoint passed SHA-256 verification, the next session resumed from
                the newest complete one, and it reproduced the killed session's losses.
  console_kill  20 runs: the launching `qlc train` is killed (SIGHUP as when SSH drops, or
                SIGKILL) mid-run, the run keeps training; two new consoles attach and see the whole
                history, both ask for a live sample (each answered once) and both send stop (applied
                once); a third stop is refused in one line.
  oom           20 sessions of one run, each hit by an out-of-memory error at a random step.
  nan           20 sessions, each given a NaN loss at a random step (logging every 2 steps and
                saving every 3, so some land on a save before the log sees them).
  disk_full     20 sessions whose checkpoint save fails with ENOSPC (QLC_FAULT=disk_full_in_save),
                plus `small_disk` trials on a real 4 MB tmpfs (root only), grown and resumed after.
  dataset       20 resumes asked after the run's dataset was edited or deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.run import checkpoints, runs  # noqa: E402
from tests.reliability import trials  # noqa: E402

RESULTS = REPO / "bench" / "results"
DATA = REPO / "presets" / "data" / "tiny-instruct.jsonl"


def _attempt(fn: Callable[[], dict]) -> dict:
    """One trial: survived with its details, or not, with the evidence."""
    t0 = time.monotonic()
    try:
        out = {"survived": True, **fn()}
    except AssertionError as exc:
        out = {"survived": False, "failure": str(exc)[:2000]}
    except Exception as exc:  # a harness problem is a failed trial too, never a silent pass
        out = {"survived": False, "failure": "".join(traceback.format_exception_only(exc))[:2000]}
    out["seconds"] = round(time.monotonic() - t0, 1)
    status = "ok" if out["survived"] else f"FAILED: {out['failure'][:300]}"
    print(f"    trial {status} ({out['seconds']} s)", flush=True)
    return out


def _summary(name: str, results: list[dict], **extra: Any) -> dict:
    survived = sum(1 for r in results if r["survived"])
    print(f"  {name}: {survived}/{len(results)} survived", flush=True)
    return {"trials": len(results), "survived": survived, **extra, "results": results}


def engine_kill(work: Path, n: int, rng: random.Random) -> dict:
    steps = 40 + 12 * n
    kills: list[dict] = []
    run_dir, first = trials.first_kill_trial(work / "kill-runs", rng, f"train.max_steps={steps}")
    kills.append(first)
    print(f"    kill 1: after step {first['killed_after_step']}", flush=True)
    for i in range(1, n):
        in_save = i % 3 == 1
        try:
            kills.append(trials.kill_trial(run_dir, rng, in_save=in_save))
        except AssertionError as exc:
            kills.append({"failure": str(exc)[:2000], "in_save_fault": in_save})
        k = kills[-1]
        print(
            f"    kill {i + 1}: {'in a save' if in_save else 'random'}, after step {k.get('killed_after_step')}, "
            f"partial save left: {k.get('partial_save_left')}",
            flush=True,
        )
    finish = _attempt(lambda: {"completed": trials.finish(run_dir, fault="audit_loads").returncode == 0})
    sessions = trials.sessions(run_dir)
    # Trial i killed session i; it survived when session i+1 started from the newest complete
    # checkpoint left after the kill and reproduced every loss both sessions logged.
    results = []
    for i, kill in enumerate(kills):
        problems = []
        if "failure" in kill:
            problems.append(kill["failure"])
        elif i + 1 < len(sessions):
            after = sessions[i + 1]
            newest = kill["complete_after"][-1] if kill["complete_after"] else None
            if after.hello.resumed_from != newest:
                problems.append(f"resumed from {after.hello.resumed_from}, newest complete was {newest}")
            before = sessions[i]
            for step in sorted(set(before.steps) & set(after.steps)):
                if abs(before.steps[step] - after.steps[step]) > trials.LOSS_TOLERANCE:
                    problems.append(f"step {step}: {before.steps[step]} then {after.steps[step]}")
        else:
            problems.append("no session after this kill")
        results.append({"survived": not problems, **kill, **({"problems": problems} if problems else {})})
    loads = trials.audited_loads(run_dir) if finish["survived"] else []
    return _summary(
        "engine_kill",
        results,
        killed_inside_a_save=sum(1 for k in kills if k.get("in_save_fault") or k.get("partial_save_left")),
        partial_saves_left_on_disk=sum(1 for k in kills if k.get("partial_save_left")),
        partial_saves_taken_as_complete=0 if all("failure" not in k for k in kills) else None,
        run_completed=finish["survived"] and sessions[-1].finished is not None,
        final_step=sessions[-1].finished.step if sessions[-1].finished else None,
        steps_reproduced_after_resumes=trials.check_resume_reproduces(run_dir)
        if finish["survived"]
        else None,
        resume_unpickled=loads,
    )


def console_kill(work: Path, n: int, rng: random.Random) -> dict:
    results = []
    for i in range(n):
        sig = signal.SIGHUP if i % 2 == 0 else signal.SIGKILL

        def trial(i: int = i, sig: int = sig) -> dict:
            runs_dir = work / f"console-{i}"
            run_dir, killed = trials.launching_console_kill_trial(
                runs_dir, sig, "train.max_steps=3000", "train.save_steps=1000", fault="slow_step=0.1"
            )
            try:
                samples = trials.live_samples_trial(run_dir, consoles=2)
                stopped = trials.consoles_stop_trial(run_dir, consoles=2)
            finally:
                if runs.is_running(run_dir):
                    os.kill(trials.engine_pid(run_dir), signal.SIGKILL)
            leaks = trials.secret_leaks(run_dir)
            assert not leaks, leaks
            return {**killed, **samples, **stopped}

        results.append(_attempt(trial))
    return _summary("console_kill", results)


def _chain(work: Path, name: str, *extra: str) -> tuple[Path, Path]:
    """A run (and its own copy of the dataset) to hit with session-ending faults: started, and
    stopped once it has two checkpoints. It is long enough never to complete."""
    data = work / f"{name}-data" / DATA.name
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_bytes(DATA.read_bytes())
    run_dir = trials.start(work / f"{name}-runs", "train.max_steps=5000", *extra, data=data)
    trials.wait_for(run_dir, lambda: len(runs.checkpoints(run_dir)) >= 2, what="two checkpoints")
    stop = trials.qlc("--runs-dir", str(run_dir.parent), "stop", run_dir.name)
    assert stop.returncode == 0, stop.stderr
    return run_dir, data


def oom(work: Path, n: int, rng: random.Random) -> dict:
    run_dir, _ = _chain(work, "oom")
    results = [_attempt(lambda: trials.oom_trial(run_dir, steps_ahead=rng.randint(1, 6))) for _ in range(n)]
    return _summary("oom", results)


def nan(work: Path, n: int, rng: random.Random) -> dict:
    run_dir, _ = _chain(work, "nan", "train.logging_steps=2", "train.save_steps=3")

    def trial(i: int) -> dict:
        if i % 2 == 1:
            return trials.nan_trial(run_dir, steps_ahead=rng.randint(1, 8))
        # Every other trial: the first odd multiple of 3 ahead, a save that no log precedes.
        start = checkpoints.step_of(runs.find_checkpoint(run_dir)) or 0
        return trials.nan_trial(run_dir, at=next(s for s in range(start + 1, start + 8) if s % 6 == 3))

    results = [_attempt(lambda i=i: trial(i)) for i in range(n)]
    # A NaN at an odd multiple of 3 reaches a save before any log shows it: the trainer's guard
    # refuses that save. The others are seen by the log of their step or the next.
    by_guard = sum(1 for r in results if r["survived"] and r["at_step"] % 6 == 3)
    return _summary("nan", results, stopped_by_the_save_guard=by_guard)


def disk_full(work: Path, n: int, rng: random.Random, small_disk: int) -> dict:
    run_dir, _ = _chain(work, "disk")
    results = [_attempt(lambda: trials.disk_full_trial(run_dir)) for _ in range(n)]
    real: list[dict] = []
    if trials.can_mount():
        real = [_attempt(lambda: trials.small_disk_trial(work)) for _ in range(small_disk)]
    return _summary(
        "disk_full",
        results,
        small_disk={
            "trials": len(real),
            "survived": sum(1 for r in real if r["survived"]),
            "results": real,
            **({} if real else {"skipped": "needs root to mount a tmpfs"}),
        },
    )


def dataset(work: Path, n: int, rng: random.Random) -> dict:
    run_dir, data = _chain(work, "dataset")
    results = [
        _attempt(lambda i=i: trials.dataset_trial(run_dir, data, "edit" if i % 2 == 0 else "delete"))
        for i in range(n)
    ]
    resumed = _attempt(lambda: trials.restored_dataset_resumes(run_dir))
    return _summary("dataset", results, resumes_once_restored=resumed)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--small-disk", type=int, default=5, help="real tmpfs disk-full trials (root only)")
    parser.add_argument("--only", default="", help="comma-separated campaigns")
    parser.add_argument("--seed", type=int, default=20261123)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    campaigns = {
        "engine_kill": lambda w, r: engine_kill(w, args.trials, r),
        "console_kill": lambda w, r: console_kill(w, args.trials, r),
        "oom": lambda w, r: oom(w, args.trials, r),
        "nan": lambda w, r: nan(w, args.trials, r),
        "disk_full": lambda w, r: disk_full(w, args.trials, r, args.small_disk),
        "dataset": lambda w, r: dataset(w, args.trials, r),
    }
    chosen = [c for c in args.only.split(",") if c] or list(campaigns)
    date = time.strftime("%Y-%m-%d")
    out_path = args.out or RESULTS / f"faults-{date}.json"
    report: dict[str, Any] = {
        "benchmark": "fault-injection campaigns on the real engine (tiny preset, CPU)",
        "machine": {
            "date": date,
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg()[0],
            "running_as_root": os.geteuid() == 0,
            **_versions(),
        },
        "seed": args.seed,
        "campaigns": {},
    }
    if out_path.is_file():  # several --only runs fill one day's file
        previous = json.loads(out_path.read_text())
        report["campaigns"] = previous.get("campaigns", {})
    with tempfile.TemporaryDirectory(prefix="qlc-faults-") as tmp:
        for name in chosen:
            print(f"{name} ({args.trials} trials)", flush=True)
            t0 = time.monotonic()
            work = Path(tmp) / name
            work.mkdir()
            try:
                summary = campaigns[name](work, random.Random(f"{args.seed}-{name}"))
            finally:  # a trial that failed half-way may leave a detached engine running
                for config in work.rglob(runs.CONFIG):
                    trials.kill_engine(config.parent)
            summary["minutes"] = round((time.monotonic() - t0) / 60, 1)
            # Every engine of every trial had HF_TOKEN in its environment.
            summary["files_holding_the_hf_token"] = trials.secret_leaks(work)
            report["campaigns"][name] = summary
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"wrote {out_path}")
    failed = [
        n
        for n, c in report["campaigns"].items()
        if c["survived"] != c["trials"] or c.get("files_holding_the_hf_token")
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
