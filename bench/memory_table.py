"""Print the estimate-versus-measured table (markdown) that README.md and docs/memory-model.md quote.

    python bench/memory_table.py

Every records file in bench/results replayed through engine.memory (the same replay as
tests/engine/test_memory_calibration.py): peak reserved GiB where it was measured cleanly, else
peak allocated; an out-of-memory row shows the estimate's device total and verdict.
"""

from __future__ import annotations

from pathlib import Path

from engine.memory.calibration import load_calibration, records_files, replay

RESULTS = Path(__file__).resolve().parent / "results"


def rows() -> list[str]:
    out = [
        "| config | source | measured allocated / reserved | estimated allocated / reserved | error |",
        "|---|---|---|---|---|",
    ]
    for path in records_files(RESULTS):
        for r in replay(load_calibration(path)):
            rec, est = r.record, r.estimate
            source = "anchors" if path.name.startswith("anchors") else "engine"
            if rec.note.startswith("bare"):
                source = "bare"  # a bare library script measured beside the engine
            if r.compared == "oom":
                out.append(
                    f"| {rec.describe()} | {source} | out of memory | device {est.device_total_gb:.1f}: "
                    f"{'fits (wrong)' if r.estimated_fits else 'does not fit'} | - |"
                )
                continue
            res = f"{rec.peak_reserved_gib:.2f}" if rec.peak_reserved_gib and rec.reserved_clean else "-"
            out.append(
                f"| {rec.describe()} | {source} | {rec.peak_allocated_gib or 0:.2f} / {res} | "
                f"{est.torch_allocated_gb:.2f} / {est.torch_peak_gb:.2f} | {r.error or 0:+.1%} {r.compared} |"
            )
    return out


if __name__ == "__main__":
    print("\n".join(rows()))
