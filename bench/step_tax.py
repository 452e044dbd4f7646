"""What the engine adds to each training step, measured in one process on one model.

    python -m bench.step_tax --out bench/results/step-tax-<machine>-<date>.json \\
        [--preset tiny-demo] [--set KEY=VALUE ...] [--steps 20] [--rounds 2]
    python -m bench.step_tax --out ... --arch llama-3.2-1b --seq 2048 --micro-batch 4   (a GPU)

With --arch, a random-weight model of that architecture is built in a child process (which
exits before anything is measured) under --work, with rows of exactly --seq random tokens
(bench/gpu_common.py), on the llama-3.1-8b-rtx4090 preset's recipe; delete --work afterwards.

The engine's Recipe loads the model and data exactly as a run does (a scratch run folder), then
the same model trains in alternating rounds (bare, engine, bare, engine, ...) of `--steps`
optimizer steps each:
- bare: TRL's SFTTrainer with the engine's data, collator and arguments, but without what the
  engine adds: no SafeTrainerMixin (token count, non-finite guard, fault hooks, atomic saves),
  no engine callbacks (events, commands, watchdog clock), and transformers' defaults for the two
  arguments the engine changes (logging_nan_inf_filter, include_num_input_tokens_seen);
- engine: the trainer the run builds (EngineTrainer and its callbacks, events written to the
  scratch folder).

Each step's time is the wall time between two optimizer-step ends (logging every step, as the
presets do, so both variants synchronise with the device once per step when the loss is logged);
the figure is the median over steps 3..N of every round of a variant. Rounds alternate which
variant trains first. `--profile` adds one round of each under cProfile and prints the functions
whose host time per step differs most between them. Every engine hook is also
timed on its own, which gives the engine's host time per step without the noise of the whole
step. On CUDA, `torch.cuda.set_sync_debug_mode("warn")` counts the device synchronisations each
variant makes per step. `--kernels` adds a round of the engine under torch.profiler and reports
its device time per step by kind of kernel (bench/kernel_profile.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class HookTimes:
    """Wall time spent inside the engine's own hooks, per name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.active = False

    def wrap(self, owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return inner(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1

        setattr(owner, name, timed)


def step_timer() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        """The wall time between optimizer-step ends, and the device syncs in between."""

        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.ends = [time.perf_counter()]

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.ends.append(time.perf_counter())

        def step_seconds(self) -> list[float]:
            return [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]

    return StepTimer()


def bare_trainer(engine_trainer: Any, steps: int, out_dir: Path) -> Any:
    """TRL's SFTTrainer on the engine's model, data and collator, without the engine's additions."""
    from trl import SFTTrainer

    args = dataclasses.replace(
        engine_trainer.args,
        output_dir=str(out_dir),
        max_steps=steps,
        logging_nan_inf_filter=True,  # transformers' default
        include_num_input_tokens_seen="no",  # transformers' default
    )
    return SFTTrainer(
        model=engine_trainer.model,
        args=args,
        train_dataset=engine_trainer.train_dataset,
        data_collator=engine_trainer.data_collator,
        processing_class=engine_trainer.processing_class,
    )


def instrument(trainer: Any, times: HookTimes) -> None:
    """Time each of the engine's per-step additions on this trainer and its callbacks."""
    from engine.train.backends.safe_trainer import SafeTrainerMixin

    for name in ("_track_nonfinite", "_track_num_input_tokens", "_fold_tokens"):
        times.wrap(trainer, name, f"trainer.{name}")
    times.wrap(trainer.faults, "before_step", "trainer.faults.before_step")
    assert isinstance(trainer, SafeTrainerMixin)
    for cb in trainer.callback_handler.callbacks:
        kind = type(cb).__name__
        if kind in ("EngineCallback", "StepClock"):
            for hook in ("on_step_end", "on_log"):
                if hook in type(cb).__dict__:
                    times.wrap(cb, hook, f"{kind}.{hook}")


def run_round(trainer: Any, timer: Any, cuda: bool) -> tuple[list[float], Counter[str]]:
    """Train; (step seconds, the device syncs counted by where they were made: the innermost
    Python line of each, which for a call into torch's C++ such as `.item()` is its caller)."""
    syncs: Counter[str] = Counter()
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
    # The Trainer prints each step's logs (PrinterCallback; a run's go to engine.log): both
    # variants print, to a null file here.
    with warnings.catch_warnings(record=True) as caught, open(os.devnull, "w") as null:
        warnings.simplefilter("always")
        with contextlib.redirect_stdout(null):
            trainer.train()
    if cuda:
        import torch

        torch.cuda.set_sync_debug_mode("default")
        syncs.update(sync_origin(w.filename, w.lineno) for w in caught if "synchroniz" in str(w.message))
    return timer.step_seconds(), syncs


def sync_origin(filename: str, lineno: int) -> str:
    """`package/module.py:LINE  source`, the path cut below site-packages (or the repository)."""
    import linecache

    short = filename.split("site-packages/")[-1].split("site2/")[-1].removeprefix(str(ROOT) + "/")
    return f"{short}:{lineno}  {linecache.getline(filename, lineno).strip()[:90]}"


def top_origins(counts: Counter[str], steps: int, top: int = 15) -> list[dict[str, Any]]:
    return [{"where": where, "per_step": n / max(steps, 1)} for where, n in counts.most_common(top)]


def profile_round(trainer: Any, timer: Any, cuda: bool, top: int) -> dict[str, Any]:
    """One round with cProfile on from the end of step 2 to the end of the last step (what the
    step timer counts: not the start of training, nor the save and clean-up after the last step):
    the `top` functions by their own time per step (microseconds), with their calls per step."""
    import cProfile
    import pstats

    from transformers import TrainerCallback

    prof = cProfile.Profile()

    class Window(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 2:
                prof.enable()
            elif state.global_step == state.max_steps:
                prof.disable()

    window = Window()
    trainer.add_callback(window)
    try:
        seconds, _ = run_round(trainer, timer, cuda)
    finally:
        prof.disable()
        trainer.remove_callback(window)
    steps = max(len(seconds) - 2, 1)
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return {
        "median_step_s": statistics.median(seconds[2:] or seconds),
        "functions": [
            {
                "function": f"{Path(file).name}:{line}:{func}",
                "own_us_per_step": 1e6 * tt / steps,
                "cumulative_us_per_step": 1e6 * ct / steps,
                "calls_per_step": nc / steps,
            }
            for (file, line, func), (_cc, nc, tt, ct, _callers) in rows
        ],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="tiny-demo")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--arch", help="build a random-weight model of this catalog architecture (a GPU run)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qlc-step-tax"))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="a round more of each variant under cProfile")
    ap.add_argument("--profile-top", type=int, default=40, help="functions kept per profile")
    ap.add_argument(
        "--kernels",
        action="store_true",
        help="a round more of the engine under torch.profiler: its device time per step by kind of kernel",
    )
    ap.add_argument(
        "--kernel-origins",
        action="store_true",
        help="with --kernels: record shapes and stacks too, and report where the copies, matmuls "
        "and elementwise kernels came from (the profiled round runs slower)",
    )
    ap.add_argument(
        "--one-row",
        action="store_true",
        help="micro-batches as one padding-free row even where the engine sends rows of one length as "
        "they are (its even rows, engine.train.backends.unsloth.even_rows): the form before them",
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="with --arch: a shrunk model of its layout, on the CPU"
    )
    args = ap.parse_args()
    if args.kernels and args.steps < 3:
        ap.error("--kernels profiles steps 3..N: give --steps 3 or more")
    if args.arch:
        from bench.gpu_common import build_model_in_child, token_run_overrides, write_tokens

        model, data = args.work / args.arch, args.work / f"tokens-{args.seq}.jsonl"
        if not (model / "config.json").is_file():
            build_model_in_child(args.arch, model, dry_run=args.dry_run)
        rows = (args.steps + 2) * args.micro_batch * args.grad_accum * args.rounds
        write_tokens(data, rows, args.seq, vocab=1024 if args.dry_run else 128000)
        args.overrides = [
            *token_run_overrides(model, data, args.seq, args.micro_batch, args.grad_accum, args.steps),
            f"model.arch={args.arch}",
            *args.overrides,
        ]
        if args.preset == "tiny-demo":
            args.preset = "llama-3.1-8b-rtx4090"

    import torch
    import transformers
    import trl

    from engine.config import load_preset
    from engine.run import runs
    from engine.run.control import CommandQueue
    from engine.run.events import Emitter, FileSink
    from engine.train.recipe import Recipe

    overrides = [
        *args.overrides,
        f"train.max_steps={args.steps}",
        "train.logging_steps=1",
        "train.eval_steps=0",
        "data.val_fraction=0",
        f"train.save_steps={10 * args.steps}",
    ]
    cfg = load_preset(args.preset, overrides)
    work = Path(tempfile.mkdtemp(prefix="qlc-step-tax-"))
    run_dir = work / "run"
    run_dir.mkdir(mode=0o700)
    (run_dir / runs.CONFIG).write_text(cfg.to_yaml(), encoding="utf-8")
    emitter = Emitter([FileSink(run_dir / runs.EVENTS)])
    recipe = Recipe(run_dir, emitter, CommandQueue(emitter))
    recipe.hello()
    recipe.setup()
    engine = recipe.trainer
    if args.one_row:
        engine.data_collator.even_rows = False  # bare trains with the same collator
    rows = "even" if getattr(engine.data_collator, "even_rows", False) else "one row"
    cuda = recipe.device == "cuda"

    times = HookTimes()
    instrument(engine, times)
    engine_timer, bare_timer = step_timer(), step_timer()
    engine.add_callback(engine_timer)
    bare = bare_trainer(engine, args.steps, work / "bare")
    bare.add_callback(bare_timer)

    results: dict[str, dict[str, list]] = {
        "bare": {"step_seconds": [], "syncs": []},
        "engine": {"step_seconds": [], "syncs": []},
    }
    sync_counts: dict[str, Counter[str]] = {"bare": Counter(), "engine": Counter()}
    steps_run = {"bare": 0, "engine": 0}
    variants = [("bare", bare, bare_timer), ("engine", engine, engine_timer)]
    for n in range(args.rounds):
        # Each round alternates which variant goes first, so neither always trains on what the
        # other left (the allocator's cache, the optimizer state it freed, the clocks).
        for name, trainer, timer in variants if n % 2 == 0 else variants[::-1]:
            times.active = name == "engine"
            seconds, origins = run_round(trainer, timer, cuda)
            sync_counts[name] += origins
            syncs = sum(origins.values())
            steps_run[name] += len(seconds)
            times.active = False
            kept = seconds[2:]  # the first steps warm up (allocator, kernels)
            results[name]["step_seconds"] += kept
            results[name]["syncs"].append(syncs / max(len(seconds), 1))
            print(
                f"round {n + 1} {name}: median {statistics.median(kept) * 1e3:.1f} ms/step over {len(kept)} steps"
                + (f", {syncs / max(len(seconds), 1):.1f} device syncs/step" if cuda else ""),
                flush=True,
            )
    profiles = {}
    if args.profile:
        # A round more of each under cProfile: where the host's time per step goes, function by
        # function, so a difference between the two shows up by name (cProfile slows both alike).
        for name, trainer, timer in variants:
            profiles[name] = profile_round(trainer, timer, cuda, args.profile_top)
    kernels = None
    if args.kernels:
        # After the timed rounds, so the profiler's own cost is in no step they count.
        from bench.kernel_profile import profile_kernels

        kernels = profile_kernels(
            engine, lambda t: run_round(t, engine_timer, cuda), cuda, trace_origins=args.kernel_origins
        )
        # The profiler slows the host: the step as the timed rounds measured it, beside its own.
        kernels["timed_step_s"] = statistics.median(results["engine"]["step_seconds"])
    hook_seconds = sum(times.seconds.values())
    bare_median = statistics.median(results["bare"]["step_seconds"])
    engine_median = statistics.median(results["engine"]["step_seconds"])
    per_hook = {
        k: {"us_per_step": 1e6 * v / max(steps_run["engine"], 1), "calls": times.calls[k]}
        for k, v in sorted(times.seconds.items(), key=lambda kv: -kv[1])
    }
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "bench": "bench/step_tax.py",
        "command": " ".join(["python -m bench.step_tax", *sys.argv[1:]]),
        # Unsloth's switches change the step (UNSLOTH_SDPA_CUDNN_BUCKET, for one): what was set.
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("UNSLOTH_")},
        "rows": rows,  # how a micro-batch reached the model: one padding-free row, or even rows
        "machine": {
            "device": recipe.device,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            **({"unsloth": sys.modules["unsloth"].__version__} if "unsloth" in sys.modules else {}),
        },
        "preset": args.preset,
        "overrides": overrides,
        "compute_dtype": recipe.cfg.quant.compute_dtype,
        "backend": recipe.backend_name,
        "patched": recipe.kernels,  # what the backend patched in, the lean LoRA Functions among them
        # As the run laid the step out (batch_split and checkpointing auto may change what the
        # overrides wrote): steps of two stacks compare per token only at the same layout.
        "layout": {
            "micro_batch": engine.args.per_device_train_batch_size,
            "grad_accum": engine.args.gradient_accumulation_steps,
            "checkpointed_layers": getattr(getattr(recipe, "checkpointing", None), "checkpointed", None),
        },
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "bare_median_step_s": bare_median,
        "engine_median_step_s": engine_median,
        "engine_speed_vs_bare": bare_median / engine_median,
        "engine_hooks_us_per_step": 1e6 * hook_seconds / max(steps_run["engine"], 1),
        "engine_hooks_share_of_step": hook_seconds / max(steps_run["engine"], 1) / engine_median,
        "hooks": per_hook,
        "syncs_per_step": {k: v["syncs"] for k, v in results.items()} if cuda else None,
        # Each sync drains the device's queue, which then idles until the host launches again.
        "sync_origins": {k: top_origins(c, steps_run[k]) for k, c in sync_counts.items()} if cuda else None,
        "order": "bare first in odd rounds, engine first in even ones",
        **({"profiles": profiles} if profiles else {}),
        **({"kernels": kernels} if kernels else {}),
        "step_seconds": {k: v["step_seconds"] for k, v in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(
        f"bare {bare_median * 1e3:.1f} ms/step, engine {engine_median * 1e3:.1f} ms/step "
        f"({bare_median / engine_median:.3f}x bare); engine hooks {report['engine_hooks_us_per_step']:.0f} us/step "
        f"({100 * report['engine_hooks_share_of_step']:.2f}% of a step) -> {args.out}"
    )
    for where in (report["sync_origins"] or {}).get("engine", [])[:10]:
        print(f"  engine sync {where['per_step']:5.1f}/step  {where['where']}")
    if profiles:
        print_profile_difference(profiles)
    if kernels:
        from bench.kernel_profile import print_summary

        print_summary(kernels)
    return 0


def print_profile_difference(profiles: dict[str, dict[str, Any]]) -> None:
    """The functions whose own time per step differs most between the two profiled rounds."""
    own = {
        name: {f["function"]: (f["own_us_per_step"], f["calls_per_step"]) for f in p["functions"]}
        for name, p in profiles.items()
    }
    names = set(own["bare"]) | set(own["engine"])
    diff = sorted(names, key=lambda f: -abs(own["engine"].get(f, (0, 0))[0] - own["bare"].get(f, (0, 0))[0]))
    print(
        f"profiled: bare {profiles['bare']['median_step_s'] * 1e3:.1f} ms/step, "
        f"engine {profiles['engine']['median_step_s'] * 1e3:.1f}; own time per step, engine - bare:"
    )
    for f in diff[:15]:
        e, b = own["engine"].get(f, (0.0, 0.0)), own["bare"].get(f, (0.0, 0.0))
        print(
            f"  {e[0] - b[0]:+9.0f} us  ({b[0]:8.0f} -> {e[0]:8.0f}; calls {b[1]:6.1f} -> {e[1]:6.1f})  {f}"
        )


if __name__ == "__main__":
    sys.exit(main())
