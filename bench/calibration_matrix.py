"""The memory calibration matrix (issue 15) and its speed records (issue 16), in one device call.

    python bench/calibration_matrix.py --out DIR [--deadline-s 540] [--unsloth-path /tmp/site2]
        [--arch NAME ...] [--backend hf|unsloth ...] [--no-e2e] [--concurrency N]
    python bench/calibration_matrix.py --plan            # the rows and their guessed GPU seconds
    python bench/calibration_matrix.py --dry-run --out DIR [--fake-nvml pids|hidden|no-usage|none]
    python bench/calibration_matrix.py summary FILE      # the compact summary of a results file

The rows are bench/calibration_plan.py's. This process (the driver) never touches CUDA; it starts
and steers child processes (bench/calibrate_memory.py):
- a probe, first and alone, whose allocations tell which device figure NVML allows here
  (bench/gpu_memory.py): each process's own usage, pids mapped through the init gate, or the
  device's used memory minus a baseline (then one process at a time);
- builds: random-weight bf16 checkpoints of each architecture in /tmp (at most one folder over
  10 GB at a time; each is deleted once every process of its architecture has loaded it);
- workers, one per (architecture, backend[, LoRA group]), several alive at once: imports, loads,
  warm-up steps and trainer builds overlap, but training is granted to one configuration at a time,
  most valuable first, only when the memory model says it fits the GPU's free memory and its
  guessed time fits before the deadline;
- a few held-out configurations end to end through the real `qlc train`.

Each record is written to DIR/memory-calibration-matrix-<gpu>-<date>.json the moment it is
measured (engine.memory.calibration's format: bench/memory_table.py and the replay test read it),
with both torch peaks, the process's device peak and how it was measured, tokens/s (median of the
steps after the first two) and which other activity overlapped its timed steps (loads, builds,
warm-ups, an end-to-end run: tokens/s is clean only without). A progress line per record.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import calibration_plan as cp  # noqa: E402
from bench import gpu_memory as gm  # noqa: E402
from bench.calibration_summary import summary  # noqa: E402
from bench.channel import Channel  # noqa: E402
from bench.gpu_common import gpu_info, special_token_ids, versions, write_tokens  # noqa: E402

GIB = 2**30
LARGE_FOLDER_GIB = 10.0
FINALIZE_RESERVE_S = 8.0


def say(t0: float, message: str) -> None:
    print(f"[{time.time() - t0:6.1f}s] {message}", flush=True)


@dataclass
class Window:
    """Something one process did on the GPU, for overlap marking."""

    owner: str
    kind: str  # build, load, warmup, train, e2e
    t0: float
    t1: float | None = None  # None: still going


@dataclass
class Child:
    name: str
    kind: str  # probe, build, worker, e2e
    arch: str | None
    proc: subprocess.Popen[bytes] | None
    channel: Channel | None
    log: Path
    started: float
    state: str = "starting"
    inited: bool = False
    exit_code: int | None = None
    pid: int | None = None
    ended: float | None = None


@dataclass
class ArchState:
    name: str
    value: float
    folder: Path
    gib: float
    workers: list[cp.WorkerPlan]
    e2e: list[cp.E2ESpec]
    status: str = "pending"  # pending, building, ready, deleted, failed, skipped
    tokens: Path | None = None
    build_seconds: float | None = None
    built_bytes: int | None = None

    @property
    def large(self) -> bool:
        return self.gib > LARGE_FOLDER_GIB


@dataclass
class WorkerRun:
    plan: cp.WorkerPlan
    child: Child
    remaining: list[cp.ConfigPlan]
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    half_done: bool = False  # Unsloth: a partial configuration ran (cp.unsloth_order)
    current: cp.ConfigPlan | None = None
    granted_at: float | None = None
    free_at_grant_gib: float | None = None
    versions: dict[str, str] = field(default_factory=dict)
    loaded_at: float | None = None
    warmup_s: float | None = None
    load_s: float | None = None


@dataclass
class E2ERun:
    spec: cp.E2ESpec
    child: Child
    run_dir: Path | None = None
    engine_pid: int | None = None
    offset: int = 0
    events: list[Any] = field(default_factory=list)
    launched: float = 0.0
    hello_at: float | None = None
    ready_at: float | None = None
    training_at: float | None = None
    finished_at: float | None = None
    claimed: bool = False


def estimate_of(rec: dict[str, Any], gpu_label: str, total_gib: float) -> Any:
    """The estimate of one of this matrix's records, as the replay test reads its file: the
    warm-up's leftover baseline is not added (engine.memory.calibration.load_calibration), so the
    progress line's error is the one the committed file will show."""
    from engine.memory.calibration import estimate_record, parse_record
    from engine.memory.gpus import Gpu

    gpu = Gpu(gpu_label, gpu_label, total_gib, total_gib, "size")
    return estimate_record(parse_record(rec, rec["id"], additive=False), gpu)


class Driver:
    def __init__(self, args: argparse.Namespace, plan: cp.Plan) -> None:
        self.args = args
        self.plan = plan
        self.dry = bool(args.dry_run)
        self.t0 = time.time()
        self.deadline = self.t0 + args.deadline_s
        self.work: Path = args.work
        self.ipc = self.work / "ipc"
        self.logs = self.work / "logs"
        for d in (self.work, self.ipc, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        info = None if self.dry else gpu_info()
        self.gpu = info["name"] if info else ("cpu (dry run)" if self.dry else "cpu")
        self.total_gib = info["total_gib"] if info else 141.0
        self.driver_version = info["driver"] if info else None
        marker = self.work / "fake-cuda"
        shutil.rmtree(marker, ignore_errors=True)
        fake = args.fake_nvml if self.dry else None
        if fake and fake != "none":
            os.environ["QLC_FAKE_CUDA_DIR"] = str(marker)
        source = gm.open_source(fake, marker)
        self.monitor = gm.GpuMemoryMonitor(source, mapped=False).start()
        self.baseline_used = self.monitor.device_at(time.time() + 1)  # before any child holds the GPU
        self.method = gm.NONE
        self.probe: gm.ProbeResult | None = None
        self.concurrency = args.concurrency or 16
        self.deferred_feeds: list[WorkerRun] = []  # --clean-speed: ready while another trained
        self.archs: dict[str, ArchState] = {}
        for name in plan.archs:
            ws = [w for w in plan.workers if w.arch == name]
            es = [e for e in plan.e2e if e.arch == name]
            self.archs[name] = ArchState(
                name,
                max((w.value for w in ws), default=0.0),
                self.work / f"model-{name}",
                cp.folder_gib(name),
                ws,
                es,
            )
        self.children: dict[str, Child] = {}
        self.pending_workers: list[cp.WorkerPlan] = []  # built, waiting for a slot and memory
        self.workers: dict[str, WorkerRun] = {}
        self.e2e_runs: dict[str, E2ERun] = {}
        self.gate_queue: list[str] = []
        self.gate_holder: str | None = None
        self.gate_opened = 0.0
        self.gate_inited_at: float | None = None
        self.lock_holder: str | None = None
        self.windows: list[Window] = []
        self.records: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.timeline: list[tuple[float, str]] = []
        self.versions_hf: dict[str, str] = versions() if self.dry else {}
        self.versions_unsloth: dict[str, str] = {}
        self.probe_events: dict[str, float] = {}
        self.probe_notes: list[str] = []
        slug = self.gpu.lower().replace("nvidia", "").strip().split()[0] if info else "dry-run"
        self.out_file: Path = args.out / f"memory-calibration-matrix-{slug}-{time.strftime('%Y-%m-%d')}.json"
        if self.dry:
            self.out_file = args.out / f"calibration-matrix-dry-run-{time.strftime('%Y-%m-%d')}.json"
        self.stopping = False

    # ------------------------------------------------------------------------------------------
    # children
    # ------------------------------------------------------------------------------------------

    def env(self, unsloth: bool) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(ROOT)]
        if unsloth and self.args.unsloth_path:
            paths.append(self.args.unsloth_path)
        paths += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env.update(
            PYTHONUNBUFFERED="1",
            UNSLOTH_DISABLE_STATISTICS="1",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            NO_COLOR="1",
            COLUMNS="200",
        )
        if self.monitor.mapped:
            # Inductor's compile workers may create CUDA contexts of their own, whose pids nothing
            # would claim (and two new pids in one init window map neither): compile in-process.
            env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
        return env

    def spawn(self, name: str, kind: str, arch: str | None, args: list[str], unsloth: bool = False) -> Child:
        log = self.logs / f"{name}.log"
        cwd = self.work / "cwd" / name  # Unsloth writes its compiled cache into the working directory
        cwd.mkdir(parents=True, exist_ok=True)
        channel = Channel.for_driver(self.ipc, name)
        with log.open("ab") as f:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "bench" / "calibrate_memory.py"),
                    *args,
                    "--channel",
                    str(self.ipc),
                    "--name",
                    name,
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self.env(unsloth),
                cwd=cwd,
            )
        child = Child(name, kind, arch, proc, channel, log, time.time(), pid=proc.pid)
        self.children[name] = child
        self.monitor.register(name, proc.pid)
        return child

    def alive(self, kinds: tuple[str, ...] = ("probe", "build", "worker", "e2e")) -> list[Child]:
        return [c for c in self.children.values() if c.kind in kinds and c.exit_code is None]

    def gpu_processes(self) -> int:
        return len(self.alive())

    def log_tail(self, child: Child, n: int = 2500) -> str:
        try:
            return child.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def note(self, message: str) -> None:
        self.timeline.append((round(time.time() - self.t0, 1), message))
        say(self.t0, message)

    # ------------------------------------------------------------------------------------------
    # the probe
    # ------------------------------------------------------------------------------------------

    def run_probe(self) -> None:
        if not self.monitor.available:
            self.method = gm.NONE
            self.probe = gm.ProbeResult(gm.NONE, notes=("no NVML: no device figures",))
            self.note("probe: no NVML here, device figures will be null")
            return
        child = self.spawn("probe", "probe", None, ["probe"])
        deadline = time.time() + 90
        while time.time() < deadline:
            for msg in child.channel.poll():
                ev = msg.get("ev")
                if ev == "want_init":
                    self.gate_holder, self.gate_opened = "probe", time.time()
                    child.channel.send(cmd="init")
                elif ev == "inited":
                    child.inited = True
                    self.wait_for_new_pid("probe", timeout=5.0)
                    child.channel.send(cmd="init_ack")
                elif ev == "phase":
                    self.probe_events[msg["phase"]] = msg["t"]
                elif ev == "note":
                    self.probe_notes.append(msg["note"])
            if child.proc.poll() is not None:
                break
            time.sleep(0.05)
        with contextlib.suppress(Exception):
            child.proc.wait(timeout=10)
        child.exit_code = child.proc.poll()
        child.ended = time.time()
        self.gate_holder = None
        time.sleep(0.3)
        result = gm.analyse_probe(self.monitor, "probe", child.proc.pid, self.probe_events, self.gate_opened)
        if self.probe_notes:
            result = gm.ProbeResult(**{**result.to_dict(), "notes": (*result.notes, *self.probe_notes)})
        if "done" not in self.probe_events:
            result = gm.ProbeResult(
                **{**result.to_dict(), "notes": (*result.notes, f"probe failed: {self.log_tail(child, 600)}")}
            )
        self.probe = result
        self.method = result.method
        if self.method == gm.PER_PROCESS_MAPPED:
            self.monitor.mapped = True
        if self.method == gm.BASELINE and not self.args.concurrency:
            self.concurrency = 1  # the device's used memory is a run's only while it is alone
        self.note(
            f"probe: device figures by {self.method}; managed memory in the process figure: "
            f"{result.managed_in_process}, in the device's: {result.managed_in_device}; "
            f"context {result.context_gib if result.context_gib is None else round(result.context_gib, 2)} GiB; "
            f"{self.concurrency} GPU processes at once"
        )

    def wait_for_new_pid(self, name: str, timeout: float) -> None:
        """After `name` created its context: attribute its NVML pid (ancestry, or the one new pid)."""
        end = time.time() + timeout
        while time.time() < end:
            if self.monitor.visible(name):
                return
            if self.monitor.mapped or self.method in (gm.PER_PROCESS_MAPPED, gm.NONE):
                new = self.monitor.unowned_since(self.gate_opened)
                if self.monitor.mapped and len(new) == 1 and time.time() - self.gate_opened > 0.2:
                    self.monitor.claim_new(name, self.gate_opened)
                    return
            time.sleep(0.05)

    # ------------------------------------------------------------------------------------------
    # scheduling
    # ------------------------------------------------------------------------------------------

    def remaining(self) -> float:
        return self.deadline - FINALIZE_RESERVE_S - time.time()

    def committed_gib(self, joining: cp.WorkerPlan | None = None) -> float:
        """Device memory promised to the live processes (and `joining`), from the memory model:
        what each holds between configurations, plus the largest configuration (one trains at a
        time)."""
        total, extra = 0.0, 0.0
        if joining is not None:
            total, extra = joining.resident_gib, joining.peak_extra_gib
        for c in self.alive():
            if c.kind == "probe":
                total += 2.0
            elif c.kind == "build":
                total += self.archs[c.arch].gib + 2.0
            elif c.kind == "worker":
                w = self.workers[c.name]
                total += w.plan.resident_gib
                extra = max(extra, w.plan.peak_extra_gib)
            elif c.kind == "e2e":
                total += self.e2e_estimate(self.e2e_runs[c.name].spec)
        return total + extra

    def e2e_estimate(self, spec: cp.E2ESpec) -> float:
        return cp.device_gib(spec.arch, spec.backend, spec.lora, spec.shape, self.total_gib)

    def present_folders(self) -> list[ArchState]:
        return [a for a in self.archs.values() if a.status in ("building", "ready")]

    def schedule_builds(self) -> None:
        if self.stopping:
            return
        building = [a for a in self.archs.values() if a.status == "building"]
        for arch in sorted(self.archs.values(), key=lambda a: -a.value):
            if arch.status != "pending" or len(building) >= 2:
                continue
            if self.gpu_processes() >= self.concurrency:
                continue
            present = self.present_folders()
            if arch.large and any(a.large for a in present):
                continue
            if sum(a.gib for a in present) + arch.gib > self.args.disk_gib:
                continue
            if self.committed_gib() + arch.gib + 2.0 > 0.9 * self.total_gib:
                continue
            cheapest = min((c.est_seconds for w in arch.workers for c in w.configs), default=0.0)
            startup = min((w.startup_seconds for w in arch.workers), default=0.0)
            if self.remaining() < cp.build_seconds_guess(arch.name) + startup + cheapest:
                arch.status = "skipped"
                self.note(f"{arch.name}: skipped, no time left for a build ({self.remaining():.0f} s)")
                continue
            self.start_build(arch)
            building.append(arch)

    def start_build(self, arch: ArchState) -> None:
        shutil.rmtree(arch.folder, ignore_errors=True)
        shutil.rmtree(arch.folder.with_name(arch.folder.name + ".tmp"), ignore_errors=True)
        args = ["build", "--arch", arch.name, "--out", str(arch.folder), *(["--dry-run"] if self.dry else [])]
        self.spawn(f"build-{arch.name}", "build", arch.name, args)
        arch.status = "building"
        self.windows.append(Window(f"build-{arch.name}", "build", time.time()))
        self.note(f"{arch.name}: building ({arch.gib:.1f} GB in bf16)")

    def on_built(self, arch: ArchState, msg: dict[str, Any]) -> None:
        arch.status = "ready"
        arch.build_seconds = time.time() - self.children[f"build-{arch.name}"].started
        arch.built_bytes = msg.get("bytes")
        self.end_window(f"build-{arch.name}", "build")
        self.note(
            f"{arch.name}: built in {arch.build_seconds:.0f} s ({(arch.built_bytes or 0) / GIB:.1f} GiB)"
        )
        self.write_tokens(arch)
        self.pending_workers += arch.workers
        self.pending_workers.sort(key=lambda w: -w.value)
        self.schedule_workers()

    def schedule_workers(self) -> None:
        """Start built architectures' processes, most valuable first, as slots and memory allow."""
        for plan in list(self.pending_workers):
            if self.stopping:
                return
            if self.gpu_processes() >= self.concurrency:
                return
            if self.committed_gib(plan) > 0.9 * self.total_gib:
                if not self.alive(("build", "worker", "e2e")):
                    self.pending_workers.remove(plan)
                    self.skipped += [{"id": c.id, "why": "does not fit the GPU alone"} for c in plan.configs]
                continue
            self.pending_workers.remove(plan)
            self.start_worker(plan)

    def write_tokens(self, arch: ArchState) -> None:
        seq = rows = 0
        for w in arch.workers:
            for c in w.configs:
                spec = c.spec(self.dry)
                seq = max(seq, spec["seq_len"])
                rows = max(rows, spec["steps"] * spec["micro_batch"] * spec["grad_accum"])
        for e in arch.e2e:
            shape = cp.dry_run_shape(e.shape) if self.dry else e.shape
            seq = max(seq, shape.seq)
            rows = max(rows, e.steps * shape.mb)
        vocab = 1024 if self.dry else cp.architecture(arch.name).vocab
        arch.tokens = self.work / f"tokens-{arch.name}.jsonl"
        write_tokens(
            arch.tokens,
            rows=rows + 4,
            seq_len=max(seq, 16),
            vocab=min(vocab, min(special_token_ids(vocab).values())),
        )

    def start_worker(self, plan: cp.WorkerPlan) -> None:
        arch = self.archs[plan.arch]
        if self.remaining() < plan.startup_seconds + min(c.est_seconds for c in plan.configs):
            self.skipped += [{"id": c.id, "why": "no time to start its process"} for c in plan.configs]
            self.note(f"{plan.name}: not started, no time left")
            return
        scratch = self.work / "scratch" / plan.name
        scratch.mkdir(parents=True, exist_ok=True)
        specs = [c.spec(self.dry) for c in plan.configs]
        spec = {
            "name": plan.name,
            "arch": plan.arch,
            "backend": "hf" if self.dry else plan.backend,  # no Unsloth without CUDA
            "planned_backend": plan.backend,
            "dry_run": self.dry,
            "model_dir": str(arch.folder),
            "tokens_file": str(arch.tokens),
            "scratch": str(scratch),
            "warmup": True,
            "max_seq": max(s["seq_len"] for s in specs),
            "configs": specs,
        }
        spec_file = self.ipc / f"{plan.name}.spec.json"
        spec_file.write_text(json.dumps(spec, indent=1))
        child = self.spawn(
            plan.name,
            "worker",
            plan.arch,
            ["worker", "--spec", str(spec_file)],
            unsloth=plan.backend == "unsloth",
        )
        self.workers[plan.name] = WorkerRun(plan, child, list(plan.configs))
        self.note(f"{plan.name}: started ({len(plan.configs)} configurations)")

    def schedule_gate(self) -> None:
        """Grant the init gate to one process at a time (builds first, then by value)."""
        if self.gate_holder is not None:
            child = self.children.get(self.gate_holder)
            if child is None or child.exit_code is not None:
                self.gate_holder = None
            elif self.gate_inited_at is not None:
                per_process = self.method in (gm.PER_PROCESS, gm.PER_PROCESS_MAPPED)
                settled = time.time() - self.gate_inited_at > 0.2  # a sample or two after its context
                if per_process and self.monitor.mapped and settled and not self.monitor.visible(child.name):
                    self.monitor.claim_new(child.name, self.gate_opened)
                seen = self.monitor.visible(child.name)
                if not per_process or seen or time.time() - self.gate_inited_at > 5.0:
                    if per_process and not seen:
                        self.note(f"{child.name}: no NVML pid found for it; its device figures will be null")
                    child.channel.send(cmd="init_ack")
                    self.gate_holder = None
            if self.gate_holder is not None:
                return
        self.gate_queue = [n for n in self.gate_queue if self.children[n].exit_code is None]
        if not self.gate_queue:
            return
        if self.monitor.mapped and self.e2e_starting():
            return  # an engine is creating its context: its new pid must be the only one

        def rank(name: str) -> tuple[int, float]:
            child = self.children[name]
            if child.kind == "build":
                return (0, -self.archs[child.arch].value)
            return (1, -self.workers[name].plan.value)

        self.gate_queue.sort(key=rank)
        name = self.gate_queue.pop(0)
        self.gate_holder, self.gate_opened, self.gate_inited_at = name, time.time(), None
        self.children[name].channel.send(cmd="init")

    def next_config(self, w: WorkerRun) -> cp.ConfigPlan | None:
        """The most valuable that fits the time left; for Unsloth, partial checkpointing last."""
        left = self.remaining()
        if w.plan.backend == "unsloth":
            ordered = cp.unsloth_candidates(w.remaining, w.half_done)
        else:
            ordered = sorted(w.remaining, key=lambda c: -c.value)
        for c in ordered:
            if c.est_seconds <= left:
                return c
        return None

    def feed(self, w: WorkerRun) -> None:
        c = self.next_config(w)
        waiting = max((p.value for p in self.pending_workers), default=0.0)
        if (
            c is not None
            and not self.stopping
            and not getattr(self.args, "only", None)
            and c.value < 0.6 * waiting
        ):
            # A process still waiting for a slot or memory has much more valuable work: make room.
            # (Not where --only named the configurations: each was asked for. On 2026-12-06 the
            # 3B and 7B processes of speed-ga yielded to the 1B's and measured nothing.)
            for left in w.remaining:
                self.skipped.append({"id": left.id, "why": "yielded its slot to a more valuable process"})
            w.remaining = []
            c = None
        if c is None or self.stopping:
            for left in w.remaining:
                if self.stopping:
                    why = "stopped"
                elif w.half_done and left.shape.gc == "all":
                    why = "Unsloth cannot checkpoint every layer after a partial configuration"
                else:
                    why = "deadline"
                self.skipped.append({"id": left.id, "why": why})
            w.remaining = []
            w.child.channel.send(cmd="exit")
            w.child.state = "exiting"
            return
        w.current = c
        w.child.state = "preparing"
        # Building a trainer (adapters, optimizer, data) runs on the GPU and the CPU: it competes
        # with a configuration training meanwhile, as a load does.
        self.windows.append(Window(w.child.name, "prepare", time.time()))
        w.child.channel.send(cmd="prepare", config=c.spec(self.dry))

    def grant(self) -> None:
        """One configuration trains at a time: the most valuable prepared one that fits."""
        if self.lock_holder is not None or self.stopping:
            return
        if any(
            r.ready_at and not r.finished_at and r.child.exit_code is None for r in self.e2e_runs.values()
        ):
            return  # an end-to-end run is about to train, or trains: it gets the GPU alone
        if self.args.clean_speed and not self.others_idle():
            return  # the timed steps must have the machine to themselves
        prepared = [w for w in self.workers.values() if w.child.state == "prepared" and w.current]
        for w in sorted(prepared, key=lambda w: -w.current.value):
            c = w.current
            if c.est_seconds > self.remaining():
                self.skip(w, "deadline")
                continue
            free = self.free_gib()
            need = (c.est_device_gib - w.plan.resident_gib) * 1.15 + 1.0
            if free is not None and need > free:
                transient = any(
                    ch.kind in ("build",) or ch.state in ("starting", "loading") for ch in self.alive()
                )
                if not transient and self.lock_holder is None:
                    self.skip(w, f"needs {need:.1f} GB, {free:.1f} free")
                continue
            w.child.state = "training"
            w.granted_at = time.time()
            w.free_at_grant_gib = free
            self.lock_holder = w.child.name
            self.windows.append(Window(w.child.name, "train", w.granted_at))
            w.child.channel.send(cmd="train", config=c.spec(self.dry))
            return

    def skip(self, w: WorkerRun, why: str) -> None:
        c = w.current
        assert c is not None
        self.skipped.append({"id": c.id, "why": why})
        w.remaining = [x for x in w.remaining if x.id != c.id]
        w.current = None
        w.child.state = "skipping"
        w.child.channel.send(cmd="skip", config=c.spec(self.dry))

    def free_gib(self) -> float | None:
        if not self.monitor.available:
            return None
        used = self.monitor.device_at(time.time())
        return None if used is None else self.total_gib - used / GIB

    def end_window(self, owner: str, kind: str) -> None:
        for w in reversed(self.windows):
            if w.owner == owner and w.kind == kind and w.t1 is None:
                w.t1 = time.time()
                return

    # ------------------------------------------------------------------------------------------
    # end-to-end runs through the real `qlc train`
    # ------------------------------------------------------------------------------------------

    def schedule_e2e(self) -> None:
        if self.stopping:
            return
        if self.monitor.mapped and (self.e2e_starting() or self.gate_holder is not None):
            return  # one process creating its context at a time: its new pid must be unambiguous
        if self.gpu_processes() >= self.concurrency:
            return  # before pending workers: an end-to-end run is what keeps a model folder on disk
        if any(r.child.exit_code is None for r in self.e2e_runs.values()):
            return  # one at a time: engines train without asking for the GPU
        for arch in self.archs.values():
            if arch.status != "ready":
                continue
            for spec in arch.e2e:
                if spec.name in self.e2e_runs:
                    continue
                budget = 90.0 if spec.backend == "hf" else 150.0
                if self.remaining() < budget:
                    self.skipped.append({"id": spec.name, "why": "deadline"})
                    self.e2e_runs[spec.name] = E2ERun(
                        spec, Child(spec.name, "e2e", arch.name, None, None, Path(), 0, exit_code=-1)
                    )
                    continue
                self.start_e2e(arch, spec)
                return

    def e2e_overrides(self, arch: ArchState, spec: cp.E2ESpec) -> list[str]:
        shape = cp.dry_run_shape(spec.shape) if self.dry else spec.shape
        a = cp.architecture(arch.name)
        targets = cp.targets(arch.name, spec.lora)
        sets = [
            f"model.name_or_path={arch.folder}",
            f"model.arch={arch.name}",
            f"data.source={arch.tokens}",
            "data.format=tokens",
            "data.packing=false",
            "data.val_fraction=0",
            "data.too_long=truncate",
            f"train.seq_len={shape.seq}",
            f"train.micro_batch={shape.mb}",
            "train.grad_accum=1",
            f"train.max_steps={3 if self.dry else spec.steps}",
            "train.save_steps=100000",
            "train.logging_steps=1",
            "train.eval_steps=0",
            "train.seed=3407",
            f"train.gradient_checkpointing={spec.checkpointed(a.layers)}",
            f"lora.r={spec.lora.r}",
            f"lora.alpha={2 * spec.lora.r}",
            f"lora.target_modules=[{','.join(targets)}]",
            f"hardware.backend={'hf' if self.dry else spec.backend}",
        ]
        sets.append("hardware.device=cpu" if self.dry else "hardware.gpu=auto")
        return sets

    def start_e2e(self, arch: ArchState, spec: cp.E2ESpec) -> None:
        runs_dir = self.work / "runs"
        sets = [x for o in self.e2e_overrides(arch, spec) for x in ("--set", o)]
        log = self.logs / f"{spec.name}.log"
        cwd = self.work / "cwd" / spec.name
        cwd.mkdir(parents=True, exist_ok=True)
        launched = time.time()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "tui.cli",
                "--runs-dir",
                str(runs_dir),
                "train",
                "llama-3.1-8b-rtx4090",
                *sets,
                "--detach",
                "--json",
            ],
            capture_output=True,
            text=True,
            env=self.env(spec.backend == "unsloth" and not self.dry),
            cwd=cwd,
            timeout=120,
        )
        child = Child(spec.name, "e2e", arch.name, None, None, log, launched)
        run = E2ERun(spec, child, launched=launched)
        self.e2e_runs[spec.name] = run
        self.children[spec.name] = child
        if proc.returncode != 0:
            child.exit_code = proc.returncode
            self.failures.append({"id": spec.name, "error": (proc.stdout + proc.stderr)[-2000:]})
            self.note(f"{spec.name}: qlc train failed to start")
            return
        started = json.loads(proc.stdout)
        run.run_dir, run.engine_pid = Path(started["path"]), int(started["pid"])
        child.pid = run.engine_pid
        child.log = run.run_dir / "engine.log"
        self.monitor.register(spec.name, run.engine_pid)
        self.windows.append(Window(spec.name, "e2e", launched))
        self.note(f"{spec.name}: qlc train started (engine pid {run.engine_pid})")

    def e2e_starting(self) -> bool:
        return any(r.child.exit_code is None and not r.claimed for r in self.e2e_runs.values())

    def poll_e2e(self) -> None:
        from engine import protocol
        from engine.run import runs

        for run in list(self.e2e_runs.values()):  # finishing one may start the next
            child = run.child
            if run.run_dir is None or child.exit_code is not None:
                continue
            events, run.offset = runs.read_events(run.run_dir, run.offset)
            for ev in events:
                run.events.append(ev)
                if isinstance(ev, protocol.Hello):
                    run.hello_at = time.time()
                    child.inited = True  # the engine sets its device before it says hello
                    child.inited = True  # the engine sets its device before it says hello
                elif isinstance(ev, protocol.ModelReady):
                    run.ready_at = ev.time
                    self.maybe_delete(self.archs[child.arch])
                elif (
                    isinstance(ev, protocol.StageEvent) and ev.stage == "training" and run.training_at is None
                ):
                    run.training_at = ev.time
                elif isinstance(ev, protocol.Finished):
                    run.finished_at = ev.time
            if self.monitor.mapped and not run.claimed:
                new = self.monitor.unowned_since(run.launched)
                if len(new) == 1:
                    run.claimed = self.monitor.claim_new(child.name, run.launched) is not None
                elif len(new) > 1 or time.time() - run.launched > 120:
                    run.claimed = True  # ambiguous or never seen: no device figure for this run
                    self.note(f"{child.name}: its NVML pid could not be told apart; no device figure")
            if not self.monitor.mapped:
                run.claimed = True
            alive = _pid_alive(run.engine_pid)
            timed_out = time.time() - run.launched > (240 if run.spec.backend == "hf" else 300)
            if run.finished_at or not alive or timed_out:
                if timed_out and alive:
                    _terminate_pid(run.engine_pid)
                child.exit_code = 0 if run.finished_at else 1
                self.end_window(child.name, "e2e")
                self.finish_e2e(run, timed_out)
                self.maybe_delete(self.archs[child.arch])
                self.schedule_e2e()

    def finish_e2e(self, run: E2ERun, timed_out: bool) -> None:
        from engine import protocol

        spec, ev = run.spec, run.events
        hello = next((e for e in ev if isinstance(e, protocol.Hello)), None)
        ready = next((e for e in ev if isinstance(e, protocol.ModelReady)), None)
        est = next((e for e in ev if isinstance(e, protocol.EstimateEvent)), None)
        steps = [e for e in ev if isinstance(e, protocol.Step)]
        finished = next((e for e in ev if isinstance(e, protocol.Finished)), None)
        if finished is None or finished.status != "completed" or not steps:
            why = "timed out" if timed_out else (finished.status if finished else "no finished event")
            tail = self.log_tail(run.child, 2000)
            self.failures.append({"id": spec.name, "error": f"{why}: {tail}"})
            self.note(f"{spec.name}: failed ({why})")
            return
        shape = cp.dry_run_shape(spec.shape) if self.dry else spec.shape
        a = cp.architecture(spec.arch)
        t0 = run.training_at or steps[0].time
        t1 = run.finished_at or steps[-1].time
        steady = [e.step_seconds for e in steps if e.step > 2]
        rec: dict[str, Any] = {
            "id": spec.name,
            "source": "qlc train",
            "same_as": spec.same_as,
            "arch": spec.arch,
            "backend": hello.backend if hello else spec.backend,
            "seq_len": shape.seq,
            "micro_batch": shape.mb,
            "gradient_checkpointing": (ready.checkpointed_layers if ready else spec.checkpointed(a.layers))
            > 0,
            "checkpointed_layers": ready.checkpointed_layers if ready else spec.checkpointed(a.layers),
            "lora_r": spec.lora.r,
            "lora_alpha": 2 * spec.lora.r,
            "target_modules": cp.targets(spec.arch, spec.lora),
            "modules_to_save": [],
            "optimizer": "paged_adamw_8bit",
            "oom": False,
            "allocator": "expandable",
            # The engine's choice (Backend.padding_free_rows): Unsloth 2026.10 has the
            # packing support it needs; the events do not say.
            "padding_free": (hello.backend if hello else spec.backend) == "unsloth",
            "padding_free_assumed": True,
            "liger": any(k.startswith("liger") for k in (ready.kernels if ready else [])),
            "kernels": list(ready.kernels) if ready else [],
            "steps": len(steps),
            "tokens_per_step": shape.seq * shape.mb,
            "step_seconds": [round(e.step_seconds, 4) for e in steps],
            "median_step_seconds": statistics.median(steady) if steady else None,
            "tokens_per_second": shape.seq * shape.mb / statistics.median(steady) if steady else None,
            "losses": [round(e.loss, 5) for e in steps],
            "peak_allocated_gib": steps[-1].memory_peak_allocated_gb,
            "peak_reserved_gib": steps[-1].memory_peak_reserved_gb,
            "after_load_allocated_gib": ready.memory_allocated_gb if ready else None,
            "engine_estimate": {"torch_peak_gb": est.torch_peak_gb, "device_total_gb": est.device_total_gb}
            if est
            else None,
            "launch_to_first_step_s": steps[0].time - run.launched,
            "t_train_start": t0,
            "t_train_end": t1,
            "t_end": t1,
        }
        # The engine does not report its paged optimizer state; it is exact arithmetic (tensors of
        # 1e5 elements or more, two uint8 states each), so take the memory model's figure.
        rec["paged_state_gib"] = self.paged_from_model(rec)
        rec["paged_state_source"] = "engine.memory (computed)"
        self.add_device_figures(rec, spec.name, t0, t1, paged_gib=rec["paged_state_gib"])
        self.records.append(rec)
        rec["speed_overlaps"] = self.speed_overlaps(spec.name, t0, t1)
        rec["speed_valid"] = not rec["speed_overlaps"] and rec["tokens_per_second"] is not None
        self.progress(rec)
        self.write()

    def e2e_comparisons(self) -> list[dict[str, Any]]:
        """Each end-to-end record beside its in-process twin (when it has one, and it ran)."""
        out = []
        for rec in self.records:
            if rec.get("source") != "qlc train":
                continue
            same = next((r for r in self.records if r.get("id") == rec.get("same_as")), None)
            comparison = {"id": rec["id"], "same_as": rec.get("same_as")}
            for key in ("peak_allocated_gib", "peak_reserved_gib", "device_peak_gib", "tokens_per_second"):
                comparison[key] = rec.get(key)
                if same is not None:
                    comparison[f"{key} (in-process)"] = same.get(key)
            out.append(comparison)
        return out

    # ------------------------------------------------------------------------------------------
    # records
    # ------------------------------------------------------------------------------------------

    def add_device_figures(
        self, rec: dict[str, Any], owner: str, t0: float, t1: float, paged_gib: float | None
    ) -> None:
        """The run's device peak over its training window, and how it was found."""
        others = [
            c.name
            for c in self.children.values()
            if c.name != owner and c.inited and c.started < t1 and (c.ended is None or c.ended > t0)
        ]
        rec["device_exclusive"] = not others
        used_peak, _ = self.monitor.device_peak(t0, t1)
        rec["device_used_peak_gib"] = used_peak / GIB if used_peak is not None else None
        rec["device_method"] = gm.NONE
        rec["device_peak_gib"] = None
        probe = self.probe
        if self.method in (gm.PER_PROCESS, gm.PER_PROCESS_MAPPED):
            peak, n = self.monitor.process_peak(owner, t0, t1)
            rec["device_samples"] = n
            if peak is not None:
                rec["device_process_peak_gib"] = peak / GIB
                counted = probe.managed_in_process if probe else None
                if counted or paged_gib is None:
                    rec["device_peak_gib"] = peak / GIB
                    rec["device_method"] = (
                        self.method if counted else f"{self.method} (paged state not added)"
                    )
                else:
                    # Managed memory is not in NVML's per-process figure (or unknown): add the
                    # paged state the process measured, as resident (what the model assumes).
                    rec["device_peak_gib"] = peak / GIB + paged_gib
                    how = "not in NVML's figure" if counted is False else "assumed outside NVML's figure"
                    rec["device_method"] = f"{self.method} + paged state ({how})"
            else:
                rec["device_method"] = f"none: no NVML pid of {owner} in the window"
        elif self.method == gm.BASELINE:
            if not others and used_peak is not None and self.baseline_used is not None:
                rec["device_peak_gib"] = (used_peak - self.baseline_used) / GIB
                rec["device_method"] = gm.BASELINE
            else:
                rec["device_method"] = "none: other processes held the GPU (baseline method)"
        else:
            rec["device_method"] = "none: no NVML"

    def speed_overlaps(self, owner: str, t0: float, t1: float) -> list[str]:
        out = []
        for w in self.windows:
            if w.owner == owner:
                continue
            end = w.t1 if w.t1 is not None else time.time()
            lap = min(end, t1) - max(w.t0, t0)
            if lap > 0.05:
                out.append(f"{w.kind} {w.owner} {lap:.1f}s")
        return out

    def on_record(self, w: WorkerRun, rec: dict[str, Any]) -> None:
        c = w.current
        assert c is not None
        rec.update(
            process=w.plan.name,
            planned_backend=w.plan.backend,
            value=c.value,
            est_seconds=c.est_seconds,
            gpu_free_at_grant_gib=w.free_at_grant_gib,
        )
        if self.dry:
            rec["backend"] = w.plan.backend  # the plan's; the dry run trained with hf
            rec["dry_run_trained_with"] = "hf"
        t0 = w.granted_at or rec["t_train_start"]
        self.add_device_figures(rec, w.plan.name, t0, rec["t_end"], rec.get("paged_state_gib"))
        overlaps = self.speed_overlaps(w.plan.name, rec["t_train_start"], rec["t_train_end"])
        rec["speed_overlaps"] = overlaps
        rec["speed_valid"] = (
            not overlaps and rec.get("tokens_per_second") is not None and not rec.get("memory_history")
        )
        if rec.get("error"):
            self.failures.append({"id": c.id, "error": rec["error"]})
        else:
            self.records.append(rec)
        w.done.append(c.id)
        if w.plan.backend == "unsloth" and c.shape.gc == "half":
            w.half_done = True  # Unsloth cannot checkpoint every layer again
        w.remaining = [x for x in w.remaining if x.id != c.id]
        w.current = None
        self.lock_holder = None
        self.end_window(w.plan.name, "train")
        self.progress(rec)
        self.write()

    def progress(self, rec: dict[str, Any]) -> None:
        est = self.estimate_for(rec)
        parts = [f"rec {len(self.records):3d} {rec['id']}"]
        if rec.get("oom"):
            parts.append("OUT OF MEMORY")
        res = rec.get("peak_reserved_gib")
        if res is not None:
            e = est.get("torch_peak_gb")
            parts.append(f"reserved {res:.2f}" + (f" (est {e:.2f}, {e / res - 1:+.1%})" if e else ""))
        dev = rec.get("device_peak_gib")
        if dev is not None:
            e = est.get("device_total_gb")
            parts.append(f"device {dev:.2f}" + (f" (est {e:.2f}, {e / dev - 1:+.1%})" if e else ""))
        parts.append(f"[{rec.get('device_method')}]")
        tps = rec.get("tokens_per_second")
        if tps:
            parts.append(f"{tps:,.0f} tok/s" + ("" if rec.get("speed_valid", True) else " (overlapped)"))
        say(self.t0, " ".join(parts))

    def paged_from_model(self, rec: dict[str, Any]) -> float | None:
        try:
            est = estimate_of(rec, self.gpu, self.total_gib)
            return sum(v for k, v in est.term("optimizer").parts.items() if k.startswith("paged"))
        except Exception:
            return None

    def estimate_for(self, rec: dict[str, Any]) -> dict[str, float]:
        if self.dry:
            return {}
        try:
            est = estimate_of(rec, self.gpu, self.total_gib)
            return {"torch_peak_gb": est.torch_peak_gb, "device_total_gb": est.device_total_gb}
        except Exception:
            return {}

    # ------------------------------------------------------------------------------------------
    # events
    # ------------------------------------------------------------------------------------------

    def poll_children(self) -> None:
        for child in list(self.children.values()):
            if child.channel is None or child.kind == "probe":
                continue
            for msg in child.channel.poll():
                self.on_message(child, msg)
            if child.exit_code is None and child.proc is not None and child.proc.poll() is not None:
                for msg in child.channel.poll():
                    self.on_message(child, msg)
                self.on_exit(child)

    def on_message(self, child: Child, msg: dict[str, Any]) -> None:
        ev = msg.get("ev")
        if ev == "hello":
            if child.kind == "worker":
                vs = msg.get("versions") or {}
                if self.workers[child.name].plan.backend == "unsloth":
                    self.versions_unsloth = self.versions_unsloth or vs
                else:
                    self.versions_hf = self.versions_hf or vs
                self.workers[child.name].versions = vs
        elif ev == "want_init":
            self.gate_queue.append(child.name)
        elif ev == "inited":
            child.inited = True
            child.state = "loading"
            self.gate_inited_at = time.time()
            if child.kind == "worker":
                self.windows.append(Window(child.name, "load", time.time()))
        elif ev == "built":
            self.on_built(self.archs[child.arch], msg)
        elif ev == "loaded":
            w = self.workers[child.name]
            w.load_s = msg["t1"] - msg["t0"]
            self.end_window(child.name, "load")
            self.maybe_delete(self.archs[child.arch])
        elif ev == "warmed":
            w = self.workers[child.name]
            w.warmup_s = msg["t1"] - msg["t0"]
            self.windows.append(Window(child.name, "warmup", msg["t0"], msg["t1"]))
        elif ev == "ready":
            child.state = "ready"
            if self.args.clean_speed and self.lock_holder is not None:
                self.deferred_feeds.append(self.workers[child.name])  # prepares once the GPU is free
            else:
                self.feed(self.workers[child.name])
        elif ev == "prepared":
            child.state = "prepared"
            self.end_window(child.name, "prepare")
        elif ev == "record":
            self.on_record(self.workers[child.name], msg["record"])
        elif ev == "skipped":
            child.state = "skipped"
            self.end_window(child.name, "prepare")
        elif ev == "failed":
            w = self.workers[child.name]
            cid = msg.get("id")
            self.failures.append({"id": cid, "process": child.name, "error": msg.get("error")})
            self.note(f"{child.name}: {cid} failed: {str(msg.get('error'))[:200]}")
            if w.current is not None and w.current.id == cid:
                w.remaining = [x for x in w.remaining if x.id != cid]
                if w.child.state == "training":
                    self.lock_holder = None
                    self.end_window(child.name, "train")
                w.current = None
        elif ev == "fatal":
            self.failures.append(
                {"id": child.name, "error": msg.get("error"), "log": self.log_tail(child, 1500)}
            )
            self.note(f"{child.name}: fatal: {str(msg.get('error'))[:200]}")

    def on_exit(self, child: Child) -> None:
        child.exit_code = child.proc.poll() if child.proc else -1
        child.ended = time.time()
        if self.gate_holder == child.name:
            self.gate_holder = None
        if child.kind == "build":
            arch = self.archs[child.arch]
            self.end_window(child.name, "build")
            if arch.status == "building":
                arch.status = "failed"
                self.failures.append({"id": f"build {arch.name}", "error": self.log_tail(child)})
                self.note(f"{arch.name}: build failed (exit {child.exit_code})")
                for w in arch.workers:
                    self.skipped += [{"id": c.id, "why": "build failed"} for c in w.configs]
        elif child.kind == "worker":
            w = self.workers[child.name]
            if self.lock_holder == child.name:
                self.lock_holder = None
                self.end_window(child.name, "train")
            for kind in ("load", "warmup", "prepare"):
                self.end_window(child.name, kind)
            if child.exit_code != 0 and not self.stopping:
                lost = [c.id for c in w.remaining]
                self.failures.append(
                    {
                        "id": child.name,
                        "error": f"exit {child.exit_code}",
                        "lost": lost,
                        "log": self.log_tail(child),
                    }
                )
                self.note(f"{child.name}: exited with {child.exit_code}; {len(lost)} configurations lost")
            w.remaining = []
            self.maybe_delete(self.archs[child.arch])

    def maybe_delete(self, arch: ArchState) -> None:
        """Delete an architecture's folder once nothing will read it again."""
        if arch.status != "ready":
            return
        for w in arch.workers:
            run = self.workers.get(w.name)
            if run is None:
                if w in self.pending_workers:
                    return  # not started yet
                continue
            if run.child.exit_code is None and run.load_s is None:
                return  # still loading
        for spec in arch.e2e:
            run = self.e2e_runs.get(spec.name)
            if run is None:
                return
            if run.child.exit_code is None and run.ready_at is None:
                return
        shutil.rmtree(arch.folder, ignore_errors=True)
        arch.status = "deleted"
        self.note(f"{arch.name}: model folder deleted")

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------

    def finished(self) -> bool:
        if any(a.status in ("pending", "building") for a in self.archs.values()) or self.pending_workers:
            return False
        return (
            not self.alive(("build", "worker"))
            and all(r.child.exit_code is not None for r in self.e2e_runs.values())
            and all(
                spec.name in self.e2e_runs
                for a in self.archs.values()
                if a.status in ("ready", "deleted")
                for spec in a.e2e
            )
        )

    def run(self) -> None:
        self.note(
            f"{self.gpu}, {self.total_gib:.1f} GiB; {sum(len(w.configs) for w in self.plan.workers)} configurations "
            f"in {len(self.plan.workers)} processes, {len(self.plan.e2e)} end-to-end runs; deadline {self.args.deadline_s:.0f} s"
        )
        self.run_probe()
        self.write()
        errors = 0
        try:
            while time.time() < self.deadline - FINALIZE_RESERVE_S:
                try:
                    self.step()
                    if self.finished():
                        break
                except Exception as exc:
                    # A bug here must not lose the call: note it, keep going, give up if it repeats.
                    errors += 1
                    detail = traceback.format_exc(limit=4)
                    self.failures.append({"id": "driver", "error": detail[-1500:]})
                    self.note(f"driver error {errors}: {exc.__class__.__name__}: {exc}")
                    if errors >= 20:
                        break
                    time.sleep(0.5)
                time.sleep(0.05)
        finally:
            self.stop()

    def step(self) -> None:
        self.poll_children()
        self.poll_e2e()
        if not (self.args.clean_speed and self.lock_holder is not None):
            # --clean-speed: nothing new starts on the GPU (or the CPUs) while a configuration trains.
            self.schedule_gate()
            self.schedule_e2e()
            self.schedule_workers()
            self.schedule_builds()
            for w in self.deferred_feeds:
                self.feed(w)
            self.deferred_feeds = []
        self.grant()

    def others_idle(self) -> bool:
        """--clean-speed: every live process waits (prepared or fed nothing), none builds, loads,
        warms up, prepares or holds the init gate, and no end-to-end run is alive."""
        if self.gate_holder is not None:
            return False
        if any(r.child.exit_code is None for r in self.e2e_runs.values()):
            return False
        return all(
            ch.kind == "worker" and ch.state in ("prepared", "ready", "exiting") for ch in self.alive()
        )

    def stop(self) -> None:
        self.stopping = True
        for w in self.workers.values():
            if w.child.exit_code is None:
                with contextlib.suppress(Exception):
                    w.child.channel.send(cmd="exit")
            for c in w.remaining:
                self.skipped.append({"id": c.id, "why": "deadline"})
            w.remaining = []
        # A configuration still training was granted to end by now: give it until 3 s before the
        # deadline to send its record; the rest get 3 s to exit on their own.
        end = max(time.time() + 3, self.deadline - 3) if self.lock_holder else time.time() + 3
        while time.time() < end and self.alive(("build", "worker")):
            with contextlib.suppress(Exception):
                self.poll_children()
            if self.lock_holder is None:
                end = min(end, time.time() + 3)
            time.sleep(0.1)
        for child in self.alive(("build", "worker")):
            with contextlib.suppress(Exception):
                child.proc.terminate()
        for run in self.e2e_runs.values():
            if run.child.exit_code is None and run.engine_pid:
                _terminate_pid(run.engine_pid)
                run.child.exit_code = -15
        time.sleep(1)
        for child in self.alive(("build", "worker")):
            with contextlib.suppress(Exception):
                child.proc.kill()
            child.exit_code = child.proc.poll()
        for arch in self.archs.values():
            if arch.folder.exists():
                shutil.rmtree(arch.folder, ignore_errors=True)
        self.monitor.stop()
        self.write()

    def write(self) -> None:
        try:
            self._write()
        except Exception:
            traceback.print_exc()  # the next write tries again; the last good file stays

    def _write(self) -> None:
        planned = [c.id for w in self.plan.workers for c in w.configs] + [e.name for e in self.plan.e2e]
        data = {
            "date": time.strftime("%Y-%m-%d"),
            "gpu": self.gpu,
            "gpu_total_gib": round(self.total_gib, 3),
            "nvidia_driver": self.driver_version,
            "versions": self.versions_hf,
            "versions_unsloth": self.versions_unsloth,
            "source": "bench/calibration_matrix.py",
            "dry_run": self.dry,
            "device_method": self.method,
            "nvml_probe": self.probe.to_dict() if self.probe else None,
            "concurrency": self.concurrency,
            "clean_speed": bool(self.args.clean_speed),
            "deadline_s": self.args.deadline_s,
            "elapsed_s": round(time.time() - self.t0, 1),
            "planned": len(planned),
            "measured": len(self.records),
            "records": self.records,
            "failures": self.failures,
            "skipped": self.skipped,
            "e2e": self.e2e_comparisons(),
            "builds": {
                a.name: {"seconds": a.build_seconds, "gib": (a.built_bytes or 0) / GIB, "status": a.status}
                for a in self.archs.values()
            },
            "processes": {
                name: {
                    "backend": w.plan.backend,
                    "load_s": w.load_s,
                    "warmup_s": w.warmup_s,
                    "exit_code": w.child.exit_code,
                    "measured": len(w.done),
                }
                for name, w in self.workers.items()
            },
            # Unsloth's switches set from outside (a forced loss route, say): the records depend on them.
            "unsloth_env": {
                k: v
                for k, v in os.environ.items()
                if k.startswith("UNSLOTH_") and k != "UNSLOTH_DISABLE_STATISTICS"
            },
            # PyTorch's memory history recorded (bench/memory_history.py): its records' times do not count.
            "memory_history": bool(os.environ.get("QLC_BENCH_MEMORY_HISTORY")),
            "plan": planned,
            "order": [r["id"] for r in self.records],
            "timeline": self.timeline,
            "notes": [
                "device_peak_gib: the process's own NVML usage over its training window (device_method says how)",
                "speed_valid: no load, build, warm-up, trainer preparation or end-to-end run overlapped the timed steps",
                "baseline_allocated_gib: memory the process held beyond the model's load and the new "
                "adapters before the configuration (left by earlier ones); the replay adds it",
            ],
        }
        tmp = self.out_file.with_name(self.out_file.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(self.out_file)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _terminate_pid(pid: int) -> None:
    """End an engine process we started (by its own pid), then kill it if it lingers."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    end = time.time() + 5
    while time.time() < end and _pid_alive(pid):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["summary"]:
        brief = "--brief" in argv
        for p in argv[1:]:
            if p != "--brief":
                print(summary(Path(p), per_record=not brief))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qlc-matrix"))
    ap.add_argument("--deadline-s", type=float, default=540.0, help="stop and write what finished after this")
    ap.add_argument("--arch", action="append", help="architectures (default: the plan's six)")
    ap.add_argument("--backend", action="append", choices=["hf", "unsloth"], help="default both")
    ap.add_argument(
        "--unsloth-path", help="site folder with the Unsloth stack, first on PYTHONPATH for Unsloth"
    )
    ap.add_argument("--no-e2e", action="store_true", help="no end-to-end `qlc train` runs")
    ap.add_argument(
        "--concurrency", type=int, help="GPU processes at once (default 16; 1 with the baseline method)"
    )
    ap.add_argument(
        "--clean-speed",
        action="store_true",
        help="train only while every other process idles (no load, build, warm-up or preparation): "
        "clean tokens/s for a speed table, at the cost of less overlap",
    )
    ap.add_argument("--disk-gib", type=float, default=45.0, help="model folders on disk at once")
    ap.add_argument("--max-device-gib", type=float, default=60.0, help="leave out configurations above this")
    ap.add_argument("--plan", action="store_true", help="print the planned rows and their guessed seconds")
    ap.add_argument(
        "--max-configs", type=int, help="at most this many configurations per process (quick runs)"
    )
    ap.add_argument(
        "--skip-measured",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="leave out the configurations these records files already hold (a second call measures others)",
    )
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="ID",
        help="measure only these configurations, named as the records name them (--plan lists them)",
    )
    ap.add_argument(
        "--unsloth-process-per-gc",
        action="store_true",
        help="one Unsloth process per LoRA group and checkpointing mode (no configuration runs on a model "
        "Unsloth was reconfigured for another mode)",
    )
    ap.add_argument(
        "--grad-accum-shapes",
        action="store_true",
        help="also plan steps of several micro-batches (the rank-16 all-linear group: "
        "bench/calibration_plan.GA_SHAPES)",
    )
    ap.add_argument("--steps", type=int, help="optimizer steps of every configuration (default: the plan's)")
    ap.add_argument("--dry-run", action="store_true", help="shrunk models on the CPU: every path but CUDA")
    ap.add_argument(
        "--fake-nvml",
        choices=["pids", "hidden", "no-usage", "none"],
        default="pids",
        help="dry run: stand in for NVML with our processes' resident memory (pids as ours, hidden as a "
        "container's host pids, listed without usage, or no NVML)",
    )
    args = ap.parse_args(argv)
    backends = tuple(args.backend or ("hf", "unsloth"))
    total = 141.0 if args.dry_run else ((gpu_info() or {}).get("total_gib") or 140.0)
    plan = cp.build_plan(
        args.arch,
        backends,
        total,
        args.max_device_gib,
        e2e=not args.no_e2e,
        unsloth_process_per_gc=args.unsloth_process_per_gc,
        grad_accum=args.grad_accum_shapes,
    )
    if args.only:
        planned = {c.id for w in plan.workers for c in w.configs}
        if unknown := sorted(set(args.only) - planned):
            ap.error(
                f"--only {', '.join(unknown)}: not in the plan (bench/calibration_matrix.py --plan lists it)"
            )
        for w in plan.workers:
            w.configs = [c for c in w.configs if c.id in args.only]
        plan.workers = [w for w in plan.workers if w.configs]
    if args.skip_measured:
        measured = {
            r.get("id") for f in args.skip_measured for r in json.loads(f.read_text()).get("records", [])
        }
        for w in plan.workers:
            w.configs = [c for c in w.configs if c.id not in measured]
        plan.workers = [w for w in plan.workers if w.configs]
    if args.steps:
        # More steps than steps_for's five: a median of more timed steps, for speed rechecks (the
        # estimate of seconds grows with them).
        for w in plan.workers:
            w.configs = [
                dataclasses.replace(
                    c, steps=args.steps, est_seconds=round(c.est_seconds * args.steps / c.steps, 1)
                )
                for c in w.configs
            ]
    if args.max_configs:
        for w in plan.workers:
            # The most valuable, run in the worker's order (Unsloth's: the shortest first).
            keep = {c.id for c in sorted(w.configs, key=lambda c: -c.value)[: args.max_configs]}
            w.configs = [c for c in w.configs if c.id in keep]
    if args.plan:
        print("\n".join(plan.table()))
        by_arch: dict[str, float] = {}
        for w in plan.workers:
            by_arch[w.arch] = by_arch.get(w.arch, 0.0) + sum(c.est_seconds for c in w.configs)
        print(f"\n{sum(len(w.configs) for w in plan.workers)} configurations, {len(plan.workers)} processes")
        for arch, secs in by_arch.items():
            print(
                f"  {arch:14s} build {cp.build_seconds_guess(arch):4.0f} s, folder {cp.folder_gib(arch):5.1f} GB, "
                f"training {secs:5.0f} GPU s"
            )
        print(f"  training in all: {plan.gpu_seconds():.0f} GPU s (one configuration at a time)")
        for e in plan.e2e:
            print(
                f"  end to end: {e.name} ({e.arch} {e.backend} {e.lora.name} {e.shape.name}, {e.steps} steps)"
            )
        return 0
    if args.out is None:
        ap.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        for w in plan.workers:
            for i, c in enumerate(w.configs):
                w.configs[i] = cp.ConfigPlan(**{**c.__dict__, "est_seconds": 3.0})
            w.startup_seconds = 20.0
    driver = Driver(args, plan)
    driver.run()
    print(summary(driver.out_file, per_record=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
