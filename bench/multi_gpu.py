"""The engine on several GPUs, through the real `qlc` and torchrun: DDP and FSDP-QLoRA runs of the
8B recipe, tokens/s from 1 to N GPUs, per-GPU peak memory against the calculator, a live sample, a
stop that saves, and a resume (on the same number of GPUs, then on one).

    python bench/multi_gpu.py --out bench/results [--gpus 1,2] [--strategies ddp,fsdp]

For each strategy and GPU count: a fresh run of --steps steps; a live sample at --sample-at; `qlc
stop` at --stop-at; `qlc resume` to the end. One GPU is the plain single-process run (no
strategy), the baseline of the scaling. The model is the full-size architecture with random weights
(bench/gpu_common.py), the data pre-tokenized rows of --seq tokens, so every GPU count reads the
same tokens per optimizer step per GPU: tokens/s is micro_batch x grad_accum x seq x GPUs / step s.

A world of one (`--gpus none`, or `--torchrun-one` beside other counts): each strategy through
torchrun with ONE process, started as a user would (`QLC_TORCHRUN=1 qlc train ... --set
hardware.gpus=1`): the same process group, command handoff, FSDP wrapping and checkpoint code,
without a second GPU. What a one-GPU machine can check of the multi-GPU path:

    python bench/multi_gpu.py --gpus none --arch llama-3.2-1b --budget 300 --out $OUT

`--budget S` splits S seconds between the stages (the model's build, then each strategy's train,
sample and stop, and its resume); a stage may use what earlier ones left. A stage that runs past
its share is given up: every rank's stacks are dumped (SIGUSR1, engine/train/watchdog.py), the
tails of the run's log (NCCL_DEBUG=INFO lines included) and of each rank's stacks are printed, the
run's processes are killed, and the JSON says which stage and why. The JSON is rewritten after
every stage, so a call that is cut still leaves what was measured; each run's events, log and
stacks are copied to OUT/logs-<label>/.

For the runs started here only: NVLink multicast off (NCCL_NVLS_ENABLE=0 and friends), NCCL_DEBUG
=INFO, TORCH_DISTRIBUTED_DEBUG=INFO, torchrun's own INFO log, stacks after 2 minutes without a
step, and with --budget short in-engine limits (a wait between ranks 90 s, a stall 60 s) so that
the engine's own one-line timeouts come before the budget's.
`--arch tiny` dry-runs everything on a CPU in a few minutes. Writes OUT/multi-gpu-<arch>-<date>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_common import ARCHS, versions, write_tokens
from engine import protocol
from engine.config import load_preset
from engine.run import distributed, runs

REPO = Path(__file__).resolve().parent.parent
QLC = [sys.executable, "-m", "tui.cli"]
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DIAGNOSIS = {
    "NCCL_DEBUG": "INFO",
    # INFO, not DETAIL: with DETAIL, DistributedDataParallel's constructor segfaults (torch 2.13 on
    # CPUs, a plain nn.Linear in a world of one; --distributed-debug DETAIL asks for it anyway).
    "TORCH_DISTRIBUTED_DEBUG": "INFO",
    "LOGLEVEL": "INFO",  # torchrun's agent: its rendezvous and workers
    "QLC_STALL_DUMP_S": "120",  # no step for 2 minutes: every rank's stacks in the run's folder
}
# With --budget, the engine's own limits under the stages' shares: its one-line error comes first.
SHORT_LIMITS = {
    "QLC_RDZV_TIMEOUT_S": "60",
    "QLC_COLLECTIVE_TIMEOUT_S": "90",
    "QLC_SOURCES_TIMEOUT_S": "60",
    "QLC_STALL_DUMP_S": "60",
}
UNLIMITED_S = 1800.0  # a stage's share without --budget


def say(label: str, message: str) -> None:
    """Progress on stdout: a device call that runs out of time still shows how far it got."""
    print(f"[{time.strftime('%H:%M:%S')} {label}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# The time budget
# ---------------------------------------------------------------------------------------------


class Budget:
    """Seconds for each stage: its share of --budget (by weight, counting how many stages of each
    kind there are), plus what earlier stages left, never past the end of the whole budget.
    Without --budget every stage gets UNLIMITED_S."""

    def __init__(self, total_s: float | None, weights: dict[str, tuple[float, int]]) -> None:
        self.end = time.monotonic() + total_s if total_s else None
        whole = sum(w * n for w, n in weights.values())
        self.shares = {k: (total_s * w / whole if total_s else UNLIMITED_S) for k, (w, _) in weights.items()}
        self.carry = 0.0
        self.deadline = 0.0
        self.started = 0.0

    def start(self, kind: str) -> float:
        """Open a stage of `kind` (a key of the weights); returns its limit in seconds."""
        self.started = time.monotonic()
        limit = self.shares[kind] + self.carry
        if self.end is not None:
            limit = min(limit, self.end - self.started)
        self.deadline = self.started + max(limit, 1.0)
        return self.deadline - self.started

    def left(self) -> float:
        return max(self.deadline - time.monotonic(), 1.0)

    def finish(self) -> float:
        """Close the stage; returns its seconds. What it did not use goes to the next."""
        now = time.monotonic()
        self.carry = max(self.deadline - now, 0.0)
        return now - self.started


class StageOver(Exception):
    """A stage ran past its limit, or the engine failed in it: `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Driving qlc
# ---------------------------------------------------------------------------------------------


def qlc(
    runs_dir: Path, *args: str, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [*QLC, "--runs-dir", str(runs_dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})},
        )
    except subprocess.TimeoutExpired:
        raise StageOver(f"`qlc {args[0]}` did not return within {timeout:.0f} s") from None


def wait_for(run_dir: Path, find: Any, budget: Budget, what: str) -> protocol.Event:
    """What `find(events)` returns once it is not None. Raises StageOver at the stage's limit, or as
    soon as the engine is gone without it (a crash, or the engine's own one-line timeout)."""
    while time.monotonic() < budget.deadline:
        if (found := find(runs.read_events(run_dir)[0])) is not None:
            return found
        if not runs.is_running(run_dir):
            time.sleep(1.0)  # the last events, written as it exited
            events = runs.read_events(run_dir)[0]
            if (found := find(events)) is not None:
                return found
            errors = [e for e in events if isinstance(e, protocol.ErrorEvent)]
            why = f": {errors[-1].kind}: {errors[-1].message}" if errors else ""
            raise StageOver(f"the engine ended before {what}{why}")
        time.sleep(0.2)
    raise StageOver(f"no {what} within the stage's limit")


def first(predicate: Any) -> Any:
    return lambda events: next((e for e in events if predicate(e)), None)


def step_at_least(n: int) -> Any:
    return first(lambda e: isinstance(e, protocol.Step) and e.step >= n)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path.name}: none)"
    return "\n".join(text.splitlines()[-lines:])


def _run_processes(run_dir: Path) -> list[int]:
    """Every live process whose command line names the run directory: torchrun and its ranks."""
    found, target = [], str(run_dir).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if target in (entry / "cmdline").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def give_up(label: str, run_dir: Path | None, reason: str) -> dict[str, Any]:
    """A stage is over: dump every rank's stacks, print the tails of the logs, kill the run."""
    say(label, f"GIVING UP: {reason}")
    report: dict[str, Any] = {"reason": reason}
    if run_dir is None:
        return report
    dumped = distributed.dump_stacks(run_dir)
    report["stacks_dumped_for_ranks"] = sorted(dumped)
    if dumped:
        time.sleep(3.0)  # faulthandler writes at once; leave it a moment under load
    log = _tail(run_dir / runs.ENGINE_LOG, 120)
    print(
        f"----- {run_dir / runs.ENGINE_LOG} (last 120 lines: every rank, torchrun, NCCL) -----\n{log}",
        flush=True,
    )
    report["engine_log_tail"] = log.splitlines()[-60:]
    report["stacks"] = {}
    for path in sorted(run_dir.glob(distributed.STACKS.format(rank="*"))):
        text = _tail(path, 80)
        print(f"----- {path} (last 80 lines) -----\n{text}", flush=True)
        report["stacks"][path.name] = text.splitlines()[-80:]
    pids = _run_processes(run_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while (pids := _run_processes(run_dir)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not pids:
            break
    report["left_running"] = pids
    say(label, f"killed the run's processes{'; still there: ' + str(pids) if pids else ''}")
    return report


# ---------------------------------------------------------------------------------------------
# One scenario: train, live sample, stop; resume
# ---------------------------------------------------------------------------------------------


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


def _train_stage(
    args: argparse.Namespace,
    runs_dir: Path,
    overrides: list[str],
    env: dict[str, str],
    budget: Budget,
    label: str,
) -> tuple[Path, dict[str, Any]]:
    """`qlc train --detach`, a live sample at --sample-at, `qlc stop` at --stop-at."""
    result: dict[str, Any] = {}
    t0 = time.time()
    sets = [x for o in overrides for x in ("--set", o)]
    started = qlc(
        runs_dir, "train", "llama-3.1-8b-rtx4090", *sets, "--detach", "--json", timeout=budget.left(), env=env
    )
    if started.returncode != 0:
        raise StageOver(
            f"`qlc train` exited {started.returncode}: {(started.stderr or started.stdout).strip()[-600:]}"
        )
    run_dir = Path(json.loads(started.stdout)["path"])
    result["run"] = run_dir.name
    say(label, f"started {run_dir.name} after {time.time() - t0:.1f} s")
    try:
        step = wait_for(run_dir, step_at_least(1), budget, "a first step")
        result["launch_to_first_step_seconds"] = step.time - t0
        say(label, f"first step after {step.time - t0:.1f} s")
        wait_for(run_dir, step_at_least(args.sample_at), budget, f"step {args.sample_at}")
        sample = qlc(
            runs_dir,
            "sample",
            run_dir.name,
            "--live",
            "Tell me about QLoRA.",
            "--max-new-tokens",
            "16",
            "--json",
            "--timeout",
            f"{budget.left():.0f}",
            timeout=budget.left() + 5,
            env=env,
        )
        result["live_sample_exit"] = sample.returncode
        say(label, f"live sample: exit {sample.returncode}")
        wait_for(run_dir, step_at_least(args.stop_at), budget, f"step {args.stop_at}")
        stop = qlc(
            runs_dir,
            "stop",
            run_dir.name,
            "--timeout",
            f"{budget.left():.0f}",
            timeout=budget.left() + 5,
            env=env,
        )
        result["stop_exit"] = stop.returncode
        say(
            label,
            f"stop: exit {stop.returncode}" + (f" ({stop.stderr.strip()[-300:]})" if stop.returncode else ""),
        )
        while runs.is_running(run_dir):
            if time.monotonic() > budget.deadline:
                raise StageOver("the run still holds its lock after `qlc stop`")
            time.sleep(0.2)
    except StageOver as over:
        over.run_dir = run_dir  # type: ignore[attr-defined]
        over.partial = result  # type: ignore[attr-defined]
        raise
    return run_dir, result


def _resume_stage(runs_dir: Path, run_dir: Path, env: dict[str, str], budget: Budget, label: str) -> int:
    resumed = qlc(runs_dir, "resume", run_dir.name, "--detach", timeout=budget.left(), env=env)
    if resumed.returncode != 0:
        raise StageOver(
            f"`qlc resume` exited {resumed.returncode}: {(resumed.stderr or resumed.stdout).strip()[-600:]}"
        )
    before = len([e for e in runs.read_events(run_dir)[0] if isinstance(e, protocol.Finished)])

    def second_end(events: list[protocol.Event]) -> protocol.Event | None:
        ends = [e for e in events if isinstance(e, protocol.Finished)]
        return ends[before] if len(ends) > before else None

    finished = wait_for(run_dir, second_end, budget, "the resumed run's end")
    while runs.is_running(run_dir) and time.monotonic() < budget.deadline:
        time.sleep(0.2)
    say(label, f"resume: {finished.status} at step {finished.step}")
    return 0 if finished.status == "completed" else 1


def scenario(
    args: argparse.Namespace,
    base: list[str],
    gpus: int,
    strategy: str,
    world_of_one: bool,
    budget: Budget,
    report: Report,
) -> dict[str, Any]:
    label = f"{strategy}-{gpus}" + ("-torchrun" if world_of_one else "")
    runs_dir = args.work / "runs" / label
    overrides = [*base, f"hardware.gpus={gpus}", f"hardware.strategy={strategy}"]
    if strategy == "fsdp" and (gpus > 1 or world_of_one):
        overrides.append("train.optimizer=adamw_torch")  # bitsandbytes optimizers cannot step shards
    env = {distributed.FORCE_TORCHRUN: "1"} if world_of_one else {}
    cfg = load_preset("llama-3.1-8b-rtx4090", overrides)
    result: dict[str, Any] = {
        "label": label,
        "gpus": gpus,
        "strategy": strategy,
        "torchrun_one": world_of_one,
    }
    report.runs.append(result)
    from engine.memory import distributed as per_gpu

    # Rows of exactly seq tokens: no padding (as bench/calibrate_memory.py's records say). A world
    # of one holds every shard: compared with the one-GPU figure.
    est = per_gpu.per_gpu(cfg, gpus, strategy if gpus > 1 else "ddp", backend="hf", padded=False)
    if world_of_one and strategy == "fsdp":
        result["estimate_note"] = "a world of one holds every shard: compared with the one-GPU estimate"
    result["estimate_per_gpu"] = {"torch_peak_gb": est.torch_peak_gb, "device_total_gb": est.device_total_gb}

    run_dir: Path | None = None
    stages: list[dict[str, Any]] = []
    result["stages"] = stages
    with DevicePeaks() as peaks:
        limit = budget.start("train")
        say(label, f"train, live sample, stop: {limit:.0f} s at most")
        try:
            run_dir, got = _train_stage(args, runs_dir, overrides, env, budget, label)
            result.update(got)
            stages.append({"stage": "train", "status": "ok", "limit_s": limit, "seconds": budget.finish()})
        except StageOver as over:
            run_dir = getattr(over, "run_dir", None)
            result.update(getattr(over, "partial", {}))
            stages.append(
                {
                    "stage": "train",
                    "status": "given up",
                    "limit_s": limit,
                    "seconds": budget.finish(),
                    **give_up(label, run_dir, over.reason),
                }
            )
    result["device_peak_gib_per_gpu"] = {str(k): v for k, v in sorted(peaks.peaks.items())}
    report.write()
    if stages[-1]["status"] == "ok" and run_dir is not None:
        limit = budget.start("resume")
        say(label, f"resume to the end: {limit:.0f} s at most")
        try:
            result["resume_exit"] = _resume_stage(runs_dir, run_dir, env, budget, label)
            stages.append({"stage": "resume", "status": "ok", "limit_s": limit, "seconds": budget.finish()})
        except StageOver as over:
            stages.append(
                {
                    "stage": "resume",
                    "status": "given up",
                    "limit_s": limit,
                    "seconds": budget.finish(),
                    **give_up(label, run_dir, over.reason),
                }
            )
    else:
        budget.start("resume")
        budget.finish()  # its share goes to the next scenario
    if run_dir is not None:
        result.update(_summarize(args, run_dir, gpus, est))
        _keep_logs(run_dir, args.out / f"logs-{label}")
    report.write()
    print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "stages")}), flush=True)
    return result


def _keep_logs(run_dir: Path, folder: Path) -> None:
    """The run's events, its log (its last 2 MB: NCCL's INFO lines included) and each rank's stacks,
    beside the results: the run folder stays on the GPU machine."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [
        runs.EVENTS,
        runs.ENGINE_LOG,
        *(p.name for p in run_dir.glob(distributed.STACKS.format(rank="*"))),
    ]
    for name in names:
        with contextlib.suppress(OSError):
            (folder / name).write_bytes((run_dir / name).read_bytes()[-(2 << 20) :])


def _summarize(args: argparse.Namespace, run_dir: Path, gpus: int, est: Any) -> dict[str, Any]:
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
    out: dict[str, Any] = dict(
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
        errors=[f"{e.kind}: {e.message}" for e in events if isinstance(e, protocol.ErrorEvent)],
        losses=[[e.step, e.loss] for e in events if isinstance(e, protocol.Step)],
    )
    measured = max((x for x in out["per_gpu_peak_reserved_gib"] if x is not None), default=None)
    if measured:
        out["estimate_error_pct"] = 100 * (est.torch_peak_gb - measured) / measured
    return out


# ---------------------------------------------------------------------------------------------
# The whole call
# ---------------------------------------------------------------------------------------------


class Report:
    """The results file, rewritten after every stage."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path, self.data, self.runs = path, header, []
        self.data["runs"] = self.runs

    def write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.rename(self.path)


def _gpu() -> str:
    """The GPU's name through NVML: the bench itself starts no CUDA context."""
    try:
        import pynvml

        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return "cpu"


def build(arch: str, model_dir: Path, budget: Budget, report: Report) -> bool:
    """The architecture with random weights, built in a child process within its share."""
    limit = budget.start("build")
    say(arch, f"building the model (random weights), {limit:.0f} s at most")
    code = (
        "import sys, json; from pathlib import Path; from bench.gpu_common import build_model; "
        "print(json.dumps(build_model(sys.argv[1], Path(sys.argv[2]))))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, arch, str(model_dir)],
            capture_output=True,
            text=True,
            timeout=limit,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
        )
    except subprocess.TimeoutExpired:
        report.data["build"] = {"status": "given up", "limit_s": limit, "seconds": budget.finish()}
        say(arch, "GIVING UP: the model's build ran past its share")
        return False
    seconds = budget.finish()
    ok = done.returncode == 0
    report.data["build"] = {"status": "ok" if ok else "failed", "limit_s": limit, "seconds": seconds}
    if not ok:
        report.data["build"]["stderr_tail"] = done.stderr.splitlines()[-30:]
        print(done.stderr[-3000:], flush=True)
    say(arch, f"model built in {seconds:.1f} s" if ok else "the model's build failed")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--arch",
        default=None,
        choices=sorted(ARCHS),
        help="default: llama-3.1-8b (llama-3.2-1b with --gpus none)",
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/qlc-bench-multi"))
    ap.add_argument(
        "--gpus", default="1,2", help="GPU counts, e.g. 1,2 or 1,2,4; none: only the world of one"
    )
    ap.add_argument("--strategies", default="ddp,fsdp")
    ap.add_argument(
        "--torchrun-one", action="store_true", help="also run each strategy as a torchrun world of one"
    )
    ap.add_argument(
        "--budget", type=float, default=None, help="seconds for the whole call, split between the stages"
    )
    ap.add_argument("--steps", type=int, default=None, help="default 20 (8 with --gpus none)")
    ap.add_argument("--sample-at", type=int, default=None, help="default 6 (2 with --gpus none)")
    ap.add_argument("--stop-at", type=int, default=None, help="default 12 (4 with --gpus none)")
    ap.add_argument("--seq", type=int, default=None, help="default 4096 (2048 with --gpus none)")
    ap.add_argument(
        "--distributed-debug",
        default="INFO",
        help="TORCH_DISTRIBUTED_DEBUG for the runs (DETAIL crashed DDP)",
    )
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=2)
    args = ap.parse_args()
    only_one = args.gpus == "none"
    defaults = (
        {"arch": "llama-3.2-1b", "steps": 8, "sample_at": 2, "stop_at": 4, "seq": 2048}
        if only_one
        else {"arch": "llama-3.1-8b", "steps": 20, "sample_at": 6, "stop_at": 12, "seq": 4096}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    DIAGNOSIS["TORCH_DISTRIBUTED_DEBUG"] = args.distributed_debug
    if args.budget:
        DIAGNOSIS.update(SHORT_LIMITS)
    os.environ.update({**NO_MULTICAST, **DIAGNOSIS})
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir, data_file = args.work / f"model-{args.arch}", args.work / "tokens.jsonl"
    gpu = _gpu()
    counts = [] if only_one else [int(n) for n in args.gpus.split(",")]
    strategies = args.strategies.split(",")
    date = time.strftime("%Y-%m-%d")
    report = Report(
        args.out / f"multi-gpu-{args.arch}-{date}.json",
        {
            "date": date,
            "gpu": gpu,
            "versions": versions(),
            "arch": args.arch,
            "env": {**NO_MULTICAST, **DIAGNOSIS},
        },
    )
    plan = [(n, s, False) for n in counts for s in (strategies if n > 1 else ["ddp"])]
    if only_one or args.torchrun_one:
        plan += [(1, s, True) for s in strategies]
    # The shares: the build, then per scenario its train (a start, a sample, a stop) and its resume.
    budget = Budget(args.budget, {"build": (1.0, 1), "train": (1.5, len(plan)), "resume": (1.0, len(plan))})
    shares = ", ".join(f"{k} {v:.0f} s" for k, v in budget.shares.items())
    names = ", ".join(f"{s}-{n}" + ("-torchrun" if one else "") for n, s, one in plan)
    say(
        "bench",
        f"{gpu}; {names}; " + (f"budget {args.budget:.0f} s: {shares}" if args.budget else "no budget"),
    )
    report.write()
    if (model_dir / "config.json").is_file():
        budget.start("build")
        budget.finish()  # built by an earlier call: its share goes to the runs
    elif not build(args.arch, model_dir, budget, report):
        report.write()
        return 1
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
        "hardware.gpu=auto" if gpu != "cpu" else "hardware.device=cpu",
        # The recipe's checkpointing on every layer (auto would spend a big GPU's headroom instead,
        # and the runs would no longer compare with the 8B recipe of the other benchmarks).
        "train.gradient_checkpointing=true",
    ]
    report.data["recipe"] = base[2:]
    for n, strategy, one in plan:
        scenario(args, base, n, strategy, one, budget, report)
    results = report.runs
    one = next((r for r in results if r["gpus"] == 1 and not r["torchrun_one"]), None)
    if one and one.get("tokens_per_second"):
        report.data["scaling"] = {
            r["label"]: r["tokens_per_second"] / one["tokens_per_second"]
            for r in results
            if r.get("tokens_per_second")
        }
    ok = all(
        [s["status"] for s in r.get("stages", [])] == ["ok", "ok"]
        and r.get("live_sample_exit") == 0
        and r.get("stop_exit") == 0
        and r.get("resume_exit") == 0
        and r.get("statuses") == ["stopped", "completed"]
        for r in results
    )
    report.data["all_ok"] = ok
    report.write()
    say("bench", f"wrote {report.path}; every scenario {'passed' if ok else 'did NOT pass'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
