"""`qlc estimate PRESET|MODEL` and `qlc fit PRESET|MODEL`: the memory budget, without torch.

With --gpus N (or hardware.gpus in the preset) `estimate` shows what each GPU holds under the
strategy (ddp or fsdp); `fit` also says how many GPUs of the kind the run needs.

Exit codes: 0 it fits (or is tight), 1 it does not fit (fit: nothing fits), 2 bad input.
Sizes are GiB (2**30 bytes), labelled GiB.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from engine import memory
from engine.config import (
    RunConfig,
    apply_overrides,
    config_from_dict,
    is_preset,
    list_presets,
    load_preset,
    origin,
)
from engine.errors import ConfigError, UserError
from engine.memory import DOES_NOT_FIT, FITS, TIGHT, Estimate, by_hub_id, catalog, per_gpu
from engine.models import is_builtin
from engine.run import distributed
from tui.budget import split_plan
from tui.output import out, print_json

BACKENDS = ["auto", "hf", "unsloth", "hf-upcast"]
STYLE = {FITS: "bold green", TIGHT: "bold yellow", DOES_NOT_FIT: "bold red"}
WORD = {FITS: "FITS", TIGHT: "TIGHT", DOES_NOT_FIT: "DOES NOT FIT"}


def register(sub: argparse._SubParsersAction) -> None:
    for name, helptext, func in (
        (
            "estimate",
            "will it fit? the memory budget term by term, with the verdict and advice",
            run_estimate,
        ),
        ("fit", "the largest micro-batch and longest sequence that fit a GPU", run_fit),
    ):
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument(
            "target", metavar="PRESET|MODEL", help="a preset, or a model: catalog name, hub id, local folder"
        )
        p.add_argument(
            "--gpu", help="catalog name (rtx4090), size (24GB) or auto; default: the preset's hardware.gpu"
        )
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--backend", choices=BACKENDS, help="default: the preset's hardware.backend")
        p.add_argument(
            "--gpus",
            metavar="N",
            help="GPUs the run trains on: N or auto (this machine's); default: the preset's hardware.gpus",
        )
        p.add_argument(
            "--strategy", choices=per_gpu.STRATEGIES, help="default: the preset's hardware.strategy"
        )
        p.add_argument("--json", action="store_true", help="print JSON instead of tables")
        p.set_defaults(func=func)


# ---------------------------------------------------------------------------------------------
# Target: a preset, or a model with the default training config
# ---------------------------------------------------------------------------------------------


def _is_model(target: str) -> bool:
    return (
        is_builtin(target)
        or Path(target).expanduser().exists()
        or target in catalog()
        or by_hub_id(target) is not None
        or "/" in target
    )


def load_target(target: str, overrides: list[str]) -> RunConfig:
    """A preset with its overrides, or a model trained with RunConfig's defaults plus overrides."""
    if is_preset(target):
        return load_preset(target, overrides)
    if not _is_model(target):
        import difflib

        names = [p.stem for p in list_presets()] + sorted(catalog())
        close = difflib.get_close_matches(target, names, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(
            f"unknown preset or model {target!r}",
            f"{hint}`qlc presets` lists presets; models: {', '.join(sorted(catalog()))}, a hub id or a folder",
        )
    model: dict[str, Any] = {"name_or_path": target}
    if target in catalog():
        model["arch"] = target
    # data.source is required by validation and irrelevant to memory; the rest are RunConfig's defaults.
    data, problems = apply_overrides({"model": model, "data": {"source": "(estimate only)"}}, overrides)
    source = f"model {target}"
    try:
        cfg = config_from_dict(data, source)
    except ConfigError as exc:  # every problem at once, the overrides' first (as load_preset does)
        raise ConfigError(problems + exc.problems, source) from None
    if problems:
        raise ConfigError(problems, source)
    if not any(o.split("=", 1)[0].strip() in ("lora.target_modules", "target_modules") for o in overrides):
        # "All linears" means the model's own names: Phi fuses q/k/v into qkv_proj.
        cfg.lora.target_modules = list(memory.resolve_architecture(cfg).linear_modules())
    return cfg


def _gpu(args: argparse.Namespace, cfg: RunConfig) -> memory.Gpu:
    """--gpu, else hardware.gpu; an unknown card's line says which of them named it."""
    spec = args.gpu or cfg.hardware.gpu or "auto"
    if spec.strip().lower() == "auto":  # auto's errors already say --gpu auto
        return memory.resolve_gpu(spec)
    try:
        return memory.resolve_gpu(spec)
    except UserError as exc:
        where = "--gpu" if args.gpu else origin(args.target, args.overrides, "hardware.gpu")
        raise UserError(f"{where}: {exc.message}", exc.hint) from None


def _gpus(args: argparse.Namespace, cfg: RunConfig) -> int:
    """--gpus, else hardware.gpus; auto counts this machine's GPUs (one when it has none)."""
    want = str(args.gpus if args.gpus is not None else cfg.hardware.gpus).strip().lower()
    if want == "auto":
        return max(distributed.visible_gpus(), 1)
    try:
        n = int(want)
    except ValueError:
        raise UserError(f"--gpus {want!r}: expected a number or auto") from None
    if n < 1:
        raise UserError(f"--gpus: must be at least 1, got {n}")
    return n


# ---------------------------------------------------------------------------------------------
# estimate
# ---------------------------------------------------------------------------------------------


def run_estimate(args: argparse.Namespace) -> int:
    cfg = load_target(args.target, args.overrides)
    gpu = _gpu(args, cfg)
    gpus = _gpus(args, cfg)
    if gpus > 1:
        return _estimate_per_gpu(args, cfg, gpu, gpus)
    est = memory.estimate(cfg, backend=args.backend, gpu=gpu)
    verdict = est.verdict(gpu)
    advice = memory.advise(cfg, gpu, est.arch, args.backend) if verdict.status != FITS else []
    reach = (
        per_gpu.out_of_reach(cfg, gpu, advice, est.arch, args.backend)
        if verdict.status == DOES_NOT_FIT
        else None
    )
    speed = memory.forecast_step(cfg, est, gpu) if verdict.status != DOES_NOT_FIT else None
    if args.json:
        data = est.to_dict(gpu)
        data["config"] = _config_summary(cfg, est)
        data["advice"] = [_advice_dict(a) for a in advice]
        data["out_of_reach"] = reach.to_dict() if reach is not None else None
        data["speed"] = dataclasses.asdict(speed) if speed else None
        print_json(data)
    else:
        _print_estimate(cfg, est, gpu, advice, reach)
        if speed is not None:
            out.print(f"speed: {speed}")
    return 1 if verdict.status == DOES_NOT_FIT else 0


def _estimate_per_gpu(args: argparse.Namespace, cfg: RunConfig, gpu: memory.Gpu, gpus: int) -> int:
    est = per_gpu.per_gpu(cfg, gpus, args.strategy, backend=args.backend, gpu=gpu)
    verdict = est.verdict(gpu)
    needed = per_gpu.gpus_needed(cfg, gpu, est.arch, args.backend) if verdict.status != FITS else None
    if args.json:
        data = est.to_dict(gpu)
        data["config"] = _config_summary(cfg, est)
        if needed is not None:
            data["gpus_needed"] = needed.needed
        print_json(data)
    else:
        out.print(f"[bold]per GPU[/]: {gpus} x {gpu.label}, strategy {est.strategy}")
        _print_estimate(cfg, est, gpu, [])  # type: ignore[arg-type] - the same fields, per GPU
        if needed is not None:
            _print_needed(needed)
    return 1 if verdict.status == DOES_NOT_FIT else 0


def _print_needed(needed: per_gpu.GpusNeeded) -> None:
    out.print()
    out.print(f"[bold]GPUs of this kind needed[/] ({needed.gpu}), at this micro-batch and seq_len:")
    one = needed.estimates.get("ddp") if needed.needed.get("ddp") == 1 else None
    if one is not None:
        # Sharding over more GPUs answers a question nobody asked of a run that fits on one.
        out.print(f"  one GPU, no strategy needed: {one.device_total_gb:.2f} GiB")
        return
    for strategy, n in needed.needed.items():
        e = needed.estimates[strategy]
        if n is None:
            why = (
                "each GPU holds the whole model: more GPUs do not help"
                if strategy == "ddp"
                else f"not with up to {per_gpu.MAX_GPUS}"
            )
            out.print(f"  {strategy}: none ({why})")
        else:
            what = "one GPU, no strategy needed" if n == 1 else f"{n} GPUs"
            assert e is not None
            out.print(f"  {strategy}: {what}, {e.device_total_gb:.2f} GiB each")
    best = needed.best
    if best is not None and best[1] > 1:
        extra = f" --set train.optimizer={per_gpu.FSDP_OPTIMIZER}" if best[0] == "fsdp" else ""
        e = needed.estimates[best[0]]
        # An option, not a fix: sharding splits the weights and their states, while each GPU
        # still holds its activations and the gathered layers whole, which is what makes N large.
        whole = f", {e.device_total_gb - e.sharded_gb:.2f} GiB of each GPU's share not sharded" if e else ""
        out.print(
            f"option: {best[0]} over {best[1]} GPUs of one host{whole}: "
            f"--set hardware.gpus={best[1]} --set hardware.strategy={best[0]}{extra}"
        )


def _config_summary(cfg: RunConfig, est: Any) -> dict[str, Any]:
    """The settings an estimate answered for; `est` is an Estimate or a per-GPU share of one."""
    base = getattr(est, "base", est)
    t, lo = cfg.train, cfg.lora
    return {
        "name": cfg.name,
        "model": cfg.model.name_or_path,
        "seq_len": t.seq_len,
        "micro_batch": base.micro_batch,
        "grad_accum": base.grad_accum,
        "batch_split": t.batch_split,
        "split_reason": getattr(base, "split_reason", ""),
        "gradient_checkpointing": t.gradient_checkpointing,
        "checkpointed_layers": base.checkpointed_layers,
        "layers": base.arch.layers,
        "checkpoint_reason": base.checkpoint_reason,
        "optimizer": t.optimizer,
        "lora_r": lo.r,
        "target_modules": list(lo.target_modules),
        "modules_to_save": list(lo.modules_to_save),
    }


def _advice_dict(a: memory.Advice) -> dict[str, Any]:
    return {
        "text": a.text,
        "overrides": a.overrides,
        "kinds": list(a.kinds),
        "device_total_gb": a.after_gb,
        "saves_gb": a.saves_gb,
        "status": a.status,
        "headroom_gb": a.headroom_gb,
    }


def _headline(cfg: RunConfig, est: Estimate) -> str:
    t, lo = cfg.train, cfg.lora
    mts = f", modules_to_save {'+'.join(lo.modules_to_save)}" if lo.modules_to_save else ""
    base = getattr(est, "base", est)  # a per-GPU share carries the one-GPU estimate it came from
    layers, checkpointed = base.arch.layers, base.checkpointed_layers
    if checkpointed == layers:
        gc = f"gradient checkpointing on all {layers} layers"
    elif checkpointed == 0:
        gc = "no gradient checkpointing"
    else:
        gc = f"gradient checkpointing on {checkpointed} of {layers} layers"
    if t.gradient_checkpointing == "auto":
        gc += f" ({base.checkpoint_reason})"
    split = split_plan(est)
    why = est.backend_reason
    if why.startswith("auto: no CUDA GPU"):
        # Estimated here for a GPU box elsewhere: auto picks there, where Unsloth may run.
        why += "; --backend unsloth estimates that stack"
    return (
        f"[bold]{cfg.name or cfg.model.name_or_path}[/]: {est.arch.name}, backend {est.backend} "
        f"({why})\nseq {t.seq_len} x micro-batch {base.micro_batch}, LoRA r {lo.r} on "
        f"{len(lo.target_modules)} modules{mts}, {t.optimizer}, {gc}"
        + (f"\nbatch split: {split}" if split else "")
    )


def _print_estimate(
    cfg: RunConfig,
    est: Estimate,
    gpu: memory.Gpu,
    advice: list[memory.Advice],
    reach: per_gpu.OutOfReach | None = None,
) -> None:
    out.print(_headline(cfg, est))
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("term")
    table.add_column("GiB", justify="right")
    for term in est.terms:
        table.add_row(Text(term.name, style="bold"), Text(f"{term.gb:.2f}", style="bold"))
        for part, gb in term.parts.items():
            table.add_row(f"  {part}", f"{gb:.2f}")
    out.print(table)
    out.print(
        f"torch peak (max_memory_reserved)   {est.torch_peak_gb:6.2f} GiB   (allocated {est.torch_allocated_gb:.2f})"
    )
    out.print(
        f"device total (nvidia-smi)          {est.device_total_gb:6.2f} GiB  <- the verdict compares this"
    )
    out.print(f"peak during: {est.peak_phase}")
    out.print(f"[dim]device constants: {est.device_profile}[/]")
    v = est.verdict(gpu)
    room = f"{v.headroom_gb:.2f} GiB headroom" if v.headroom_gb >= 0 else f"{-v.headroom_gb:.2f} GiB over"
    out.print(
        Text.assemble(
            (f"{WORD[v.status]}", STYLE[v.status]),
            f" on {gpu}: {v.used_gb:.2f} GiB ± {est.error_band_gb:.2f} of {v.budget_gb:.2f} GiB ({room})",
        )
    )
    out.print(
        f"[dim]± {est.error_band_fraction:.1%}: the 90th percentile of the {est.backend} estimate's "
        "error on architectures it was not fitted to (docs/memory-model.md)[/]"
    )
    for note in est.notes:
        out.print(f"[dim]note: {note}[/]")
    if advice:
        _print_advice(advice, reach)
    elif reach is not None:  # no change to list, but still what would fit
        out.print()
        out.print(Text(str(reach), style=STYLE[DOES_NOT_FIT]))


def _print_advice(advice: list[memory.Advice], reach: per_gpu.OutOfReach | None = None) -> None:
    out.print()
    if reach is None:
        out.print("[bold]What would make it fit[/] (each change re-estimated):")
    else:
        out.print("[bold]What each change saves[/] (each re-estimated; none makes it fit this card):")
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("#", justify="right")
    table.add_column("change")
    table.add_column("GiB", justify="right")
    table.add_column("saves", justify="right")
    table.add_column("then")
    table.add_column("--set")
    for i, a in enumerate(advice, 1):
        table.add_row(
            str(i),
            a.text,
            f"{a.after_gb:.2f}",
            f"{a.saves_gb:.2f}",
            Text(WORD[a.status].lower(), style=STYLE[a.status]),
            " ".join(f"--set {o}" for o in a.overrides),
        )
    out.print(table)
    if reach is not None:
        out.print(Text(str(reach), style=STYLE[DOES_NOT_FIT]))


# ---------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------


def run_fit(args: argparse.Namespace) -> int:
    cfg = load_target(args.target, args.overrides)
    gpu = _gpu(args, cfg)
    result = memory.fit(cfg, gpu, backend=args.backend)
    needed = per_gpu.gpus_needed(cfg, gpu, backend=args.backend)
    reach = None
    if not result.fits:
        # What `qlc estimate` would list; fit sends the user there only where a change fits.
        advice = memory.advise(cfg, gpu, backend=args.backend)
        reach = per_gpu.out_of_reach(cfg, gpu, advice, backend=args.backend, needed=needed)
    if args.json:
        data = _fit_dict(cfg, result)
        data["out_of_reach"] = reach.to_dict() if reach is not None else None
        data["gpus_needed"] = needed.needed
        data["gpus_needed_gb_each"] = {
            s: (e.device_total_gb if e is not None else None) for s, e in needed.estimates.items()
        }
        print_json(data)
    else:
        _print_fit(cfg, result, reach)
        _print_needed(needed)
    return 0 if result.fits else 1


def _fit_dict(cfg: RunConfig, r: memory.FitResult) -> dict[str, Any]:
    data: dict[str, Any] = {
        "gpu": {"name": r.gpu.name, "label": r.gpu.label, "budget_gb": r.gpu.budget_gb},
        "fits": r.fits,
        "micro_batch": r.micro_batch,
        "grad_accum": r.grad_accum,
        "seq_len": r.seq_len,
        "effective_batch": r.effective_batch,
        "target_effective_batch": r.target_effective_batch,
        "max_micro_batch": r.max_micro_batch,
        "micro_batch_limited_by": r.micro_batch_limited_by,
        "max_seq_len": r.max_seq_len,
        "seq_limited_by": r.seq_limited_by,
        "overrides": r.overrides,
        "summary": r.summary,
    }
    if r.estimate is not None:
        data["config"] = _config_summary(cfg, r.estimate)
        data["estimate"] = r.estimate.to_dict(r.gpu)
    return data


def _print_fit(cfg: RunConfig, r: memory.FitResult, reach: per_gpu.OutOfReach | None = None) -> None:
    t = cfg.train
    out.print(f"[bold]{cfg.name or cfg.model.name_or_path}[/] on {r.gpu}")
    if not r.fits:
        out.print(Text(r.summary, style=STYLE[DOES_NOT_FIT]))
        if reach is not None:
            out.print(Text(str(reach), style=STYLE[DOES_NOT_FIT]))
        else:
            out.print("`qlc estimate` says which changes would make it fit.")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("")
    table.add_column("now", justify="right")
    table.add_column("fits", justify="right")
    mb_note = "" if r.micro_batch_limited_by == "memory" else " (search cap)"
    seq_note = " (the model's maximum)" if r.seq_limited_by == "max_positions" else ""
    table.add_row(
        f"largest micro-batch at seq {t.seq_len}", str(t.micro_batch), f"{r.max_micro_batch or '-'}{mb_note}"
    )
    table.add_row("longest seq_len at micro-batch 1", str(t.seq_len), f"{r.max_seq_len}{seq_note}")
    out.print(table)
    out.print(
        f"recommended: micro-batch {r.micro_batch} x grad-accum {r.grad_accum} at seq {r.seq_len} "
        f"(effective batch {r.effective_batch}, preset {r.target_effective_batch})"
    )
    if r.estimate is not None:
        v = r.estimate.verdict(r.gpu)
        out.print(
            Text.assemble(
                (WORD[v.status], STYLE[v.status]),
                f": {v.used_gb:.2f} of {v.budget_gb:.2f} GiB ({v.headroom_gb:.2f} GiB headroom)",
            )
        )
    if r.overrides:
        out.print("--set " + " --set ".join(r.overrides))
    else:
        out.print("the preset's micro-batch, grad-accum and seq_len already fit")
