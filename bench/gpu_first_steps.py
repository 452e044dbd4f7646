"""What `qlc train` prints in its first steps on a GPU: the launch breakdown and the utilisation
(MFU) on each step line, for a full-size architecture with random weights, with the run's figures
written as JSON (tokens/s, FLOPs per token, the card's peak, MFU per step).

    python bench/gpu_first_steps.py --out DIR [--arch llama-3.2-1b] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_common import ARCHS, build_model_in_child, report_header, token_run_overrides, write_tokens
from engine import protocol
from engine.run import runs

QLC = [sys.executable, "-m", "tui.cli"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default="llama-3.2-1b", choices=sorted(ARCHS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/qlc-first-steps"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, data, runs_dir = args.work / args.arch, args.work / "tokens.jsonl", args.work / "runs"
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    print(f"building {args.arch} ...", flush=True)
    built = build_model_in_child(args.arch, model)
    write_tokens(data, args.steps * args.micro_batch + 8, args.seq, ARCHS[args.arch]["vocab_size"])
    sets = token_run_overrides(model, data, args.seq, args.micro_batch, 1, args.steps)
    sets += ["hardware.backend=hf", "hardware.gpu=auto", "train.gradient_checkpointing=true"]
    # The preset names its own architecture for the memory model: name the one built here.
    sets += [f"model.arch={args.arch}"] if args.arch != "tiny" else []
    cmd = [*QLC, "--runs-dir", str(runs_dir), "train", "llama-3.1-8b-rtx4090"]
    cmd += [x for s in sets for x in ("--set", s)]
    t0 = time.time()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    )
    (args.out / "qlc-train.txt").write_text(proc.stdout + proc.stderr)
    print(proc.stdout[-6000:], proc.stderr[-2000:], flush=True)
    (run_dir,) = runs.list_run_dirs(runs_dir)
    events, _ = runs.read_events(run_dir)
    estimate = next((e for e in events if isinstance(e, protocol.EstimateEvent)), None)
    steps = [e for e in events if isinstance(e, protocol.Step)]
    result = {
        **report_header(args.arch, {"seq": args.seq, "micro_batch": args.micro_batch, "steps": args.steps}),
        "exit": proc.returncode,
        "build_seconds": built,
        "wall_seconds": time.time() - t0,
        "flops_per_token": estimate.flops_per_token if estimate else None,
        "peak_tflops": estimate.peak_tflops if estimate else None,
        "steps": [
            {
                "step": s.step,
                "tokens_per_s": s.tokens_per_s,
                "mfu": (s.tokens_per_s * estimate.flops_per_token / (estimate.peak_tflops * 1e12))
                if estimate and estimate.peak_tflops
                else None,
            }
            for s in steps
        ],
        "launch_line": next((x for x in proc.stdout.splitlines() if "after the engine started" in x), None),
    }
    (args.out / f"first-steps-{args.arch}.json").write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(args.work, ignore_errors=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
