"""Side by side on one GPU: bare TRL and bare Unsloth scripts against the engine, through the real
`qlc` and child process, on the same model, data and recipe (issue: speed and memory of the engine).

    python bench/compare_stacks.py --out DIR --arch llama-3.1-8b \\
        --scenario bare-trl-usual --scenario engine-hf ... [--unsloth-path /tmp/site2]

Scenarios (each in its own process, one at a time; each one's own device peak is read through
NVML, bench/gpu_memory.py: its process's usage where NVML reports our pids, else the device's
used memory minus the baseline taken before the first scenario, as nothing else of ours holds
the GPU: the model is built in a child process that exits first, and this process never touches
CUDA):
  bare-trl-usual   bench/bare_stack.py --stack trl-usual   (the usual tutorial recipe)
  bare-trl-tuned   bench/bare_stack.py --stack trl-tuned   (what the engine's hf backend does)
  bare-unsloth     bench/bare_stack.py --stack unsloth
  engine-hf        qlc train, hardware.backend=hf, gradient_checkpointing=true
  engine-unsloth   qlc train, hardware.backend=unsloth, gradient_checkpointing=true
  engine-auto@SIZE qlc train, backend auto, gradient_checkpointing=auto, hardware.gpu=SIZE
                   (SIZE: 24GB, h100, or `unsloth-peak` = bare-unsloth's measured device peak)
  engine-split@SIZE  as engine-auto@SIZE, with train.batch_split=auto (the same rows per step,
                   re-split into fewer micro-batches where no layer needs checkpointing)
  wait-warm        not a run: waits until the warm engine an earlier scenario left
                   (`engine-unsloth:hardware.keep_warm=5`) has imported its backend, as a
                   user's next launch would find it; the next engine scenario is handed to it
A scenario may end in #N to run it again (engine-unsloth#2: a second launch, which finds the
compiled kernels the first one left in the user cache folder), or in #lean-lora=MODE to run with
QLC_LEAN_LORA=MODE (engine.train.backends.unsloth.fuse_lora: 0, or eager). An engine scenario may carry
`--set` overrides after a colon: engine-auto@24GB:train.micro_batch=1,train.grad_accum=4 (the same
rows per step as fewer layers checkpointed, at 24 GB).

The Unsloth stack needs trl 1.15 and datasets 4 (shared/gpu/README.md): scenarios that import
unsloth get `--unsloth-path` in front of PYTHONPATH. Writes DIR/stacks-<arch>.json after each
scenario, so a time limit loses nothing that finished.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import gpu_memory as gm  # noqa: E402
from bench.gpu_common import (  # noqa: E402
    ARCHS,
    build_model_in_child,
    report_header,
    token_run_overrides,
    write_tokens,
)
from engine import protocol  # noqa: E402
from engine.run import runs, standby  # noqa: E402

QLC = [sys.executable, "-m", "tui.cli"]
UNSLOTH_SCENARIOS = ("bare-unsloth", "engine-unsloth", "engine-auto", "engine-split")


def env_for(scenario: str, unsloth_path: str | None) -> dict[str, str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "UNSLOTH_DISABLE_STATISTICS": "1"}
    if unsloth_path and scenario.startswith(UNSLOTH_SCENARIOS):
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), unsloth_path, env.get("PYTHONPATH", "")])
    return env


def run_bare(
    scenario: str, args: argparse.Namespace, model: Path, data: Path, env: dict[str, str], register: Any
) -> dict:
    out = args.work / f"{scenario}.json"
    out.unlink(missing_ok=True)
    stack = scenario.removeprefix("bare-")
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "bare_stack.py"),
        "--stack",
        stack,
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--seq",
        str(args.seq),
        "--micro-batch",
        str(args.micro_batch),
        "--grad-accum",
        str(args.grad_accum),
        "--steps",
        str(args.steps),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    register(proc.pid)
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    if proc.returncode != 0 or not out.is_file():
        return {"error": (stderr or stdout)[-3000:]}
    return json.loads(out.read_text())


def _time_of(events: list[Any], kind: type, pred: Any = None) -> float | None:
    for e in events:
        if isinstance(e, kind) and (pred is None or pred(e)):
            return e.time
    return None


def run_engine(
    scenario: str,
    args: argparse.Namespace,
    model: Path,
    data: Path,
    env: dict[str, str],
    budget: str | None,
    register: Any,
    extra_sets: list[str] | None = None,
) -> dict:
    runs_dir = args.work / "runs"
    overrides = token_run_overrides(model, data, args.seq, args.micro_batch, args.grad_accum, args.steps)
    overrides += [f"model.arch={args.arch}", "train.seed=3407"]
    if scenario == "engine-hf":
        overrides += ["hardware.backend=hf", "train.gradient_checkpointing=true", "hardware.gpu=auto"]
    elif scenario == "engine-unsloth":
        overrides += ["hardware.backend=unsloth", "train.gradient_checkpointing=true", "hardware.gpu=auto"]
    else:
        overrides += ["hardware.backend=auto", "train.gradient_checkpointing=auto", f"hardware.gpu={budget}"]
        if scenario.startswith("engine-split@"):
            overrides.append("train.batch_split=auto")
    # No warm engine unless a scenario asks (`:hardware.keep_warm=N`): an idle one holds a CUDA
    # context that the next scenario's device figure would count.
    overrides += ["hardware.keep_warm=0", *(extra_sets or [])]
    sets = [x for o in overrides for x in ("--set", o)]
    t_launch = time.time()
    started = subprocess.run(
        [*QLC, "--runs-dir", str(runs_dir), "train", "llama-3.1-8b-rtx4090", *sets, "--detach", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if started.returncode != 0:
        return {"error": started.stdout + started.stderr}
    launched = json.loads(started.stdout)
    run_dir, relay_pid = Path(launched["path"]), int(launched["pid"])
    register(relay_pid)
    deadline = time.monotonic() + args.timeout
    events: list[Any] = []
    engine_pid = 0
    while time.monotonic() < deadline:
        if not engine_pid and runs.is_running(run_dir):
            # A warm engine trains the run in its own process (engine/run/standby.py): count its
            # memory, not the relay's.
            with contextlib.suppress(OSError, ValueError):  # not written yet: the next turn
                engine_pid = runs.lock_pid(run_dir)
            if engine_pid and engine_pid != relay_pid:
                register(engine_pid)
        events, _ = runs.read_events(run_dir)
        if any(isinstance(e, protocol.Finished) for e in events):
            break
        time.sleep(0.5)
    steps = [e for e in events if isinstance(e, protocol.Step)]
    finished = next((e for e in events if isinstance(e, protocol.Finished)), None)
    if not steps or finished is None or finished.status != "completed":
        log = (run_dir / runs.ENGINE_LOG).read_text(errors="replace")[-3000:]
        return {"error": f"status {finished.status if finished else 'timeout'}", "engine_log": log}
    hello = next(e for e in events if isinstance(e, protocol.Hello))
    ready = next(e for e in events if isinstance(e, protocol.ModelReady))
    # The split the run took (a re-split or overrides change it, not the rows of a step).
    micro_batch, grad_accum = ready.micro_batch or args.micro_batch, ready.grad_accum or args.grad_accum
    estimate = next((e for e in events if isinstance(e, protocol.EstimateEvent)), None)
    steady = [e.step_seconds for e in steps if e.step > 2]
    median = statistics.median(steady)
    first_step = steps[0].time
    # Where launch-to-first-step goes, from the events' own timestamps.
    t_hello = hello.time
    t_ready = ready.time
    t_data = _time_of(events, protocol.DataReady)
    t_train = _time_of(events, protocol.StageEvent, lambda e: e.stage == "training")
    return {
        "backend": hello.backend,
        "backend_reason": hello.backend_reason,
        "layers": ready.layers,
        "checkpointed_layers": ready.checkpointed_layers,
        "checkpoint_reason": ready.checkpoint_reason,
        "micro_batch": micro_batch,
        "grad_accum": grad_accum,
        "split_reason": ready.split_reason,
        "kernels": ready.kernels,
        # What the run said it tuned (the backend's notes, engine.train.recipe), for the record.
        "notes": [e.message for e in events if isinstance(e, protocol.Log) and e.level == "info"][:20],
        "warm_engine": engine_pid != relay_pid,
        "launch_to_first_step_seconds": first_step - t_launch,
        "launch_breakdown_seconds": {
            "process start and imports (launch -> hello)": t_hello - t_launch,
            "model load, quantize, LoRA (hello -> model ready)": t_ready - t_hello,
            "data preparation (model ready -> data ready)": (t_data or t_ready) - t_ready,
            "trainer build (data ready -> training)": (t_train or first_step) - (t_data or t_ready),
            "first optimizer step (training -> first step event)": first_step - (t_train or first_step),
        },
        "load_seconds": ready.load_seconds,
        "median_step_seconds": median,
        "tokens_per_second": args.seq * micro_batch * grad_accum / median,
        "peak_allocated_gib": steps[-1].memory_peak_allocated_gb,
        "peak_reserved_gib": steps[-1].memory_peak_reserved_gb,
        "estimate": {
            "torch_peak_gb": estimate.torch_peak_gb,
            "device_total_gb": estimate.device_total_gb,
            "budget_gb": estimate.budget_gb,
        }
        if estimate
        else None,
        "losses": [[e.step, e.loss] for e in steps],
    }


def wait_warm(timeout_s: float = 120.0) -> dict:
    """Until every warm engine an earlier scenario left (hardware.keep_warm) has its backend
    imported: a user's next launch comes later than the bench's would, and finds it ready."""
    t0 = time.time()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = standby.listed()
        if listed and all(e.ready for e in listed):
            return {
                "waited_seconds": time.time() - t0,
                "standby_import_seconds": max(e.ready - e.started for e in listed),
            }
        time.sleep(0.2)
    return {"error": "no warm engine became ready", "waited_seconds": time.time() - t0}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default="llama-3.1-8b", choices=sorted(ARCHS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/qlc-stacks"))
    ap.add_argument("--scenario", action="append", required=True)
    ap.add_argument("--unsloth-path", help="site folder with the Unsloth stack, put first on PYTHONPATH")
    ap.add_argument("--unsloth-peak-gib", type=float, help="bare Unsloth's device peak from an earlier call")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="a CPU check of the engine scenarios: a shrunk model, no GPU figures",
    )
    args = ap.parse_args()
    if args.dry_run and any(s.startswith("bare-") for s in args.scenario):
        ap.error("--dry-run runs engine scenarios only (the bare scripts need CUDA)")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / f"model-{args.arch}"
    data = args.work / f"tokens-{args.seq}.jsonl"
    out_file = args.out / f"stacks-{args.arch}.json"
    report: dict[str, Any] = json.loads(out_file.read_text()) if out_file.is_file() else {}
    report.update(
        report_header(
            args.arch,
            {
                "lora_r": 32,
                "lora_alpha": 64,
                "targets": "all seven",
                "seq_len": args.seq,
                "micro_batch": args.micro_batch,
                "grad_accum": args.grad_accum,
                "optimizer": "paged_adamw_8bit",
                "steps": args.steps,
                "timing": "median of optimizer steps 3..N",
            },
        )
    )
    report.setdefault("scenarios", {})
    if not (model / "config.json").is_file():
        # In a child process that exits before anything is measured: this process never holds a
        # CUDA context, whose memory the device figures would otherwise count.
        report["build_seconds"] = build_model_in_child(args.arch, model, dry_run=args.dry_run)
    monitor = gm.GpuMemoryMonitor(gm.open_source()).start()
    time.sleep(0.3)
    baseline = monitor.device_at(time.time())  # nothing of ours holds the GPU now
    vocab = 1024 if args.dry_run else 128000  # a shrunk model's vocabulary (bench/gpu_common.py)
    write_tokens(data, (args.steps + 2) * args.micro_batch * args.grad_accum, args.seq, vocab=vocab)
    for scenario in args.scenario:
        kind = scenario.split("#", 1)[0]  # "engine-unsloth#2": the same scenario again, reported apart
        kind, _, extra = kind.partition(":")  # "engine-auto@24GB:train.micro_batch=1,...": overrides
        extra_sets = [x for x in extra.split(",") if x]
        env = env_for(kind, args.unsloth_path)
        label = scenario.partition("#")[2]  # "engine-split@h100#lean-lora=eager": QLC_LEAN_LORA for it
        if label.startswith("lean-lora="):
            env["QLC_LEAN_LORA"] = label.removeprefix("lean-lora=")
        if args.unsloth_path and kind.startswith(UNSLOTH_SCENARIOS):
            unsloth_versions = subprocess.run(
                [sys.executable, "-c", "import json,bench.gpu_common as g; print(json.dumps(g.versions()))"],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
            )
            if unsloth_versions.returncode == 0:
                report["versions_unsloth_stack"] = json.loads(unsloth_versions.stdout)
        t0 = time.time()

        def register(pid: int, name: str = scenario) -> None:
            monitor.register(name, pid)

        if kind == "wait-warm":
            result = wait_warm()
        elif kind.startswith("bare-"):
            standby.stop_all()  # an idle warm engine's context is no part of bare's figure
            result = run_bare(kind, args, model, data, env, register)
        else:
            budget = None
            if kind.startswith(("engine-auto@", "engine-split@")):
                budget = kind.split("@", 1)[1]
                if budget == "unsloth-peak":
                    measured = report["scenarios"].get("bare-unsloth", {}).get("device_peak_gib")
                    measured = measured or args.unsloth_peak_gib
                    budget = f"{measured:.2f}GB"
            result = run_engine(kind, args, model, data, env, budget, register, extra_sets)
            if budget:
                result["budget"] = budget
        time.sleep(0.3)  # the last samples
        t1 = time.time()
        used, _ = monitor.device_peak(t0, t1)
        own, _ = monitor.process_peak(scenario, t0, t1)
        # Scenarios run one at a time and this process holds no CUDA context: the device's used
        # memory above the baseline is the scenario's alone, paged (managed) memory included.
        result["device_peak_gib"] = (
            (used - baseline) / 2**30 if used is not None and baseline is not None else None
        )
        result["device_method"] = "baseline" if result["device_peak_gib"] is not None else "none: no NVML"
        result["device_baseline_gib"] = baseline / 2**30 if baseline is not None else None
        result["device_process_peak_gib"] = own / 2**30 if own is not None else None
        result["wall_seconds"] = time.time() - t0
        report["scenarios"][scenario] = result
        out_file.write_text(json.dumps(report, indent=2))
        brief = {
            k: v for k, v in result.items() if k not in ("losses", "engine_log", "launch_breakdown_seconds")
        }
        print(scenario, json.dumps(brief), flush=True)
    monitor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
