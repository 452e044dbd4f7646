"""The speed table behind `hardware.backend: auto`: measured steps per stack, the step-cost model
fitted to them (engine/memory/speed.py), how well it predicts configurations it never saw, and
what auto would have picked on each.

    python bench/speed_table.py FILE [FILE ...]            # matrix results of --clean-speed runs
    python bench/speed_table.py FILE --out OUT.json        # and the table as JSON
    python bench/speed_table.py FILE --write               # and the fits, engine/memory/speed_fits.json
    python bench/speed_table.py FILE --against             # auto with the committed fits, on FILE's pairs

FILE is a results file of bench/calibration_matrix.py run with --clean-speed (a record's tokens/s
counts only when nothing else ran on the GPU during its timed steps: `speed_valid`), or of
bench/compare_stacks.py (its engine scenarios, run one at a time). A matrix file measured without
--clean-speed is refused: its speeds carry other processes' contention. All files of one fit come
from one card.

Prints, per configuration both stacks measured: each stack's median step, its held-out
prediction (fitted without that configuration), auto's pick and how much slower that pick was
than the faster stack. Then each stack's leave-one-configuration-out and leave-one-architecture-out
errors. The issue's target: at least 8 paired configurations, and auto within 3% of the faster
stack on every one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import stacks
from engine.errors import UserError
from engine.memory.architectures import catalog
from engine.memory.gpus import peak_tflops, resolve_gpu
from engine.memory.speed import FITS_PATH, SpeedFit, domain_of, fit_for, load_fits, step_work
from engine.memory.speed_fit import (
    Choice,
    Measured,
    choices,
    fit_step,
    leave_one_out,
    typical_ratio_error,
)

MIN_CONFIGURATIONS = 8
TARGET_LOSS = 0.03


def _gpu(report: dict[str, Any], peak: float | None) -> tuple[str, str, float]:
    """(label, class, dense 16-bit peak TFLOP/s) of the GPU a results file was measured on."""
    label = str(report.get("gpu", ""))
    if report.get("dry_run"):
        return label, "cpu", peak or 1.0  # nominal: the costs fitted on a CPU transfer nowhere
    card = resolve_gpu(label)
    tflops = peak or peak_tflops(card)
    if not tflops:
        raise UserError(f"{label}: the GPU catalog states no dense 16-bit peak", "pass --peak-tflops")
    return label, card.device.name, tflops


def _row(
    archs: dict[str, Any],
    arch_name: str,
    backend: str,
    seq: int,
    mb: int,
    ga: int,
    r: int,
    targets: tuple[str, ...] | None,
    gc: int,
    step_s: float,
    tflops: float,
) -> Measured:
    """One measured step as a step-cost row, keyed by what a user writes (the same on either stack)."""
    arch = archs[arch_name]
    if targets is None or list(targets) in (["all-linear"], ["all_linear"]):
        targets = tuple(arch.linear_modules())  # the model's own names (Phi fuses q/k/v)
    work = step_work(
        arch, seq_len=seq, micro_batch=mb, grad_accum=ga, r=r, targets=targets, checkpointed=gc,
        peak_tflops=tflops,
    )  # fmt: skip
    short = "all" if set(targets) >= set(arch.linear_modules()) else "+".join(t[0] for t in targets)
    key = f"{arch_name} r{r}-{short} s{seq}x{mb}x{ga} gc{gc}"
    return Measured(key=key, stack=backend, work=work, step_s=step_s, arch=arch_name)


def measured_rows(path: Path, peak: float | None = None) -> tuple[list[Measured], dict[str, Any]]:
    """The clean, completed steps of one results file, as step-cost rows: a calibration matrix run
    with --clean-speed, or bench/compare_stacks.py's scenarios (one at a time: clean as run)."""
    report = json.loads(path.read_text(encoding="utf-8"))
    stacks_file = "scenarios" in report or "calls" in report
    if not stacks_file and not report.get("clean_speed"):
        raise UserError(
            f"{path}: measured without --clean-speed (its speeds overlap other processes' work)",
            "re-measure with bench/gpu_campaign.sh --clean-speed",
        )
    label, gpu_class, tflops = _gpu(report, peak)
    archs = catalog()
    rows = []
    if stacks_file:
        recipe_of = report.get("recipe", {})
        calls = report.get("calls") or [report]
        for call in calls:
            recipe = call.get("recipe", recipe_of)
            for name, sc in call.get("scenarios", {}).items():
                # Engine scenarios only (a bare script is neither stack as the engine runs it).
                if not name.startswith("engine-") or sc.get("backend") not in ("hf", "unsloth"):
                    continue
                if sc.get("error") or not sc.get("median_step_seconds"):
                    continue
                rows.append(
                    _row(
                        archs, call.get("arch", report["arch"]), sc["backend"], int(recipe["seq_len"]),
                        int(sc.get("micro_batch") or recipe["micro_batch"]),
                        int(sc.get("grad_accum") or recipe["grad_accum"]), int(recipe["lora_r"]), None,
                        int(sc.get("checkpointed_layers") or 0), float(sc["median_step_seconds"]), tflops,
                    )
                )  # fmt: skip
    first_mode = _first_checkpointing_mode(report.get("records", []), archs)
    for rec in report.get("records", []):
        if (
            rec.get("oom")
            or rec.get("error")
            or not rec.get("speed_valid")
            or not rec.get("median_step_seconds")
        ):
            continue
        process = rec.get("process")
        if (
            rec["backend"] == "unsloth"
            and process in first_mode
            and _checkpointing_mode(rec, archs) != first_mode[process]
        ):
            # Unsloth reconfigured in its process (get_peft_model asked again for another
            # checkpointing mode), which no run does. On 2026-12-05 the 1B's row without
            # checkpointing (0.192 s) took longer than its process's first row, fully checkpointed
            # (0.215 s at twice the tokens), with less of every kind of work (docs/backends.md).
            continue
        rows.append(
            _row(
                archs, rec["arch"], rec["backend"], int(rec["seq_len"]), int(rec["micro_batch"]),
                int(rec.get("grad_accum") or 1), int(rec["lora_r"]), tuple(rec["target_modules"]),
                int(rec.get("checkpointed_layers") or 0), float(rec["median_step_seconds"]), tflops,
            )
        )  # fmt: skip
    meta = {
        "file": str(path),
        "gpu": label,
        "gpu_class": gpu_class,
        "peak_tflops": tflops,
        "date": report.get("date"),
        "versions": report.get("versions"),
        "versions_unsloth": report.get("versions_unsloth"),
    }
    return rows, meta


def _checkpointing_mode(rec: dict[str, Any], archs: dict[str, Any]) -> str | None:
    """none, all or partial; None for an architecture the catalog lacks."""
    arch = archs.get(rec.get("arch"))
    if arch is None:
        return None
    layers = int(rec.get("checkpointed_layers") or 0)
    return "none" if layers == 0 else "all" if layers >= arch.layers else "partial"


def _first_checkpointing_mode(records: list[dict[str, Any]], archs: dict[str, Any]) -> dict[Any, str | None]:
    """Each Unsloth process's checkpointing mode at its first configuration measured (its order in
    the process, else its place in the file). Records without a process name are left out: their
    order says nothing, and measured_rows keeps them."""
    first: dict[Any, tuple[int, str | None]] = {}
    for place, rec in enumerate(records):
        process = rec.get("process")
        if rec.get("backend") != "unsloth" or process is None:
            continue
        order = int(rec.get("order_in_process") or place)
        if process not in first or order < first[process][0]:
            first[process] = (order, _checkpointing_mode(rec, archs))
    return {process: mode for process, (_, mode) in first.items()}


def _summary(errors: list[float]) -> dict[str, float]:
    mags = [abs(e) for e in errors]
    return {"worst": max(mags), "median": statistics.median(mags), "n": len(mags)} if mags else {}


def table(rows: list[Measured]) -> tuple[list[str], list[Choice], dict[str, Any]]:
    errors: dict[str, Any] = {}
    for s in _stacks(rows):
        mine = [r for r in rows if r.stack == s]
        errors[s] = {
            "configurations": len({r.key for r in mine}),  # repeats of one configuration count once
            "steps_measured": len(mine),
            "leave_one_configuration_out": _summary([h.error for h in leave_one_out(mine)]),
            "leave_one_architecture_out": _summary([h.error for h in leave_one_out(mine, "arch")]),
        }
    picks = choices(rows)  # auto's own rule, on held-out predictions
    lines = [
        "| configuration | "
        + " | ".join(f"{s} s/step (held-out)" for s in _stacks(rows))
        + " | auto | vs faster |",
        "|---|" + "---|" * (len(_stacks(rows)) + 2),
    ]
    for c in picks:
        cells = []
        for s in _stacks(rows):
            held = f" ({c.predicted_s[s]:.3f})" if s in c.predicted_s else " (too few to fit)"
            cells.append(f"{c.measured_s[s]:.3f}{held}" if s in c.measured_s else "-")
        pick = f"{c.chosen} | {c.loss:+.1%}" if c.chosen and c.loss is not None else "- | -"
        lines.append(f"| {c.key} | " + " | ".join(cells) + f" | {pick} |")
    return lines, picks, errors


def against(rows: list[Measured], fits: tuple[SpeedFit, ...], gpu: str) -> list[dict[str, Any]]:
    """auto on each configuration measured on several stacks, as a run decides it with these fits
    (measured after them, these rows are held out): the faster prediction, acted on only where
    every stack's fit covers the run (else the first stack that can run,
    engine.stacks.choose). A configuration measured more than once counts its median step."""
    out = []
    for key in dict.fromkeys(r.key for r in rows):
        here = {r.stack: r for r in rows if r.key == key}
        steps = {s: statistics.median(r.step_s for r in rows if r.key == key and r.stack == s) for s in here}
        found = {s: fit_for(s, gpu, fits) for s in here}
        if len(here) < 2 or any(f is None for f in found.values()):
            continue
        predicted = {s: f.predict_s(here[s].work) for s, f in found.items() if f is not None}
        outside = {s: f.covers(here[s].work) for s, f in found.items() if f is not None}
        choice = Choice(key, steps, predicted)
        order = [s for s in stacks.AUTO_ORDER if s in here]
        chosen = order[0] if any(outside.values()) else choice.chosen
        assert chosen is not None
        out.append(
            {
                "key": key,
                "measured_s": choice.measured_s,
                "predicted_s": predicted,
                "outside": {s: why for s, why in outside.items() if why},
                "auto": chosen,
                "faster": choice.fastest,
                "loss": choice.measured_s[chosen] / choice.measured_s[choice.fastest] - 1,
            }
        )
    return out


def _stacks(rows: list[Measured]) -> list[str]:
    return sorted({r.stack for r in rows})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="write the table, errors and fits as JSON")
    ap.add_argument(
        "--write", nargs="?", const=FITS_PATH, type=Path, help=f"write the fits (default {FITS_PATH})"
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        help="the GPU's dense 16-bit peak, where the catalog lacks it (a run uses fits only on cards "
        "whose peak the catalog states: add the card to presets/gpus.yaml)",
    )
    ap.add_argument(
        "--min-configurations", type=int, default=MIN_CONFIGURATIONS, help="per stack, to write its fit"
    )
    ap.add_argument("--force", action="store_true", help="write the fits even where auto's target is not met")
    ap.add_argument(
        "--against",
        nargs="?",
        const=FITS_PATH,
        type=Path,
        help=f"no fit: replay auto with these fits (default {FITS_PATH}) on the files' pairs",
    )
    args = ap.parse_args(argv)
    try:
        rows: list[Measured] = []
        metas = []
        for path in args.files:
            r, meta = measured_rows(path, args.peak_tflops)
            rows += r
            metas.append(meta)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cards = {m["gpu"] for m in metas}
    if len(cards) > 1:
        # Fits are per card: an H100's and an H200's costs differ (bandwidth, clocks).
        print(
            f"error: files from several cards ({', '.join(sorted(cards))}): fit one at a time",
            file=sys.stderr,
        )
        return 2
    if not rows:
        print("error: no clean, completed record in these files", file=sys.stderr)
        return 2
    if args.against:
        return _replay(rows, metas, args.against, args.out)
    lines, picks, errors = table(rows)
    print("\n".join(lines))
    print()
    for s, e in errors.items():
        loo, loao = e["leave_one_configuration_out"], e["leave_one_architecture_out"]
        if not loo:
            print(f"{s}: {e['configurations']} configurations, too few to fit without one")
            continue
        by_arch = f"worst {loao['worst']:.1%}" if loao else "one architecture only"
        print(
            f"{s}: {e['configurations']} configurations; held out by configuration: worst "
            f"{loo['worst']:.1%}, median {loo['median']:.1%}; by architecture: {by_arch}"
        )
    misses = [c.ratio_miss for c in picks if c.ratio_miss is not None]
    ratio = _summary(misses) if misses else {}
    if ratio:
        print(
            f"the stacks' predicted ratio, held out by configuration: worst {ratio['worst']:.1%}, "
            f"median {ratio['median']:.1%} (within it, auto's reason calls a pick a near tie: engine.stacks.margin)"
        )
    losses = [c.loss for c in picks if c.loss is not None]
    worst = max(losses, default=None)
    paired = len(picks)
    ok = (
        paired >= args.min_configurations
        and len(losses) == paired
        and worst is not None
        and worst <= TARGET_LOSS
    )
    if not picks:
        print("auto's pick: no configuration was measured on two stacks")
    elif worst is None:
        print(f"auto's pick: {paired} paired configurations, too few to fit a stack without each one")
    else:
        print(
            f"auto's pick: at worst {worst:.1%} slower than the faster stack, over {len(losses)} of {paired} paired "
            f"configurations (target: {args.min_configurations} or more, within {TARGET_LOSS:.0%}): "
            f"{'met' if ok else 'not met'}"
        )
    if metas[0]["gpu_class"] == "cpu":
        print(
            "dry run: shrunk models timed on a CPU against the full architectures' work; no figure here means anything"
        )

    fits = []
    ratio_error = round(typical_ratio_error(picks), 4)  # the card's: the same for each stack's fit
    for s, e in errors.items():
        mine = [r for r in rows if r.stack == s]
        loo = e["leave_one_configuration_out"]
        distinct = len({r.key for r in mine})
        if distinct < args.min_configurations or not loo:
            print(f"{s}: no fit written ({distinct} configurations, {args.min_configurations} needed)")
            continue
        fits.append(
            SpeedFit(
                stack=s,
                gpu=metas[0]["gpu"],
                gpu_class=metas[0]["gpu_class"],
                costs=fit_step(mine),
                configurations=distinct,
                held_out_error=round(loo["worst"], 4),
                typical_error=round(loo["median"], 4),
                source=", ".join(Path(m["file"]).name for m in metas),
                # The newest measurement's day: the fit is as fresh as its latest rows.
                date=max((str(m["date"]) for m in metas if m["date"]), default=str(dt.date.today())),
                domain=domain_of([r.work for r in mine]),
                typical_ratio_error=ratio_error,
            )
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "date": str(dt.date.today()),
                    "bench": "bench/speed_table.py",
                    "sources": metas,
                    "paired": [
                        {"key": c.key, "measured_s": c.measured_s, "held_out_predicted_s": c.predicted_s,
                         "auto": c.chosen, "faster": c.fastest, "loss": c.loss}
                        for c in picks
                    ],
                    "errors": errors,
                    "ratio_held_out": ratio,
                    "fits": [f.to_dict() for f in fits],
                    "target_met": ok,
                },
                indent=1,
            )
            + "\n"
        )  # fmt: skip
    if args.write and fits and not ok and not args.force:
        print("not writing the fits: auto's target is not met on this table (--force writes them anyway)")
    elif args.write and fits:
        if metas[0]["gpu_class"] == "cpu":
            print("not writing fits measured on a CPU (dry run): auto compares stacks on GPUs only")
        else:
            _write_fits(args.write, fits)
            print(f"wrote {len(fits)} fits to {args.write}")
    return 0


def _replay(rows: list[Measured], metas: list[dict[str, Any]], path: Path, out: Path | None) -> int:
    gpu = metas[0]["gpu"]
    replayed = against(rows, load_fits(path), gpu)
    if not replayed:
        print(f"error: {path} has no fit of every stack measured here for {gpu}", file=sys.stderr)
        return 2
    print("| configuration | measured s/step | predicted | auto | faster | vs faster |")
    print("|---|---|---|---|---|---|")
    for r in replayed:
        measured = ", ".join(f"{s} {t:.3f}" for s, t in sorted(r["measured_s"].items()))
        predicted = ", ".join(f"{s} {t:.3f}" for s, t in sorted(r["predicted_s"].items()))
        if r["outside"]:
            predicted += " (outside a fit: the first that can run)"
        print(f"| {r['key']} | {measured} | {predicted} | {r['auto']} | {r['faster']} | {r['loss']:+.1%} |")
    worst = max(r["loss"] for r in replayed)
    ok = worst <= TARGET_LOSS
    print(
        f"auto with {path.name}: at worst {worst:.1%} slower than the faster stack over {len(replayed)} "
        f"pairs (within {TARGET_LOSS:.0%}: {'met' if ok else 'not met'})"
    )
    if out:
        report = {
            "date": str(dt.date.today()),
            "bench": "bench/speed_table.py --against",
            "fits": str(path),
            "sources": metas,
            "replayed": replayed,
            "worst_loss": worst,
            "target_met": ok,
        }
        out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _write_fits(path: Path, fits: list[SpeedFit]) -> None:
    """Replace this card's fits in `path`, keeping other cards'; written whole, then renamed."""
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"fits": []}
    replaced = {(f.stack, f.gpu) for f in fits}
    kept = [f for f in data.get("fits", []) if (f["stack"], f["gpu"]) not in replaced]
    data["fits"] = kept + [f.to_dict() for f in fits]
    tmp = path.with_suffix(".tmp")
    text = json.dumps(data, indent=2) + "\n"
    # A domain point on one line: [share, tokens, micro-batches].
    text = re.sub(r"\[\s+([-\d.e]+),\s+([-\d.e]+),\s+([-\d.e]+)\s+\]", r"[\1, \2, \3]", text)
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
