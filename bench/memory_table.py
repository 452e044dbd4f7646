"""Print the memory model against its measurements (markdown), per backend, and how well a refit
generalises.

    python bench/memory_table.py                  # every records file in bench/results
    python bench/memory_table.py FILE [FILE ...]  # these files only (e.g. a new matrix run)
    python bench/memory_table.py --no-fit         # only the estimate-versus-measured tables

1. Per backend, every record: measured torch peak (reserved; allocated where reserved was not
   clean) and the run's own device peak, against the estimate (the replay of
   tests/engine/test_memory_calibration.py); "-" where a figure was not measured cleanly.
2. The constants refitted on all records (engine/memory/fit_constants.py: which constants, and
   why those), with the errors before and after.
3. Leave one architecture out: fit on the others, predict it; the worst error per backend is what
   an unmeasured architecture should expect.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.memory.calibration import load_calibration, records_files, replay

RESULTS = Path(__file__).resolve().parent / "results"


def _pct(x: float | None, places: int = 1) -> str:
    return f"{x:+.{places}%}" if x is not None else "-"


def _gib(x: float | None) -> str:
    return f"{x:.2f}" if x is not None else "-"


def rows(files: list[Path] | None = None) -> list[str]:
    """Every record, estimate against measurement (the table docs/memory-model.md quotes)."""
    out = [
        "| config | source | measured allocated / reserved | estimated allocated / reserved | error |",
        "|---|---|---|---|---|",
    ]
    for path in files or records_files(RESULTS):
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


def backend_tables(files: list[Path]) -> list[str]:
    """Per backend: torch peak and device total, measured against estimated, per record."""
    by_backend: dict[str, list[str]] = {}
    worst: dict[str, tuple[float, float]] = {}
    unsafe: dict[str, int] = {}
    for path in files:
        for r in replay(load_calibration(path)):
            rec = r.record
            if r.compared in ("superseded", "none"):
                continue
            b = rec.backend
            table = by_backend.setdefault(b, [])
            if r.compared == "oom":
                verdict = "fits (wrong)" if r.estimated_fits else "does not fit"
                table.append(
                    f"| {rec.id or rec.describe()} | OOM | {r.estimate.torch_peak_gb:.2f} | - | - | "
                    f"{r.estimate.device_total_gb:.2f} | {verdict} |"
                )
                continue
            label = rec.id or rec.describe()
            table.append(
                f"| {label} | {_gib(r.measured_gib)} {r.compared[:5]} | {_gib(r.estimated_gib)} | {_pct(r.error)} | "
                f"{_gib(r.device_measured_gib)} | {_gib(r.device_estimated_gib)} | {_pct(r.device_error)} |"
            )
            w = worst.get(b, (0.0, 0.0))
            worst[b] = (
                max(w[0], abs(r.error or 0.0)),
                max(w[1], abs(r.device_error or 0.0)),
            )
            # The safety check: an estimate that says "fits" a card the run would overflow.
            if r.device_measured_gib is not None and r.device_estimated_gib is not None:
                for budget in (8, 12, 16, 24, 32, 48, 80):
                    says_fits = r.device_estimated_gib <= budget * 0.94
                    if says_fits and r.device_measured_gib > budget:
                        unsafe[b] = unsafe.get(b, 0) + 1
    out: list[str] = []
    for b, table in sorted(by_backend.items()):
        w = worst.get(b, (0.0, 0.0))
        out += [
            f"### {b}: {len(table)} records; worst |error| torch {w[0]:.1%}, device {w[1]:.1%}; "
            f"'fits' but overflows a card of 8-80 GB: {unsafe.get(b, 0)}",
            "",
            "| record | torch peak measured | estimated | error | device measured | estimated | error |",
            "|---|---|---|---|---|---|---|",
            *table,
            "",
        ]
    return out


def fit_tables(files: list[Path]) -> list[str]:
    from engine.memory import constants as C
    from engine.memory import fit_constants as fc

    samples = fc.samples_from([load_calibration(p) for p in files])
    out: list[str] = []
    backends = sorted({s.backend for s in samples} & {"hf", "unsloth"})
    for b in backends:
        bf = fc.fit_backend(samples, b)
        out.append(f"refit {b} (all records), torch peak: {bf.torch.describe()}")
        if bf.device:
            out.append(f"refit {b} (all records), device total: {bf.device.describe()}")
    out += [
        "",
        "Leave one architecture out (fit on the others, predict it):",
        "",
        "| backend | held-out architecture | records | worst torch error | worst device error | fitted on the others |",
        "|---|---|---|---|---|---|",
    ]
    summary = []
    for b in backends:
        held = fc.leave_one_architecture_out(samples, b)
        for h in held:
            out.append(
                # Held-out errors sit near the 5% bound: two places say which side of it.
                f"| {b} | {h.arch} | {h.records} | {_pct(h.torch_worst, 2)} | {_pct(h.device_worst, 2)} | {h.fitted} |"
            )
        t = max((abs(h.torch_worst) for h in held if h.torch_worst is not None), default=None)
        d = max((abs(h.device_worst) for h in held if h.device_worst is not None), default=None)
        summary.append(
            f"{b}: worst held-out error, torch peak {'-' if t is None else f'{t:.2%}'}, "
            f"device total {'-' if d is None else f'{d:.2%}'} ({len(held)} architectures); "
            f"90th percentile {fc.error_band(held, 'torch'):.1%} / {fc.error_band(held, 'device'):.1%}: "
            f"error band {fc.band_for(held):.1%} (constants.ERROR_BAND[{b!r}] = {C.ERROR_BAND.get(b, 0):.1%})"
        )
    return [*out, "", *summary]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, help="records files (default: bench/results)")
    ap.add_argument("--no-fit", action="store_true", help="skip the refit and leave-one-out tables")
    ap.add_argument("--all-rows", action="store_true", help="the older single table of every record")
    args = ap.parse_args(argv)
    files = args.files or records_files(RESULTS)
    if args.all_rows:
        print("\n".join(rows(files)))
        return 0
    print("\n".join(backend_tables(files)))
    if not args.no_fit:
        print("\n".join(fit_tables(files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
