"""Shared pieces of the console benchmarks: a console process to measure, run directories with
synthetic histories, /proc readings, and the results file.

The console under test is the real app from `tui.app.make_app`, run either headless (Textual's
headless driver: layout, compositing and rendering all happen, the bytes go nowhere) or in a real
terminal under tmux. Engines are the fake engine of tests/tui/fake_engine.py: real protocol, real
run directory and control FIFO, no torch, so the figures are the console's alone.

    python bench/console_common.py console --runs-dir DIR [--attach RUN] [--start STEPS_PER_S]
        [--headless] [--ready-file PATH] [--exit-after SECONDS]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "tui"))

RESULTS = REPO / "bench" / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int | None = None) -> float:
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def machine() -> dict:
    cpu = "?"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            x.split(":", 1)[1].strip()
            for x in Path("/proc/cpuinfo").read_text().splitlines()
            if x.startswith("model name")
        )
    import textual

    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "load_average_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "textual": textual.__version__,
    }


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    return path


def make_history(root: Path, name: str, steps: int) -> Path:
    """A finished run of `steps` logged steps (one event each, plus evals and checkpoints)."""
    import fake_engine

    events = fake_engine.synthetic_run(
        steps, logging_steps=1, eval_every=max(1, steps // 20), save_every=max(1, steps // 10)
    )
    run_dir = fake_engine.make_run_dir(root, name, None)
    fake_engine.write_events(run_dir / "events.jsonl", events)
    return run_dir


def start_fake_run(
    root: Path, name: str, rate: float, steps: int = 1_000_000
) -> tuple[Path, subprocess.Popen]:
    """A detached fake engine emitting `rate` step events a second, as `qlc train --detach` would."""
    import fake_engine

    from engine.run import runs

    run_dir = fake_engine.make_run_dir(root, name, None)
    proc = fake_engine.launcher(steps=steps, rate=rate)(run_dir, pipe=False)
    deadline = time.monotonic() + 10
    while not runs.is_running(run_dir) and time.monotonic() < deadline:
        time.sleep(0.02)
    return run_dir, proc


def stop_run(run_dir: Path, proc: subprocess.Popen) -> None:
    from engine import protocol
    from engine.run import runs

    try:
        runs.send_command(run_dir, protocol.Stop())
        proc.wait(10)
    except Exception:
        proc.kill()


# ---------------------------------------------------------------------------------------------
# The console process
# ---------------------------------------------------------------------------------------------


def run_console(args: argparse.Namespace) -> int:
    import fake_engine

    from tui.app import make_app
    from tui.widgets.dashboard import Dashboard
    from tui.widgets.presets_pane import PresetsPane

    app = make_app(
        args.runs_dir,
        attach=args.attach,
        auto_attach=False,
        launcher=fake_engine.launcher(steps=1_000_000, rate=args.start or 20.0),
        sample_launcher=fake_engine.launch_sample,
    )
    ready = Path(args.ready_file) if args.ready_file else None

    async def pilot_script(pilot) -> None:
        # Textual starts the autopilot on the app's Ready event: the first frame is on screen.
        if ready:
            ready.write_text(json.dumps({"first_frame": time.time(), "rss_mb": rss_mb()}))
        if args.start:
            app.screen.query_one(PresetsPane).select("tiny-demo")
            app.action_start_run()
        elif ready and args.attach:
            while app.history is None or not app.history.events or app.client is None:
                await pilot.pause(0.005)
            app.screen.query_one(Dashboard).refresh()
            await pilot.pause()  # the Dashboard drawn with the whole history
            h = app.history
            Path(str(ready) + ".loaded").write_text(
                json.dumps({"loaded": time.time(), "events": h.events, "rss_mb": rss_mb()})
            )
        if args.exit_after:
            await pilot.pause(args.exit_after)
            app.exit(0)

    app.run(
        headless=args.headless,
        size=(args.width, args.height) if args.headless else None,
        auto_pilot=pilot_script,
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("console")
    c.add_argument("--runs-dir", required=True)
    c.add_argument("--attach")
    c.add_argument("--start", type=float, help="start a fake run emitting this many steps a second")
    c.add_argument("--headless", action="store_true")
    c.add_argument("--width", type=int, default=120)
    c.add_argument("--height", type=int, default=40)
    c.add_argument("--ready-file")
    c.add_argument("--exit-after", type=float)
    args = parser.parse_args()
    return run_console(args)


if __name__ == "__main__":
    sys.exit(main())
