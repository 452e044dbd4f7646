"""A real CUDA out-of-memory, verified once on a GPU machine: what the CPU suite provokes with a
fault hook (QLC_FAULT=oom_at_step), here comes from the CUDA caching allocator itself.

The tiny preset trains on the GPU and is killed inside its third checkpoint save (checkpoints 4
and 8 complete). It is resumed with the allocator capped below what a step needs
(QLC_FAULT=gpu_memory_limit_gb, applied at the first step after the resume has loaded its state),
through `qlc resume` in the foreground, the console a person watches. Then it is resumed again
without the cap and must complete.

    python bench/gpu_oom.py OUT.json     (on the GPU machine; see shared/gpu/README.md for the setup)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine import protocol  # noqa: E402
from engine.run import runs  # noqa: E402

SETS = [
    "train.max_steps=24",
    "train.save_steps=4",
    "train.logging_steps=1",
    "train.eval_steps=0",
    "data.val_fraction=0",
    "train.micro_batch=4",
    "hardware.device=cuda",
]


def qlc(runs_dir: Path, *args: str, fault: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "QLC_FAULT": fault}
    return subprocess.run(
        [sys.executable, "-m", "tui.cli", "--runs-dir", str(runs_dir), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=900,
    )


def main(out: Path) -> int:
    import torch

    runs_dir = Path(tempfile.mkdtemp(prefix="qlc-gpu-oom-")) / "runs"
    sets = [x for s in SETS for x in ("--set", s)]
    first = qlc(runs_dir, "train", "tiny-demo", *sets, fault="kill_in_save=3")
    (run_dir,) = runs.list_run_dirs(runs_dir)
    before = [p.name for p in runs.checkpoints(run_dir)]
    t0 = time.monotonic()
    oom = qlc(runs_dir, "resume", run_dir.name, fault="gpu_memory_limit_gb=0.001")
    seconds = time.monotonic() - t0
    events = runs.read_events(run_dir)[0]
    last_hello = max(i for i, e in enumerate(events) if isinstance(e, protocol.Hello))
    session = events[last_hello:]
    errors = [e for e in session if isinstance(e, protocol.ErrorEvent)]
    finished = next((e for e in session if isinstance(e, protocol.Finished)), None)
    again = qlc(runs_dir, "resume", run_dir.name)
    final = runs.read_events(run_dir)[0][-1]
    log = (run_dir / runs.ENGINE_LOG).read_text(errors="replace")
    result = {
        "benchmark": "a real CUDA out-of-memory ends a run cleanly (verified once)",
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "killed_in_third_save": {"console_exit": first.returncode, "checkpoints_left": before},
        "oom_session": {
            "console_exit": oom.returncode,
            "seconds": round(seconds, 1),
            "errors": [protocol.encode(e).decode().strip() for e in errors],
            "finished": protocol.encode(finished).decode().strip() if finished else None,
            "console_stderr": oom.stderr.strip().splitlines()[-12:],
            "console_stdout_tail": oom.stdout.strip().splitlines()[-3:],
            "traceback_in_console": "Traceback" in oom.stderr + oom.stdout,
            "cap_note": [line for line in log.splitlines() if "capped at" in line][-1:],
        },
        "resumed_without_the_cap": {
            "console_exit": again.returncode,
            "status": getattr(final, "status", None),
            "step": getattr(final, "step", None),
        },
    }
    ok = (
        first.returncode != 0
        and before == ["checkpoint-4", "checkpoint-8"]
        and oom.returncode == 1
        and [e.kind for e in errors] == ["out_of_memory"]
        and bool(errors[0].advice)
        and finished is not None
        and finished.status == "failed"
        and finished.last_checkpoint == str(run_dir / runs.CHECKPOINTS / "checkpoint-8")
        and not result["oom_session"]["traceback_in_console"]
        and again.returncode == 0
        and getattr(final, "status", None) == "completed"
    )
    result["verified"] = ok
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
