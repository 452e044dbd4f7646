"""The engine end to end on a GPU, through the real `qlc` and the real child process: a
full-size architecture with random weights (saved, then loaded through the engine's own loading
path), the recipe of shared/anchors.md, 20+ steps, a live sample, a stop that saves, a resume.

    python bench/gpu_engine.py --out DIR [--arch llama-3.1-8b] [--steps 30] [--stop-at 20]

Writes DIR/engine-<arch>.json (tokens/s, step time, peak memory, device peak, launch-to-first-step,
versions, date) and DIR/events-<arch>.jsonl. `--arch tiny` dry-runs the whole scenario on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_common import ARCHS, DevicePeak, build_model, report_header, token_run_overrides, write_tokens
from engine import protocol
from engine.run import runs

QLC = [sys.executable, "-m", "tui.cli"]


def qlc(runs_dir: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*QLC, "--runs-dir", str(runs_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
    )


def wait_for(run_dir: Path, predicate, timeout: float) -> protocol.Event | None:
    deadline = time.monotonic() + timeout
    offset = 0
    while time.monotonic() < deadline:
        events, offset = runs.read_events(run_dir, offset)
        for ev in events:
            if predicate(ev):
                return ev
        time.sleep(0.2)
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default="llama-3.1-8b", choices=sorted(ARCHS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/qlc-bench"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--stop-at", type=int, default=20)
    ap.add_argument("--sample-at", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data_file, runs_dir = work / f"model-{args.arch}", work / "tokens.jsonl", work / "runs"
    report: dict = report_header(
        args.arch,
        {
            "lora_r": 32,
            "lora_alpha": 64,
            "targets": "all seven",
            "seq_len": args.seq,
            "micro_batch": args.micro_batch,
            "grad_accum": args.grad_accum,
            "gradient_checkpointing": True,
            "optimizer": "paged_adamw_8bit",
            "attention": "sdpa",
            "quant": "nf4 + double quant, bf16 compute",
        },
    )
    if not (model_dir / "config.json").is_file():
        report["build_seconds"] = build_model(args.arch, model_dir)
        print(f"built {args.arch} in {report['build_seconds']:.0f} s", flush=True)
    rows = (args.steps + 4) * args.micro_batch * args.grad_accum
    write_tokens(data_file, rows, args.seq)

    overrides = token_run_overrides(
        model_dir, data_file, args.seq, args.micro_batch, args.grad_accum, args.steps
    )
    overrides += ["train.epochs=1", "hardware.backend=hf", "hardware.gpu=h100"]
    sets = [x for o in overrides for x in ("--set", o)]
    peak = DevicePeak().start()
    t_launch = time.time()
    started = qlc(runs_dir, "train", "llama-3.1-8b-rtx4090", *sets, "--detach", "--json")
    if started.returncode != 0:
        print(started.stdout, started.stderr)
        return 1
    run_dir = Path(json.loads(started.stdout)["path"])
    print(f"run {run_dir.name}", flush=True)

    first = wait_for(run_dir, lambda e: isinstance(e, protocol.Step), 900)
    report["launch_to_first_step_seconds"] = (first.time - t_launch) if first else None
    wait_for(run_dir, lambda e: isinstance(e, protocol.Step) and e.step >= args.sample_at, 900)
    t0 = time.time()
    sample = qlc(
        runs_dir, "sample", run_dir.name, "--live", "Tell me about QLoRA.", "--max-new-tokens", "32", "--json"
    )
    report["live_sample"] = {
        "exit": sample.returncode,
        "seconds": time.time() - t0,
        "events": [json.loads(x) for x in sample.stdout.splitlines() if x.startswith("{")][-1:],
    }
    wait_for(run_dir, lambda e: isinstance(e, protocol.Step) and e.step >= args.stop_at, 900)
    t0 = time.time()
    stop = qlc(runs_dir, "stop", run_dir.name)
    report["stop"] = {
        "exit": stop.returncode,
        "seconds": time.time() - t0,
        "output": stop.stdout.strip().splitlines()[-3:],
    }
    peak_first = peak.peak_gib
    peak.reset()
    t0 = time.time()
    resume = qlc(runs_dir, "resume", run_dir.name, "--json")
    report["resume"] = {"exit": resume.returncode, "seconds": time.time() - t0}
    peak.stop()

    events, _ = runs.read_events(run_dir)
    (args.out / f"events-{args.arch}.jsonl").write_bytes((run_dir / runs.EVENTS).read_bytes())
    steps = [e for e in events if isinstance(e, protocol.Step)]
    hellos = [i for i, e in enumerate(events) if isinstance(e, protocol.Hello)]
    first_session = (
        [e for e in events[: hellos[1]] if isinstance(e, protocol.Step)] if len(hellos) > 1 else steps
    )
    steady = [e.step_seconds for e in first_session if e.step > 2 and e.step != args.sample_at + 1]
    median = statistics.median(steady) if steady else None
    tokens_per_step = args.micro_batch * args.grad_accum * args.seq
    last = first_session[-1] if first_session else None
    ready = next((e for e in events if isinstance(e, protocol.ModelReady)), None)
    estimate = next((e for e in events if isinstance(e, protocol.EstimateEvent)), None)
    report.update(
        {
            "steps_logged": len(steps),
            "final_step": steps[-1].step if steps else 0,
            "median_step_seconds": median,
            "tokens_per_second": tokens_per_step / median if median else None,
            "peak_allocated_gib": last.memory_peak_allocated_gb if last else None,
            "peak_reserved_gib": last.memory_peak_reserved_gb if last else None,
            "device_peak_gib_first_session": peak_first,
            "device_peak_gib_resumed_session": peak.peak_gib,
            "model_ready": {
                "allocated_gib": ready.memory_allocated_gb,
                "load_seconds": ready.load_seconds,
                "trainable_params": ready.trainable_params,
            }
            if ready
            else None,
            "estimate": {"torch_peak_gb": estimate.torch_peak_gb, "device_total_gb": estimate.device_total_gb}
            if estimate
            else None,
            "statuses": [e.status for e in events if isinstance(e, protocol.Finished)],
            "checkpoints": [e.path for e in events if isinstance(e, protocol.CheckpointSaved)],
            "losses": [[e.step, e.loss] for e in steps],
        }
    )
    out = args.out / f"engine-{args.arch}.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "losses"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
