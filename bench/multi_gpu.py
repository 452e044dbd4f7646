"""The engine on several GPUs, through the real `qlc` and torchrun: DDP and FSDP-QLoRA runs of the
8B recipe, tokens/s from 1 to N GPUs, per-GPU peak memory against the calculator, a live sample, a
stop that saves, and a resume (on the same number of GPUs, then on one).

    NCCL_NVLS_ENABLE=0 python bench/multi_gpu.py --out bench/results [--gpus 1,2] [--strategies ddp,fsdp]

For each strategy and GPU count: a fresh run of --steps steps; a live sample at --sample-at; `qlc
stop` at --stop-at; `qlc resume` to the end. One GPU is the plain single-process run (no
strategy), the baseline of the scaling. The model is the full-size architecture with random weights
(bench/gpu_common.py), the data pre-tokenized rows of --seq tokens, so every GPU count reads the
same tokens per optimizer step per GPU: tokens/s is micro_batch x grad_accum x seq x GPUs / step s.

`--torchrun-one` also runs each strategy through torchrun with ONE process (a world of one: the
same process group, collectives, FSDP wrapping and checkpoint code, without a second GPU): what
a one-GPU machine can check of the multi-GPU path. `--arch tiny` dry-runs everything in a minute.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends are set for every process started here).
Writes OUT/multi-gpu-<arch>-<date>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_common import ARCHS, build_model, gpu_name, versions, write_tokens
from engine import protocol
from engine.config import load_preset
from engine.run import distributed, launcher, runs

QLC = [sys.executable, "-m", "tui.cli"]
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def qlc(runs_dir: Path, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*QLC, "--runs-dir", str(runs_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
    )


def wait_for(run_dir: Path, predicate: Any, timeout: float, grace: float = 120) -> protocol.Event | None:
    """The first event that satisfies `predicate`, or None at the timeout, or as soon as the engine
    is gone without it (a crash before any `finished` event: say so, with its log's tail, instead
    of waiting out the timeout). `grace` covers the start, before the engine holds its lock."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        for ev in runs.read_events(run_dir)[0]:
            if predicate(ev):
                return ev
        if time.monotonic() - start > grace and not runs.is_running(run_dir):
            for ev in runs.read_events(run_dir)[0]:  # the last events, written as it exited
                if predicate(ev):
                    return ev
            log = run_dir / runs.ENGINE_LOG
            tail = log.read_text(errors="replace")[-3000:] if log.is_file() else "(no engine.log)"
            print(f"[{run_dir.name}] the engine is gone; engine.log ends:\n{tail}", flush=True)
            return None
        time.sleep(0.2)
    return None


def say(label: str, message: str) -> None:
    """Progress on stdout: a device call that runs out of time still shows how far it got."""
    print(f"[{time.strftime('%H:%M:%S')} {label}] {message}", flush=True)


class DevicePeaks:
    """Every GPU's used memory (NVML: what nvidia-smi shows, CUDA context and NCCL included), polled."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peaks = interval, {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:
            self._nvml, self._handles = None, []

    def _loop(self) -> None:
        while not self._stop.is_set():
            for i, h in enumerate(self._handles):
                used = self._nvml.nvmlDeviceGetMemoryInfo(h).used / 2**30
                self.peaks[i] = max(self.peaks.get(i, 0.0), used)
            time.sleep(self.interval)

    def __enter__(self) -> DevicePeaks:
        if self._handles:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


def start(runs_dir: Path, overrides: list[str], world_of_one: bool) -> Path:
    """A fresh run, detached: `qlc train` (torchrun for several GPUs), or torchrun with one
    process for --torchrun-one."""
    if not world_of_one:
        sets = [x for o in overrides for x in ("--set", o)]
        started = qlc(runs_dir, "train", "llama-3.1-8b-rtx4090", *sets, "--detach", "--json")
        if started.returncode != 0:
            raise SystemExit(started.stdout + started.stderr)
        return Path(json.loads(started.stdout)["path"])
    cfg = load_preset("llama-3.1-8b-rtx4090", overrides)
    run_dir = runs.create_run(runs_dir, cfg)
    launcher.launch(run_dir, pipe=False, command=distributed.torchrun_command(1, ["train", str(run_dir)]))
    return run_dir


def resume(runs_dir: Path, run_dir: Path, world_of_one: bool, gpus: str | None = None) -> int:
    if not world_of_one:
        return qlc(runs_dir, "resume", run_dir.name, *(["--gpus", gpus] if gpus else [])).returncode
    proc = launcher.launch(
        run_dir, pipe=False, command=distributed.torchrun_command(1, ["resume", str(run_dir)])
    )
    return proc.wait()


def scenario(args: argparse.Namespace, base: list[str], gpus: int, strategy: str, world_of_one: bool) -> dict:
    label = f"{strategy}-{gpus}" + ("-torchrun" if world_of_one else "")
    runs_dir = args.work / "runs" / label
    overrides = [*base, f"hardware.gpus={gpus}", f"hardware.strategy={strategy}"]
    if strategy == "fsdp" and (gpus > 1 or world_of_one):
        overrides.append("train.optimizer=adamw_torch")  # bitsandbytes optimizers cannot step shards
    cfg = load_preset("llama-3.1-8b-rtx4090", overrides)
    result: dict[str, Any] = {
        "label": label,
        "gpus": gpus,
        "strategy": strategy,
        "torchrun_one": world_of_one,
    }
    from engine.memory import distributed as per_gpu

    # Rows of exactly seq tokens: no padding (as bench/calibrate_memory.py's records say).
    est = per_gpu.per_gpu(
        cfg, gpus, strategy if gpus > 1 or world_of_one else "ddp", backend="hf", padded=False
    )
    if world_of_one and strategy == "fsdp":
        est = per_gpu.per_gpu(
            cfg, 1, "ddp", backend="hf", padded=False
        )  # one shard: the calculator's one-GPU figure
        result["estimate_note"] = "a world of one holds every shard: compared with the one-GPU estimate"
    result["estimate_per_gpu"] = {"torch_peak_gb": est.torch_peak_gb, "device_total_gb": est.device_total_gb}

    t_launch = time.time()
    say(label, "starting")
    with DevicePeaks() as peaks:
        run_dir = start(runs_dir, overrides, world_of_one)
        first = wait_for(run_dir, lambda e: isinstance(e, (protocol.Step, protocol.Finished)), 1800)
        result["launch_to_first_step_seconds"] = first.time - t_launch if first else None
        say(label, f"first step after {result['launch_to_first_step_seconds']} s")
        wait_for(
            run_dir,
            lambda e: (
                isinstance(e, (protocol.Finished,))
                or (isinstance(e, protocol.Step) and e.step >= args.sample_at)
            ),
            1800,
        )
        sample = qlc(
            runs_dir,
            "sample",
            run_dir.name,
            "--live",
            "Tell me about QLoRA.",
            "--max-new-tokens",
            "16",
            "--json",
        )
        result["live_sample_exit"] = sample.returncode
        say(label, f"live sample: exit {sample.returncode}")
        wait_for(
            run_dir,
            lambda e: (
                isinstance(e, protocol.Finished) or (isinstance(e, protocol.Step) and e.step >= args.stop_at)
            ),
            1800,
        )
        stop = qlc(runs_dir, "stop", run_dir.name)
        result["stop_exit"] = stop.returncode
        say(label, f"stop: exit {stop.returncode}")
        deadline = time.monotonic() + 120
        while runs.is_running(run_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
    result["device_peak_gib_per_gpu"] = {str(k): v for k, v in sorted(peaks.peaks.items())}
    result["resume_exit"] = resume(runs_dir, run_dir, world_of_one)
    say(label, f"resume: exit {result['resume_exit']}")

    events, _ = runs.read_events(run_dir)
    hellos = [i for i, e in enumerate(events) if isinstance(e, protocol.Hello)]
    first_session = events[: hellos[1]] if len(hellos) > 1 else events
    steps = [e for e in first_session if isinstance(e, protocol.Step)]
    sample_steps = {e.step for e in first_session if isinstance(e, protocol.Sample)}
    steady = [
        e.step_seconds
        for e in steps
        if e.step > 2 and e.step not in sample_steps and e.step - 1 not in sample_steps
    ]
    median = statistics.median(steady) if steady else None
    tokens = args.micro_batch * args.grad_accum * args.seq * gpus
    last = steps[-1] if steps else None
    result.update(
        hello=[
            {
                "device": events[i].device,
                "world_size": events[i].world_size,
                "mode": events[i].mode,
                "resumed_from": events[i].resumed_from,
            }
            for i in hellos
        ],
        statuses=[e.status for e in events if isinstance(e, protocol.Finished)],
        final_step=max((e.step for e in events if isinstance(e, protocol.Step)), default=0),
        median_step_seconds=median,
        tokens_per_second=tokens / median if median else None,
        per_gpu_peak_reserved_gib=[d.memory_peak_reserved_gb for d in last.devices]
        if last and last.devices
        else ([last.memory_peak_reserved_gb] if last else []),
        per_gpu_utilisation_pct=[d.utilization_pct for d in last.devices] if last and last.devices else None,
        model_load_seconds=next((e.load_seconds for e in events if isinstance(e, protocol.ModelReady)), None),
        samples=len([e for e in events if isinstance(e, protocol.Sample)]),
        errors=[e.message for e in events if isinstance(e, protocol.ErrorEvent)],
        losses=[[e.step, e.loss] for e in events if isinstance(e, protocol.Step)],
    )
    measured = max((x for x in result["per_gpu_peak_reserved_gib"] if x is not None), default=None)
    if measured:
        result["estimate_error_pct"] = 100 * (est.torch_peak_gb - measured) / measured
    with contextlib.suppress(OSError):
        (args.out / f"events-{label}.jsonl").write_bytes((run_dir / runs.EVENTS).read_bytes())
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default="llama-3.1-8b", choices=sorted(ARCHS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/qlc-bench-multi"))
    ap.add_argument("--gpus", default="1,2", help="GPU counts, e.g. 1,2 or 1,2,4 (none: only --torchrun-one)")
    ap.add_argument("--strategies", default="ddp,fsdp")
    ap.add_argument(
        "--torchrun-one", action="store_true", help="also run each strategy as a torchrun world of one"
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sample-at", type=int, default=6)
    ap.add_argument("--stop-at", type=int, default=12)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=2)
    args = ap.parse_args()
    os.environ.update(NO_MULTICAST)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir, data_file = args.work / f"model-{args.arch}", args.work / "tokens.jsonl"
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": gpu_name(),
        "versions": versions(),
        "arch": args.arch,
        "env": NO_MULTICAST,
    }
    if not (model_dir / "config.json").is_file():
        say(args.arch, "building the model (random weights)")
        report["build_seconds"] = build_model(args.arch, model_dir)
    counts = [] if args.gpus == "none" else [int(n) for n in args.gpus.split(",")]
    write_tokens(
        data_file, (args.steps + 4) * args.micro_batch * args.grad_accum * max(counts, default=1), args.seq
    )
    base = [
        f"model.name_or_path={model_dir}",
        "model.arch=null",  # the architecture from the model's config.json
        f"data.source={data_file}",
        "data.format=tokens",
        "data.val_fraction=0",
        f"train.seq_len={args.seq}",
        f"train.micro_batch={args.micro_batch}",
        f"train.grad_accum={args.grad_accum}",
        f"train.max_steps={args.steps}",
        "train.save_steps=1000",
        "train.logging_steps=1",
        "train.eval_steps=0",
        "hardware.backend=hf",
        "hardware.gpu=auto" if gpu_name() != "cpu" else "hardware.device=cpu",
    ]
    # The recipe's checkpointing on every layer (auto would spend a big GPU's headroom instead,
    # and the runs would no longer compare with the 8B recipe of the other benchmarks).
    base.append("train.gradient_checkpointing=true")
    report["recipe"] = base[2:]
    results = []
    strategies = args.strategies.split(",")
    for n in counts:
        for strategy in strategies if n > 1 else ["ddp"]:
            results.append(scenario(args, base, n, strategy, world_of_one=False))
    if args.torchrun_one:
        for strategy in strategies:
            results.append(scenario(args, base, 1, strategy, world_of_one=True))
    report["runs"] = results
    one = next((r for r in results if r["gpus"] == 1 and not r["torchrun_one"]), None)
    if one and one.get("tokens_per_second"):
        report["scaling"] = {
            r["label"]: r["tokens_per_second"] / one["tokens_per_second"]
            for r in results
            if r.get("tokens_per_second")
        }
    out = args.out / f"multi-gpu-{args.arch}-{report['date']}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
