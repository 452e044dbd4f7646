"""Time to first frame of the console, and its resident memory then.

Headless: from spawning `python` to the app's first refresh (imports, compose of all five panes,
the preset list, the first layout and render). In tmux (when installed): from spawning `qlc` in a
real 80x24 terminal to the tab bar appearing on screen, and to the first useful screen, the
presets list with its presets (capture-pane polled).

    python bench/console_startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.console_common import REPO, write_result


def headless_once(runs_dir: Path) -> dict:
    ready = Path(tempfile.mkdtemp()) / "ready.json"
    start = time.time()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "console_common.py"), "console", "--runs-dir", str(runs_dir),
         "--headless", "--width", "80", "--height", "24", "--ready-file", str(ready), "--exit-after", "1.0"],
        cwd=REPO,
    )  # fmt: skip
    proc.wait(30)
    data = json.loads(ready.read_text())
    return {"seconds": data["first_frame"] - start, "rss_mb": data["rss_mb"]}


def tmux_once(runs_dir: Path) -> tuple[float, float] | None:
    """(seconds to the tab bar, seconds to the presets listed), or None without tmux."""
    if shutil.which("tmux") is None:
        return None
    qlc = REPO / ".venv" / "bin" / "qlc"
    command = f"{qlc if qlc.exists() else sys.executable + ' -m tui.cli'} --runs-dir {runs_dir}"
    session = f"qlc-bench-{time.monotonic_ns()}"
    command = f"env -u COLUMNS -u LINES {command}"  # the terminal's size is tmux's
    start = time.monotonic()
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", command], check=True)
    first = None
    try:
        while time.monotonic() - start < 20:
            screen = subprocess.run(
                ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
            ).stdout
            if first is None and "5 Sample" in screen and "presets" in screen:
                first = time.monotonic() - start
            if first is not None and "tiny-demo" in screen:  # a preset in the list
                return first, time.monotonic() - start
            time.sleep(0.005)
        return None
    finally:
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=False)
        time.sleep(0.3)
        subprocess.run(["tmux", "kill-session", "-t", session], check=False, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    runs_dir = Path(tempfile.mkdtemp()) / "runs"
    headless_once(runs_dir)  # warm the OS file cache and .pyc files: measure steady start-ups
    runs = [headless_once(runs_dir) for _ in range(args.repeat)]
    both = [t for t in (tmux_once(runs_dir) for _ in range(args.repeat)) if t is not None]
    tmux, listed = [t[0] for t in both], [t[1] for t in both]
    result = {
        "benchmark": "console time to first frame",
        "headless_first_frame_s": {
            "median": statistics.median(r["seconds"] for r in runs),
            "all": [r["seconds"] for r in runs],
        },
        "rss_at_first_frame_mb": statistics.median(r["rss_mb"] for r in runs),
        "tmux_first_frame_s": {"median": statistics.median(tmux), "all": tmux} if tmux else None,
        "tmux_presets_listed_s": {"median": statistics.median(listed), "all": listed} if listed else None,
        "target": "the presets listed in under 1 s",
    }
    print(json.dumps(result, indent=2))
    print("wrote", write_result("console-startup", result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
