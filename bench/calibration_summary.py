"""The compact account of a calibration matrix results file (bench/calibration_matrix.py):

    python bench/calibration_matrix.py summary [--brief] FILE

what was measured and how, each record against the memory model's estimate (torch peak and device
total, the replay of engine/memory/calibration.py), the worst misses per backend, the end-to-end
runs beside their in-process twins, failures and what was skipped. `--brief` (what the device call
prints last) leaves out the per-record table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def summary(path: Path, per_record: bool = True) -> str:
    """A compact account of a results file: what was measured and how, each record against the
    memory model's estimate (reserved and device), the worst misses per backend."""
    data = json.loads(path.read_text())
    lines = [
        f"{path.name}: {data.get('gpu')} ({data.get('gpu_total_gib')} GiB), {data.get('date')}, "
        f"{data.get('measured')}/{data.get('planned')} measured in {data.get('elapsed_s')} s, "
        f"device figures by {data.get('device_method')}, {data.get('concurrency')} processes at once",
    ]
    probe = data.get("nvml_probe") or {}
    if probe:
        lines.append(
            f"probe: managed memory in the process figure {probe.get('managed_in_process')}, in the device's "
            f"{probe.get('managed_in_device')}, host eviction frees it {probe.get('evict_frees')}, "
            f"context {probe.get('context_gib')} GiB; {'; '.join(probe.get('notes') or [])}"
        )
    errors: dict[str, tuple[float | None, float | None]] = {}
    if not data.get("dry_run") and data.get("records"):
        try:
            from engine.memory.calibration import load_calibration, replay

            for r in replay(load_calibration(path)):
                errors[r.record.id] = (r.error, r.device_error)
        except Exception as exc:  # the summary must print even when the replay cannot
            lines.append(f"(replay failed: {exc})")
    records = data.get("records", [])

    def pct(x: float | None) -> str:
        return f"{x:+6.1%}" if x is not None else "     -"

    def num(x: Any) -> str:
        return f"{x:6.2f}" if isinstance(x, (int, float)) else "     -"

    by_backend: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_backend.setdefault(r.get("backend", "?"), []).append(r)
    for backend, recs in sorted(by_backend.items()):
        res = [errors.get(r["id"], (None, None))[0] for r in recs]
        dev = [errors.get(r["id"], (None, None))[1] for r in recs]
        res_w = max((x for x in res if x is not None), key=abs, default=None)
        dev_w = max((x for x in dev if x is not None), key=abs, default=None)
        lines.append(
            f"{backend}: {len(recs)} records, {len({r['arch'] for r in recs})} architectures; "
            f"{sum(1 for r in recs if r.get('device_peak_gib') is not None)} device figures; "
            f"{sum(1 for r in recs if r.get('speed_valid'))} clean tokens/s; "
            f"{sum(1 for r in recs if r.get('oom'))} OOM; worst estimate error: reserved {pct(res_w)}, "
            f"device {pct(dev_w)}"
        )
    if not per_record and records:
        ranked = sorted(
            (r for r in records if r["id"] in errors),
            key=lambda r: -max(abs(errors[r["id"]][0] or 0.0), abs(errors[r["id"]][1] or 0.0)),
        )
        if ranked:
            lines.append("largest misses (estimate / measured - 1), reserved and device:")
            for r in ranked[:12]:
                e_res, e_dev = errors[r["id"]]
                lines.append(f"  {r['id'][-56:]:56s} {pct(e_res)} {pct(e_dev)}")
    if per_record and records:
        lines.append(
            f"{'record':46s} {'alloc':>6s} {'resv':>6s} {'err':>6s} {'device':>6s} {'err':>6s} {'tok/s':>7s}"
        )
        for r in records:
            e_res, e_dev = errors.get(r["id"], (None, None))
            tps = r.get("tokens_per_second")
            mark = "" if r.get("speed_valid") else "*"
            lines.append(
                f"{r['id'][-46:]:46s} {num(r.get('peak_allocated_gib'))} {num(r.get('peak_reserved_gib'))} "
                f"{pct(e_res)} {num(r.get('device_peak_gib'))} {pct(e_dev)} "
                f"{(f'{tps:7.0f}' if tps else '      -')}{mark}"
            )
        lines.append("(* tokens/s overlapped by another process's load, build, warm-up or run)")
    if data.get("e2e"):
        lines.append("end to end (qlc train), and the same configuration in-process:")
        for e in data["e2e"]:
            lines.append(
                "  " + ", ".join(f"{k}={round(v, 3) if isinstance(v, float) else v}" for k, v in e.items())
            )
    if data.get("failures"):
        lines.append(f"failures ({len(data['failures'])}):")
        for fail in data["failures"][:10]:
            lines.append(f"  {fail.get('id')}: {str(fail.get('error'))[-240:]!r}")
    skipped = data.get("skipped", [])
    if skipped:
        lines.append(f"skipped {len(skipped)}: " + ", ".join(sorted({s["why"][:40] for s in skipped})))
    return "\n".join(lines)
