"""Device memory of a run's own processes, sampled through NVML in a thread.

What nvidia-smi shows for the whole GPU counts every process on it: a bench parent that holds a
CUDA context, a model being built next door, another run. A device figure for the memory model
must count only the run's processes. NVML lists each process that holds a context with its own
usage (`nvmlDeviceGetComputeRunningProcesses`, `...GraphicsRunningProcesses`), which covers the
CUDA context, PyTorch's pool and any other cudaMalloc of that process.

Three situations, told apart by `probe_method` from a probe child's allocations:
- "nvml-per-process": NVML's pids are ours (no PID namespace between us and the driver). A
  process is attributed to a run by walking /proc's parent links from the NVML pid to the run's
  root pid.
- "nvml-per-process-mapped": NVML lists processes with their usage under pids we cannot see
  (inside a container the driver reports host pids). Each of our processes creates its CUDA
  context while it holds the init gate (bench/calibration_matrix.py grants it to one process at a
  time), so the one unknown pid that appears during that window is that process's.
- "baseline": NVML reports no per-process usage (some containers): the device's used memory minus
  a baseline taken when none of our processes held the GPU, valid only while the run is alone on
  the GPU (the matrix then runs one process at a time).

Managed memory (bitsandbytes' paged optimizer state, cudaMallocManaged) is not always in the
per-process figure; the probe measures whether it is, and callers add the paged state when not.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

GIB = 2**30
PER_PROCESS = "nvml-per-process"
PER_PROCESS_MAPPED = "nvml-per-process-mapped"
BASELINE = "baseline"
NONE = "none"


class MemorySource(Protocol):
    def used(self) -> int: ...

    def processes(self) -> dict[int, int | None]: ...


class NvmlSource:
    """GPU 0 through NVML: the device's used bytes and each process's (None: not reported)."""

    def __init__(self, index: int = 0) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def total(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).total)

    def processes(self) -> dict[int, int | None]:
        out: dict[int, int | None] = {}
        for query in (
            self._nvml.nvmlDeviceGetComputeRunningProcesses,
            self._nvml.nvmlDeviceGetGraphicsRunningProcesses,
        ):
            with contextlib.suppress(self._nvml.NVMLError):
                for p in query(self._handle):
                    mem = p.usedGpuMemory
                    prev = out.get(p.pid)
                    out[p.pid] = mem if prev is None else max(prev, mem or 0)
        return out


class FakeCudaSource:
    """A stand-in for NVML in CPU dry runs, so the attribution code runs before it spends GPU
    time: a process "holds a context" once it has written its pid to `marker_dir` (the workers do
    at their CUDA init when QLC_FAKE_CUDA_DIR is set), and its "device memory" is its resident
    set. `hidden` offsets the pids, as a container's host pids would look."""

    OFFSET = 4_000_000

    def __init__(self, marker_dir: Path, hidden: bool = False, report_usage: bool = True) -> None:
        self.marker_dir, self.hidden, self.report_usage = marker_dir, hidden, report_usage
        marker_dir.mkdir(parents=True, exist_ok=True)

    def processes(self) -> dict[int, int | None]:
        out: dict[int, int | None] = {}
        for marker in self.marker_dir.glob("*"):
            pid = int(marker.name)
            rss = _rss_bytes(pid)
            if rss is None:
                continue
            out[pid + self.OFFSET if self.hidden else pid] = rss if self.report_usage else None
        return out

    def used(self) -> int:
        return 512 * 2**20 + sum(v or 0 for v in self.processes().values())

    def total(self) -> int:
        return 141 * GIB


def _rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
        return int(data[data.rindex(")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def ancestors(pid: int, limit: int = 64) -> list[int]:
    """pid and its parents up to init, from /proc."""
    chain = [pid]
    while len(chain) < limit:
        parent = parent_pid(chain[-1])
        if parent is None or parent <= 1 or parent in chain:
            break
        chain.append(parent)
    return chain


@dataclass
class Sample:
    t: float
    used: int
    processes: dict[int, int | None]


@dataclass
class Owner:
    """One of our GPU processes (a worker, a build, an engine run): its root pid, and the NVML pids
    attributed to it."""

    name: str
    root_pid: int | None
    nvml_pids: set[int] = field(default_factory=set)


class GpuMemoryMonitor:
    """Samples device-wide used memory and each process's usage every `interval` seconds, and
    attributes NVML pids to registered owners (see the module docstring for how)."""

    def __init__(self, source: MemorySource | None, interval: float = 0.05, mapped: bool = False) -> None:
        self.source = source
        self.interval = interval
        self.mapped = mapped  # NVML pids are not ours: attribute by init windows (claim_new)
        self.samples: list[Sample] = []
        self.first_seen: dict[int, float] = {}
        self.owners: dict[str, Owner] = {}
        self.by_pid: dict[int, str] = {}
        self.foreign: set[int] = set()  # NVML pids present before we started: not ours
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0

    @property
    def available(self) -> bool:
        return self.source is not None

    def start(self) -> GpuMemoryMonitor:
        if self.source is not None:
            first = self._sample()
            if first is not None:
                self.foreign = set(first.processes)
            self._thread = threading.Thread(target=self._loop, daemon=True, name="gpu-memory")
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)

    def _sample(self) -> Sample | None:
        assert self.source is not None
        try:
            sample = Sample(time.time(), self.source.used(), self.source.processes())
        except Exception:
            self.errors += 1
            return None
        with self._lock:
            self.samples.append(sample)
            for pid in sample.processes:
                if pid not in self.first_seen:
                    self.first_seen[pid] = sample.t
                    if not self.mapped:
                        self._attribute_by_ancestry(pid)
        return sample

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    # -- attribution ---------------------------------------------------------------------------

    def register(self, name: str, root_pid: int | None) -> None:
        with self._lock:
            self.owners[name] = Owner(name, root_pid)
            if not self.mapped:
                for pid in self.first_seen:
                    if pid not in self.by_pid:
                        self._attribute_by_ancestry(pid)

    def _attribute_by_ancestry(self, pid: int) -> None:
        roots = {o.root_pid: o for o in self.owners.values() if o.root_pid is not None}
        for ancestor in ancestors(pid):
            owner = roots.get(ancestor)
            if owner is not None:
                owner.nvml_pids.add(pid)
                self.by_pid[pid] = owner.name
                return

    def unowned_since(self, t0: float) -> list[int]:
        with self._lock:
            return [
                pid
                for pid, t in self.first_seen.items()
                if t >= t0 and pid not in self.by_pid and pid not in self.foreign
            ]

    def claim_new(self, name: str, since: float) -> int | None:
        """Mapped mode: attribute to `name` the one NVML pid first seen since `since` that no one
        owns. Returns it, or None when there is none or more than one (ambiguous: left unowned)."""
        new = self.unowned_since(since)
        if len(new) != 1:
            return None
        with self._lock:
            owner = self.owners.setdefault(name, Owner(name, None))
            owner.nvml_pids.add(new[0])
            self.by_pid[new[0]] = name
        return new[0]

    def visible(self, name: str) -> bool:
        owner = self.owners.get(name)
        return bool(owner and owner.nvml_pids)

    # -- figures -------------------------------------------------------------------------------

    def _window(self, t0: float, t1: float) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if t0 <= s.t <= t1]

    def process_peak(self, name: str, t0: float, t1: float) -> tuple[int | None, int]:
        """(the peak over [t0, t1] of the summed usage of `name`'s NVML pids, samples used)."""
        owner = self.owners.get(name)
        if owner is None or not owner.nvml_pids:
            return None, 0
        best: int | None = None
        n = 0
        for s in self._window(t0, t1):
            values = [s.processes.get(p) for p in owner.nvml_pids if p in s.processes]
            if not values or any(v is None for v in values):
                continue
            total = sum(v or 0 for v in values)
            n += 1
            best = total if best is None else max(best, total)
        return best, n

    def process_at(self, name: str, t: float) -> int | None:
        """`name`'s usage in the last sample at or before t."""
        owner = self.owners.get(name)
        if owner is None or not owner.nvml_pids:
            return None
        with self._lock:
            before = [s for s in self.samples if s.t <= t]
        for s in reversed(before):
            values = [s.processes.get(p) for p in owner.nvml_pids if p in s.processes]
            if values and all(v is not None for v in values):
                return sum(v or 0 for v in values)
        return None

    def device_peak(self, t0: float, t1: float) -> tuple[int | None, int]:
        window = self._window(t0, t1)
        return (max(s.used for s in window) if window else None), len(window)

    def device_at(self, t: float) -> int | None:
        with self._lock:
            before = [s.used for s in self.samples if s.t <= t]
        return before[-1] if before else None

    def device_max_between(self, t0: float, t1: float) -> int | None:
        window = self._window(t0, t1)
        return max(s.used for s in window) if window else None

    def device_min_between(self, t0: float, t1: float) -> int | None:
        window = self._window(t0, t1)
        return min(s.used for s in window) if window else None

    def reports_usage(self) -> bool:
        """Whether any sample so far listed a process with a usage figure."""
        with self._lock:
            return any(v is not None for s in self.samples for v in s.processes.values())


def open_source(fake: str | None = None, marker_dir: Path | None = None) -> MemorySource | None:
    """NVML, or for a dry run a FakeCudaSource: fake "pids" (our pids visible), "hidden" (host
    pids), "no-usage" (pids listed without usage), "none" (no NVML at all)."""
    if fake is not None:
        if fake == "none":
            return None
        assert marker_dir is not None
        return FakeCudaSource(marker_dir, hidden=fake == "hidden", report_usage=fake != "no-usage")
    try:
        return NvmlSource()
    except Exception:
        return None


def mark_fake_cuda() -> None:
    """In a dry run with a fake NVML (QLC_FAKE_CUDA_DIR), say that this process now holds a
    "CUDA context"."""
    marker_dir = os.environ.get("QLC_FAKE_CUDA_DIR")
    if marker_dir:
        Path(marker_dir, str(os.getpid())).touch()


@dataclass(frozen=True)
class ProbeResult:
    """What a probe child's allocations showed about this machine's NVML."""

    method: str  # PER_PROCESS, PER_PROCESS_MAPPED, BASELINE or NONE
    pid_seen: int | None = None
    managed_in_process: bool | None = None  # managed memory shows in the per-process figure
    managed_in_device: bool | None = None  # ... in the device's used memory
    evict_frees: bool | None = None  # prefetching managed memory to the host frees the device's copy
    context_gib: float | None = None  # the probe's usage right after creating its context
    torch_alloc_seen_gib: float | None = None  # what 1 GiB allocated through torch added
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "pid_seen": self.pid_seen,
            "managed_in_process": self.managed_in_process,
            "managed_in_device": self.managed_in_device,
            "evict_frees": self.evict_frees,
            "context_gib": self.context_gib,
            "torch_alloc_seen_gib": self.torch_alloc_seen_gib,
            "notes": list(self.notes),
        }


def analyse_probe(
    monitor: GpuMemoryMonitor, name: str, root_pid: int, events: dict[str, float], gate_opened: float
) -> ProbeResult:
    """Read the probe's phases (events: inited, torch_alloc, managed, evicted, done: the times each
    began; each phase lasts PROBE_PHASE_S) off the monitor's samples."""
    if not monitor.available:
        return ProbeResult(NONE, notes=("no NVML",))
    notes: list[str] = []
    if monitor.visible(name):
        method = PER_PROCESS
    else:
        pid = monitor.claim_new(name, gate_opened)
        method = PER_PROCESS_MAPPED if pid is not None else BASELINE
        if pid is None:
            notes.append("no new NVML pid appeared when the probe created its context")
    if method != BASELINE and not monitor.reports_usage():
        method = BASELINE
        notes.append("NVML lists processes without their memory")
    owner = monitor.owners.get(name)
    pid_seen = next(iter(owner.nvml_pids), None) if owner else None

    def proc(t: str) -> int | None:
        return monitor.process_at(name, events[t] + PROBE_PHASE_S * 0.9) if t in events else None

    def dev(t: str) -> int | None:
        return monitor.device_at(events[t] + PROBE_PHASE_S * 0.9) if t in events else None

    gib = float(GIB)
    half = 0.4 * gib  # the probe moves 512 MiB of managed memory
    managed_in_process = managed_in_device = evict_frees = None
    context = torch_seen = None
    if method != BASELINE:
        p_init, p_alloc, p_man = proc("inited"), proc("torch_alloc"), proc("managed")
        context = p_init / gib if p_init is not None else None
        if p_init is not None and p_alloc is not None:
            torch_seen = (p_alloc - p_init) / gib
        if p_alloc is not None and p_man is not None:
            managed_in_process = p_man - p_alloc > half
        if torch_seen is not None and torch_seen < 0.8:
            # 1 GiB through torch (expandable segments, as the workers) did not show: the
            # per-process figure cannot be trusted for PyTorch's pool.
            notes.append(f"1 GiB allocated through torch added {torch_seen:.2f} GiB to the process's figure")
            method = BASELINE
    d_alloc, d_man, d_evict = dev("torch_alloc"), dev("managed"), dev("evicted")
    if d_alloc is not None and d_man is not None:
        managed_in_device = d_man - d_alloc > half
        if d_evict is not None:
            evict_frees = d_man - d_evict > half
    if "managed" not in events:
        notes.append("no managed allocation (no CUDA, or bitsandbytes failed: see the probe's log)")
    return ProbeResult(
        method,
        pid_seen,
        managed_in_process,
        managed_in_device,
        evict_frees,
        context,
        torch_seen,
        tuple(notes),
    )


PROBE_PHASE_S = 0.6
