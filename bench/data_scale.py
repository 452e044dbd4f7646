"""Data preparation at scale: wall time and peak memory of the engine's data step on a 200,000-
conversation ultrachat-shaped set and on a 200 MB JSON file of 418,000 short examples.

    python -m bench.data_scale                      # both cases, as in the issue (minutes)
    python -m bench.data_scale --cases ultrachat --conversations 20000   # a quicker look

Each case runs the engine process `qlc data` starts (`python -m engine data CONFIG`) for the
tiny-demo preset with `data.source=FILE train.seq_len=4096 data.packing=true`, twice: first with
an empty data cache (the first preparation: read, template, tokenize, mask, pack, write), then
again (what a resume, a second run or `qlc train` after `qlc data` does: the cached rows are
reused). Measured, not estimated:

- wall time of the process, and the seconds its prepare() call took (the process also imports
  transformers and loads the tokenizer);
- peak resident memory: the engine process's own (VmHWM, and wait4's ru_maxrss, which also
  covers its tokenizing workers one by one), and the peak of the whole process tree's RSS and PSS
  summed (the workers run beside it), sampled every 0.1 s from /proc;
- the phases and rates from the progress events it streams (examples/s while tokenizing);
- the data report (token-length distribution, rows, packing fill).

Also the time `qlc data` spends validating the source in its own process before it starts the
engine (check_source). The machine (CPU model and flags, cores, load average before and after)
and library versions go into bench/results/data-scale-DATE.json. The generated datasets are kept
in $QLC_CACHE_DIR/bench-data (made once, deterministic; see bench/data_shapes.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"
OVERRIDES = ["train.seq_len=4096", "data.packing=true"]


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
            "",
        )
        flags = next(
            (line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []
        )
        info["cpu"] = model
        info["cpu_flags"] = sorted(
            f for f in set(flags) if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
        )
    except OSError:
        pass
    info["cpus"] = os.cpu_count()
    info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        info["memory_gb"] = round(int(meminfo[0].split()[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    versions = {}
    for name in ("numpy", "pyarrow", "tokenizers", "transformers", "datasets", "jinja2"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    info["versions"] = versions
    git = ["git", "-C", str(REPO)]
    commit = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = bool(
        subprocess.run([*git, "status", "--porcelain", "engine"], capture_output=True, text=True).stdout
    )
    info["code"] = {"commit": commit, "engine_changed_since": dirty}
    return info


def load() -> dict[str, Any]:
    one, five, fifteen = os.getloadavg()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {
        "load_1m": round(one, 2),
        "load_5m": round(five, 2),
        "load_15m": round(fifteen, 2),
        "uptime": uptime,
    }


# -- process-tree memory ---------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    kids = [int(p) for p in text.split()]
    return kids + [g for k in kids for g in _children(k)]


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class TreeMemory(threading.Thread):
    """Samples a process and its descendants every 0.1 s: the sum of their RSS and PSS, and the
    main process's own high-water mark (VmHWM)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_rss_kb = self.peak_pss_kb = self.main_hwm_kb = 0
        self.peak_children_rss_kb = 0
        self.max_processes = 1
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            kids = _children(self.pid)
            pids = [self.pid, *kids]
            self.max_processes = max(self.max_processes, len(pids))
            self.peak_rss_kb = max(self.peak_rss_kb, sum(_status_kb(p, "VmRSS") for p in pids))
            self.peak_pss_kb = max(self.peak_pss_kb, sum(_pss_kb(p) for p in pids))
            self.peak_children_rss_kb = max(
                self.peak_children_rss_kb, max((_status_kb(k, "VmRSS") for k in kids), default=0)
            )
            self.main_hwm_kb = max(self.main_hwm_kb, _status_kb(self.pid, "VmHWM"))
            self._halt.wait(0.1)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# -- one engine run ----------------------------------------------------------------------------------


def engine_run(config: Path, env: dict[str, str]) -> dict[str, Any]:
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "data", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    memory = TreeMemory(proc.pid)
    memory.start()
    stderr: list[bytes] = []
    drain = threading.Thread(target=lambda: stderr.extend(proc.stderr or []), daemon=True)
    drain.start()
    lines = [json.loads(line) for line in proc.stdout or [] if line.startswith(b"{")]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    memory.stop()
    drain.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = b"".join(stderr).decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"engine data failed ({proc.returncode}):\n{err[-3000:]}")
    events = [e for e in lines if e.get("type") == "stage"]
    report = next(e for e in reversed(lines) if "type" not in e)
    prepared = next((line for line in err.splitlines() if line.startswith("data: ")), "")
    seconds = float(prepared.split(" in ", 1)[1].split(" s", 1)[0]) if " in " in prepared else None
    return {
        "wall_s": round(wall, 1),
        "prepare_s": seconds,
        "from_cache": "reused from the cache" in prepared,
        "engine_peak_rss_gb": round(max(memory.main_hwm_kb, 0) / 2**20, 3),
        "wait4_maxrss_gb": round(usage.ru_maxrss / 2**20, 3),
        "workers_peak_rss_gb": round(memory.peak_children_rss_kb / 2**20, 3),
        "tree_peak_rss_sum_gb": round(memory.peak_rss_kb / 2**20, 3),
        "tree_peak_pss_sum_gb": round(memory.peak_pss_kb / 2**20, 3),
        "processes": memory.max_processes,
        "cpu_user_s": round(usage.ru_utime, 1),
        "cpu_system_s": round(usage.ru_stime, 1),
        "phases": phases(events),
        "report": report,
    }


def phases(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each phase (a progress message) with its duration, count and mean rate."""
    out: list[dict[str, Any]] = []
    for e in events:
        if out and out[-1]["message"] == e["message"]:
            last = out[-1]
            last["end"] = e["time"]
            last["current"], last["total"], last["unit"] = e["current"], e["total"], e["unit"]
        else:
            out.append({"message": e["message"], "start": e["time"], "end": e["time"], "current": e["current"],
                        "total": e["total"], "unit": e["unit"]})  # fmt: skip
    t0 = events[0]["time"] if events else 0
    for p in out:
        p["at_s"] = round(p.pop("start") - t0, 2)
        p["seconds"] = round(p.pop("end") - t0 - p["at_s"], 2)
        if p["seconds"] > 0 and p["current"]:
            p["per_second"] = round(p["current"] / p["seconds"], 1)
    return out


def check_seconds(cfg: Any) -> float:
    """What `qlc data` does in its own process before starting the engine: read and validate
    every row (pure Python)."""
    from engine.data import check_source

    started = time.monotonic()
    check_source(cfg)
    return round(time.monotonic() - started, 1)


# -- the cases ---------------------------------------------------------------------------------------


def dataset(kind: str, n: int, folder: Path) -> Path:
    from bench import data_shapes

    folder.mkdir(parents=True, exist_ok=True)
    if kind == "ultrachat":
        path = folder / f"ultrachat-{n}.jsonl"
        if not path.exists():
            print(f"generating {path} ...", file=sys.stderr, flush=True)
            data_shapes.ultrachat(path, n)
    else:
        path = folder / f"short-{n}.json"
        if not path.exists():
            print(f"generating {path} ...", file=sys.stderr, flush=True)
            data_shapes.short_json(path, n)
    return path


def run_case(name: str, source: Path, keep_cache: bool) -> dict[str, Any]:
    from engine.config import load_preset

    cfg = load_preset("tiny-demo", [f"data.source={source}", *OVERRIDES])
    work = Path(tempfile.mkdtemp(prefix="qlc-bench-data-"))
    config = work / "config.yaml"
    config.write_text(cfg.to_yaml(), encoding="utf-8")
    env = {**os.environ, "QLC_DATA_CACHE": str(work / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    result: dict[str, Any] = {
        "command": f"qlc data tiny-demo --set data.source={source} "
        + " ".join(f"--set {o}" for o in OVERRIDES),
        "source_bytes": source.stat().st_size,
    }
    try:
        result["load_before"] = load()
        print(f"{name}: first preparation ...", file=sys.stderr, flush=True)
        result["first"] = engine_run(config, env)
        result["load_between"] = load()
        print(f"{name}: again, from the cache ...", file=sys.stderr, flush=True)
        result["again"] = engine_run(config, env)
        result["load_after"] = load()
        print(f"{name}: qlc's own check of the source ...", file=sys.stderr, flush=True)
        result["qlc_check_s"] = check_seconds(cfg)
        cache_bytes = sum(p.stat().st_size for p in (work / "cache").rglob("*") if p.is_file())
        result["cache_entry_gb"] = round(cache_bytes / 2**30, 3)
    finally:
        if not keep_cache:
            shutil.rmtree(work, ignore_errors=True)
    report = result["first"]["report"]
    result["token_lengths"] = {
        "p50": report["length_p50"],
        "p95": report["length_p95"],
        "max": report["length_max"],
        "histogram": report["histogram"],
        "note": "tokens per example after templating, before truncation (the tiny demo tokenizer)",
    }
    tokenizing = next((p for p in result["first"]["phases"] if p["message"].startswith("tokenizing")), None)
    if tokenizing and tokenizing["seconds"]:
        tokens = report["tokens_per_epoch"] + report["truncated_tokens"]
        result["tokenizing_examples_per_s"] = tokenizing.get("per_second")
        result["tokenizing_train_tokens_per_s"] = round(tokens / tokenizing["seconds"])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", default=["ultrachat", "short"], choices=["ultrachat", "short"])
    parser.add_argument("--conversations", type=int, default=200_000)
    parser.add_argument("--short", type=int, default=418_000)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument(
        "--keep-cache", action="store_true", help="leave the prepared rows in the temp folder"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from engine.paths import cache_root

    folder = args.data_dir or cache_root() / "bench-data"
    result: dict[str, Any] = {
        "benchmark": "data preparation at scale (engine data step)",
        "machine": machine(),
        "targets": {"first_preparation_s": 180, "first_preparation_peak_rss_gb": 3.0, "again_s": 15},
        "cases": {},
    }
    for case in args.cases:
        n = args.conversations if case == "ultrachat" else args.short
        source = dataset(case, n, folder)
        result["cases"][f"{case}-{n}"] = run_case(case, source, args.keep_cache)
    result["rusage_self_maxrss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"data-scale-{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    summary = {
        name: {
            "first_wall_s": c["first"]["wall_s"],
            "first_prepare_s": c["first"]["prepare_s"],
            "first_engine_peak_rss_gb": c["first"]["engine_peak_rss_gb"],
            "first_tree_peak_pss_gb": c["first"]["tree_peak_pss_sum_gb"],
            "again_wall_s": c["again"]["wall_s"],
            "again_prepare_s": c["again"]["prepare_s"],
            "tokenizing_examples_per_s": c.get("tokenizing_examples_per_s"),
            "load": [c["load_before"]["load_1m"], c["load_after"]["load_1m"]],
        }
        for name, c in result["cases"].items()
    }
    print(json.dumps({"results": str(out), "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
