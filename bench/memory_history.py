"""What is alive at a run's allocation peak, by where it was allocated (PyTorch's memory history).

A calibration record says how high the peak was; when the estimate misses it, this says what the
peak held. bench/calibrate_memory.py turns it on for a configuration when QLC_BENCH_MEMORY_HISTORY
names a folder: the recording starts right before training, and afterwards the trace is replayed to
the moment allocated memory was highest and the blocks alive then are grouped by the Python frames
that allocated them, into FOLDER/<record id>.json (small: the groups, not the trace).

    python bench/memory_history.py FILE.json   # print a summary written on the GPU machine

The replay is pure Python over torch.cuda.memory._snapshot()'s dictionary (tests/bench run it on a
made-up trace); only start() and write() touch torch.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

GIB = 1024**3
MAX_ENTRIES = 1_000_000  # alloc and free events kept; a 3B step at 1,024 tokens makes about 20k
FRAMES_KEPT = 6
# Frames that say nothing about which tensor this is: the allocator's and the recorder's own.
_NOISE = ("torch/cuda/memory.py", "torch/utils/_contextlib.py", "torch/_tensor.py", "<frozen ")
# Where packages were installed (pip's site-packages, the GPU recipe's --target folders) and this
# checkout: cut from a frame's path, so that it reads as the module it is.
_PREFIXES = ("site-packages/", "/tmp/site2/", "/tmp/site/", str(Path(__file__).resolve().parent.parent) + "/")


def start(torch: Any) -> None:
    torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES, context="alloc", stacks="python")


def stop(torch: Any) -> dict[str, Any]:
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    return snapshot


def _frames(event: Mapping[str, Any]) -> list[str]:
    out = []
    for f in event.get("frames") or ():
        name = str(f.get("filename", ""))
        if any(n in name for n in _NOISE):
            continue
        short = name
        for prefix in _PREFIXES:
            short = short.split(prefix)[-1]
        out.append(f"{short}:{f.get('line')} {f.get('name')}")
        if len(out) == FRAMES_KEPT:
            break
    return out


def peak_live(
    trace: Sequence[Mapping[str, Any]], before: int
) -> tuple[int, int, dict[int, Mapping[str, Any]]]:
    """Replay alloc and free events from `before` bytes already allocated: (peak bytes, index of the
    event that reached it, the blocks alive then, by address). Blocks allocated before the recording
    have no alloc event: they count in `before`, and leave it when freed."""
    now = peak = before
    at = -1
    for i, e in enumerate(trace):
        action = e.get("action")
        if action == "alloc":
            now += e["size"]
            if now > peak:
                peak, at = now, i
        elif action == "free_completed":
            now -= e["size"]
    # Replay again to the peak: the live set there (cheaper than copying it at every new high).
    live: dict[int, Mapping[str, Any]] = {}
    for e in trace[: at + 1]:
        if e.get("action") == "alloc":
            live[e["addr"]] = e
        elif e.get("action") == "free_completed":
            live.pop(e["addr"], None)
    return peak, at, live


def groups(blocks: Iterable[Mapping[str, Any]], top: int = 40) -> list[dict[str, Any]]:
    """The blocks grouped by their allocating frames, largest first."""
    by: dict[tuple[str, ...], dict[str, Any]] = {}
    for b in blocks:
        key = tuple(_frames(b))
        g = by.setdefault(key, {"bytes": 0, "blocks": 0, "sizes": {}, "frames": list(key)})
        g["bytes"] += b["size"]
        g["blocks"] += 1
        g["sizes"][b["size"]] = g["sizes"].get(b["size"], 0) + 1
    out = sorted(by.values(), key=lambda g: -g["bytes"])[:top]
    for g in out:
        g["gib"] = round(g.pop("bytes") / GIB, 4)
        g["sizes"] = {str(k): v for k, v in sorted(g["sizes"].items(), key=lambda kv: -kv[0])[:6]}
    return out


def summarize(
    snapshot: Mapping[str, Any], before: int, device: int = 0, torch_peak: int | None = None
) -> dict[str, Any]:
    """`torch_peak`: torch.cuda.max_memory_allocated(), against which the replay is checked (a trace
    of MAX_ENTRIES events has lost its first ones, and its replay is then not the run's)."""
    traces = snapshot.get("device_traces") or [[]]
    trace = traces[device] if device < len(traces) else []
    peak, at, live = peak_live(trace, before)
    return {
        "allocated_before_gib": round(before / GIB, 4),
        "peak_allocated_gib": round(peak / GIB, 4),
        "torch_peak_allocated_gib": None if torch_peak is None else round(torch_peak / GIB, 4),
        "trace_complete": len(trace) < MAX_ENTRIES,
        "events": len(trace),
        "peak_event": at,
        "live_at_peak_gib": round(sum(b["size"] for b in live.values()) / GIB, 4),
        "groups": groups(live.values()),
    }


def write(torch: Any, folder: Path, record_id: str, before: int) -> Path:
    peak = torch.cuda.max_memory_allocated()
    snapshot = stop(torch)
    summary = {"id": record_id, **summarize(snapshot, before, torch.cuda.current_device(), peak)}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (record_id.replace("/", "__") + ".json")
    path.write_text(json.dumps(summary, indent=1))
    return path


def show(path: Path) -> str:
    s = json.loads(path.read_text())
    lines = [
        f"{s['id']}: peak allocated {s['peak_allocated_gib']:.3f} GiB = {s['allocated_before_gib']:.3f} GiB "
        f"before the run + {s['live_at_peak_gib']:.3f} GiB allocated during it ({s['events']} events)"
    ]
    if s.get("trace_complete") is False:
        lines.append(f"  the trace kept its last {s['events']} events only: the replay is not the run's")
    torch_peak = s.get("torch_peak_allocated_gib")
    if torch_peak is not None and abs(torch_peak - s["peak_allocated_gib"]) > 0.001:
        lines.append(f"  PyTorch's own peak was {torch_peak:.3f} GiB: the replay missed part of the run")
    for g in s["groups"]:
        where = " < ".join(g["frames"][:3]) or "(no Python frame: the autograd engine)"
        lines.append(f"  {g['gib']:.4f} GiB in {g['blocks']} blocks  {where}")
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(show(Path(arg)))
