"""The training stacks the engine knows, as plain facts, and the one rule that picks one.

A stack (`hardware.backend`) is what builds the model and its kernels: `hf` (transformers + peft +
TRL + bitsandbytes, tuned) or `unsloth`. Everything that decides something about a stack reads it
here: the config's checks (engine.config), the memory model (engine.memory), the backends that
implement them (engine.train.backends) and the console. Adding a stack is one entry in `STACKS`
and one backend file (docs/backends.md).

Pure Python with no engine imports but errors: the bottom layer of the engine.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from engine.errors import UserError

AUTO = "auto"


@dataclass(frozen=True)
class Stack:
    """What the engine, the config's checks and the memory model need to know about one stack."""

    name: str
    label: str  # as a sentence names it: "Unsloth"
    package: str | None  # the import it needs installed (None: the engine's own dependencies)
    needs_cuda: bool
    one_process: bool  # trains on one GPU only (no DDP / FSDP)
    padding_free: bool
    """Micro-batches go to the model as one padding-free row (engine.data.collate): its attention
    keeps the examples apart by the lengths the row carries. hf pads: SDPA would need a
    block-diagonal mask. What the memory estimate assumes; a run asks its backend whether the
    installed version can (Backend.padding_free_rows)."""
    memory_profile: str  # the memory model's calibrated profile its peak follows (engine.memory.terms)
    install_hint: str = ""


STACKS: dict[str, Stack] = {
    "hf": Stack(
        "hf", "transformers", package=None, needs_cuda=False, one_process=False, padding_free=False,
        memory_profile="hf",
    ),
    "unsloth": Stack(
        "unsloth", "Unsloth", package="unsloth", needs_cuda=True, one_process=True, padding_free=True,
        memory_profile="unsloth", install_hint="pip install 'qlora-console[unsloth]'",
    ),
}  # fmt: skip
NAMES: tuple[str, ...] = tuple(STACKS)
# `auto` takes the first of these that can run here; the last one runs anywhere.
AUTO_ORDER: tuple[str, ...] = ("unsloth", "hf")


def stack(name: str) -> Stack:
    try:
        return STACKS[name]
    except KeyError:
        raise UserError(
            f"hardware.backend: unknown backend {name!r}", f"choose one of {AUTO}, {', '.join(NAMES)}"
        ) from None


def padding_free(name: str) -> bool:
    """Whether `name`'s micro-batches are one padding-free row (False for any other name, such as
    the memory model's hf-upcast profile)."""
    known = STACKS.get(name)
    return known is not None and known.padding_free


def installed(s: Stack) -> bool:
    return s.package is None or importlib.util.find_spec(s.package) is not None


def _why_not(s: Stack, cuda: bool, processes: int, is_installed: bool) -> str | None:
    """Why `s` cannot train here, as `auto` says it, or None when it can."""
    if s.one_process and processes > 1:
        return f"{s.label} trains on one GPU"
    if s.needs_cuda and not cuda:
        return f"no CUDA GPU, and {s.label} needs one"
    if not is_installed:
        return f"{s.label} is not installed"
    return None


@dataclass(frozen=True)
class Predicted:
    """A stack's predicted seconds per optimizer step for the run at hand, what the prediction
    rests on, and the model's typical error (the median of its held-out errors, 0.05 for 5%)."""

    seconds: float
    basis: str
    error: float = 0.0
    # Why the model's fit does not cover this run ('' where it does): an extrapolation auto
    # does not act on (engine.memory.speed.SpeedFit.covers).
    outside: str = ""
    # The typical error of this stack's step relative to another's on the same run: the median
    # held-out error of the predicted ratio over the card's paired table (0: not measured, and
    # `error` stands in). A choice compares two predictions, and their errors partly cancel.
    ratio_error: float = 0.0


SpeedOf = Callable[[str], "Predicted | None"]
"""A stack's prediction (engine.memory.estimate.speed_predictor); None where no model covers it."""


def margin(a: Predicted, b: Predicted) -> float:
    """How far apart two stacks' predicted steps must be for the prediction to tell them apart: the
    typical error of their predicted ratio where the card's table measured it, else the larger of
    the two models' typical errors. The ratio's is the error that matters, and the smaller: a run
    the models over-predict, they mostly over-predict on both stacks. Within it auto still takes
    the faster prediction, and says that the two are a near tie (`_fastest`)."""
    if a.ratio_error and b.ratio_error:
        return max(a.ratio_error, b.ratio_error)
    return max(a.error, b.error)


def fastest(order: list[str], predicted: dict[str, Predicted]) -> tuple[str, bool]:
    """(the stack predicted fastest, whether it leads the runner-up by more than the `margin`);
    an exact tie goes to the earlier in `order`.

    No margin keeps the first stack over a faster prediction: a pick within the error is right
    more often than not, and the tables say a default would cost more than it saves. Replayed
    held out (bench/speed_table.py) on the three measured tables, 61 pairs: the faster prediction
    is at worst 3.2% slower than the faster stack (one H200 pair), where keeping Unsloth within
    the ratio's margin was 5.7% and 7.8% slower on the H100 tables' attention-only pairs: hf was
    predicted faster there, by less than the margin, and trained faster."""
    name = min(order, key=lambda n: predicted[n].seconds)  # min keeps the first of equals
    others = [predicted[n] for n in order if n != name]
    if not others:
        return name, True
    mine = predicted[name]
    runner_up = min(others, key=lambda p: p.seconds)
    return name, mine.seconds < runner_up.seconds * (1.0 - margin(mine, runner_up))


def choose(
    want: str,
    *,
    cuda: bool,
    processes: int = 1,
    is_installed: dict[str, bool] | None = None,
    speed: SpeedOf | None = None,
) -> tuple[str, str]:
    """(stack, why) for `hardware.backend: want` on a machine with (`cuda`) or without a CUDA GPU,
    for a run of `processes` processes. An explicit stack that cannot run is a UserError. `auto`
    goes by `speed` when it predicts every stack that can run, each within the runs its model was
    fitted on (`fastest`), and takes the first of AUTO_ORDER that can run otherwise.
    `is_installed` overrides the package look-up (tests)."""

    def have(s: Stack) -> bool:
        return is_installed[s.name] if is_installed and s.name in is_installed else installed(s)

    if want != AUTO:
        s = stack(want)
        if s.needs_cuda and not cuda:
            raise UserError(f"hardware.backend: {s.name} needs a CUDA GPU", "set hardware.backend=hf or auto")
        if not have(s):
            raise UserError(
                f"hardware.backend: {s.name} is not installed",
                f"{s.install_hint or 'install it'}, or set hardware.backend=hf",
            )
        return s.name, "requested in the preset"
    reasons: list[str] = []
    runnable: list[Stack] = []
    for name in AUTO_ORDER:
        s = STACKS[name]
        why = _why_not(s, cuda, processes, have(s))
        if why is None:
            runnable.append(s)
        elif not runnable:
            reasons.append(why)
    if not runnable:
        raise UserError("hardware.backend: no backend can train here", "; ".join(reasons))  # pragma: no cover
    note = ""
    if len(runnable) > 1 and speed is not None:
        predicted = {s.name: speed(s.name) for s in runnable}
        known = {name: p for name, p in predicted.items() if p is not None}
        outside = [
            f"the {STACKS[name].label} speed model was {p.outside}" for name, p in known.items() if p.outside
        ]
        if len(known) == len(runnable) and not outside:
            return _fastest(runnable, known)
        missing = ["no speed model covers every stack on this GPU"] if len(known) < len(runnable) else []
        note = f"; {'; '.join(outside + missing)}, so the first that can run"
    s = runnable[0]
    if not reasons and s.needs_cuda:
        return s.name, f"auto: {s.label} is installed and a CUDA GPU is present{note}"
    return s.name, (f"auto: {'; '.join(reasons)}" if reasons else "auto") + note


def _fastest(runnable: list[Stack], predicted: dict[str, Predicted]) -> tuple[str, str]:
    """(stack, why) by predicted step time (every runnable stack predicted; `choose` calls it with
    two or more)."""
    name, clear = fastest([s.name for s in runnable], predicted)
    chosen, mine = STACKS[name], predicted[name]
    other = min((s for s in runnable if s is not chosen), key=lambda s: predicted[s.name].seconds)
    theirs = predicted[other.name]
    why = (
        f"auto: {chosen.label} predicted {theirs.seconds / mine.seconds:.2f}x the speed of {other.label} "
        f"on this run ({mine.seconds:.2f} against {theirs.seconds:.2f} s a step; {mine.basis})"
    )
    if clear:
        return name, why
    apart = margin(mine, theirs)
    if not apart:  # fits that carry no error: only an exact tie gets here
        return name, f"{why}: a tie, so the first that can run"
    if mine.ratio_error and theirs.ratio_error:
        loose = mine if mine.ratio_error >= theirs.ratio_error else theirs  # whose error sets the margin
        error = f"the typical error of the two speed models' ratio ({apart:.1%}; {loose.basis})"
    else:
        wider = other if theirs.error >= mine.error else chosen  # whose model's error sets it
        loose = predicted[wider.name]
        error = f"the typical error of the {wider.label} speed model ({loose.error:.1%}; {loose.basis})"
    return name, f"{why}: a near tie, within {error}"


def config_problems(backend: str, device: str, gpus: int | str) -> list[str]:
    """The checks a config can make about its stack before anything runs (engine.config.validate)."""
    if backend == AUTO or backend not in STACKS:
        return []
    s = STACKS[backend]
    problems = []
    if s.needs_cuda and device == "cpu":
        problems.append(f"hardware.backend: {s.name} needs a CUDA GPU; use hf or auto with device cpu")
    if s.one_process and gpus != 1 and not (isinstance(gpus, int) and gpus < 1):
        problems.append(
            f"hardware.backend: {s.name} trains on one GPU; use hf (or auto) with hardware.gpus > 1"
        )
    return problems
