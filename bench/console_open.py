"""Time to open a 100,000-step run's events file, and the memory it takes.

`load` is the fold alone (read in 4 MB chunks, decode, fold into the history and its chart
summaries), in this process. `console` is end to end in a console process: from asking it to
attach to the run at start-up to the Dashboard having drawn the whole history. Target: under 2 s.

    python bench/console_open.py [--steps 100000]
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

from bench.console_common import REPO, make_history, rss_mb, write_result


def tmux_open(root: Path, name: str, steps: int) -> float | None:
    """In a real 120x40 terminal: from spawning `qlc --attach`-style to the Dashboard showing the
    last step of the history (capture-pane polled every 5 ms)."""
    if shutil.which("tmux") is None:
        return None
    session = f"qlc-bench-{time.monotonic_ns()}"
    command = (
        f"{sys.executable} {REPO / 'bench' / 'console_common.py'} console --runs-dir {root} --attach {name}"
    )
    start = time.monotonic()
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "40", command], check=True)
    try:
        while time.monotonic() - start < 30:
            screen = subprocess.run(
                ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
            ).stdout
            if f"{steps}/{steps}" in screen and "completed" in screen:
                return round(time.monotonic() - start, 3)
            time.sleep(0.005)
        return None
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100_000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp()) / "runs"
    name = "20260101-000000-long-run"
    run_dir = make_history(root, name, args.steps)
    size_mb = (run_dir / "events.jsonl").stat().st_size / 1e6

    from tui.client import load_history
    from tui.widgets.line_chart import ChartSeries, LineChart  # noqa: F401 - imported as the console does

    rss0 = rss_mb()
    start = time.perf_counter()
    history, _ = load_history(run_dir)
    load_s = time.perf_counter() - start
    fold_rss = rss_mb() - rss0
    start = time.perf_counter()
    for _ in range(10):
        history.loss.columns(226)  # a 120-column chart's dot columns
    fold_columns_ms = (time.perf_counter() - start) / 10 * 1000

    ready = Path(tempfile.mkdtemp()) / "ready.json"
    start_wall = time.time()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "console_common.py"), "console", "--runs-dir", str(root),
         "--attach", name, "--headless", "--ready-file", str(ready), "--exit-after", "15"],
        cwd=REPO,
    )  # fmt: skip
    loaded_file = Path(str(ready) + ".loaded")
    deadline = time.monotonic() + 30
    while not loaded_file.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    first = json.loads(ready.read_text())
    loaded = json.loads(loaded_file.read_text())
    proc.terminate()
    proc.wait(10)
    in_terminal = tmux_open(root, name, args.steps)
    result = {
        "benchmark": "console opens a long run",
        "steps": args.steps,
        "events": history.events,
        "events_file_mb": round(size_mb, 1),
        "load_history_s": round(load_s, 3),
        "history_memory_mb": round(fold_rss, 1),
        "chart_fold_ms_per_frame": round(fold_columns_ms, 2),
        "console_start_to_first_frame_s": round(first["first_frame"] - start_wall, 3),
        "console_start_to_history_drawn_s": round(loaded["loaded"] - start_wall, 3),
        "console_open_after_first_frame_s": round(loaded["loaded"] - first["first_frame"], 3),
        "console_rss_mb_with_history": round(loaded["rss_mb"], 1),
        "tmux_start_to_history_on_screen_s": in_terminal,
        "target": "under 2 s",
    }
    print(json.dumps(result, indent=2))
    print("wrote", write_result("console-open", result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
