"""CPU use of the console while it follows a run emitting 20 step events a second.

Two ways of following, both on the Dashboard, over a fixed window after a warm-up:
- `attached`: the run was started detached; the console tails its events.jsonl.
- `launched`: the console started the run itself and reads the engine's stdout pipe.
And where it runs: headless (rendering without a terminal) and, when tmux is installed, in a
real 120x40 terminal. The figure is the console process's user+system CPU time over wall time,
as a percentage of one core. Target: under 10%.

    python bench/console_follow.py [--seconds 20] [--rate 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.console_common import REPO, cpu_seconds, rss_mb, start_fake_run, stop_run, write_result

CONSOLE = [sys.executable, str(REPO / "bench" / "console_common.py"), "console"]


def _measure(pid: int, seconds: float, warmup: float) -> dict:
    time.sleep(warmup)
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    c1, t1 = cpu_seconds(pid), time.monotonic()
    return {"cpu_percent_of_one_core": round(100 * (c1 - c0) / (t1 - t0), 2), "rss_mb": round(rss_mb(pid), 1)}


def headless(mode: str, root: Path, rate: float, seconds: float) -> dict:
    extra: list[str] = []
    run = proc = None
    if mode == "attached":
        run, proc = start_fake_run(root, f"20260101-000000-follow-{time.monotonic_ns()}", rate)
        extra = ["--attach", run.name]
    else:
        extra = ["--start", str(rate)]
    console = subprocess.Popen([*CONSOLE, "--runs-dir", str(root), "--headless", *extra], cwd=REPO)
    try:
        return _measure(console.pid, seconds, warmup=3.0)
    finally:
        console.terminate()
        console.wait(10)
        if run is not None and proc is not None:
            stop_run(run, proc)
        _stop_all(root)


def in_tmux(mode: str, root: Path, rate: float, seconds: float) -> dict | None:
    if shutil.which("tmux") is None:
        return None
    extra = ""
    run = proc = None
    if mode == "attached":
        run, proc = start_fake_run(root, f"20260101-000000-follow-{time.monotonic_ns()}", rate)
        extra = f"--attach {run.name}"
    else:
        extra = f"--start {rate}"
    session = f"qlc-bench-{time.monotonic_ns()}"
    command = " ".join([*CONSOLE, "--runs-dir", str(root), extra])
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "40", command], check=True)
    try:
        time.sleep(0.5)
        pid = int(
            subprocess.run(
                ["tmux", "display", "-p", "-t", session, "#{pane_pid}"], capture_output=True, text=True
            ).stdout
        )
        return _measure(pid, seconds, warmup=3.0)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False, capture_output=True)
        if run is not None and proc is not None:
            stop_run(run, proc)
        _stop_all(root)


def _stop_all(root: Path) -> None:
    """Runs the console launched itself keep going after it is killed (as they should): stop them."""
    from engine import protocol
    from engine.run import runs

    for run_dir in runs.list_run_dirs(root):
        if runs.is_running(run_dir):
            runs.send_command(run_dir, protocol.Stop())
    deadline = time.monotonic() + 10
    while any(runs.is_running(d) for d in runs.list_run_dirs(root)) and time.monotonic() < deadline:
        time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=20.0, help="step events a second")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp()) / "runs"
    root.mkdir()
    result: dict = {
        "benchmark": "console CPU while following a run",
        "events_per_second": args.rate,
        "window_s": args.seconds,
    }
    for mode in ("attached", "launched"):
        result[f"headless_{mode}"] = headless(mode, root, args.rate, args.seconds)
        result[f"tmux_{mode}"] = in_tmux(mode, root, args.rate, args.seconds)
        print(mode, result[f"headless_{mode}"], result[f"tmux_{mode}"], flush=True)
    result["target"] = "under 10% of one core"
    print(json.dumps(result, indent=2))
    print("wrote", write_result("console-follow", result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
