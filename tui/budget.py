"""The console's one window onto the memory calculator (engine.memory).

Panes read a `BudgetView` (plain data, ready to draw) and never the calculator's own types, so a
change in engine.memory is adapted here and nowhere else. When the calculator is missing or fails
on a config, the view says so in words instead of raising: the console must stay up.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from engine.config import RunConfig
from engine.errors import UserError

if TYPE_CHECKING:  # the memory model is imported on first use, after the console's first frame
    from engine.memory import Term


@dataclass(frozen=True)
class Suggestion:
    """One ranked way to make the run fit: what to change, as --set overrides, and the effect."""

    text: str
    overrides: list[str] = field(default_factory=list)
    saves_gb: float | None = None


@dataclass(frozen=True)
class BudgetView:
    available: bool
    reason: str = ""  # why there is no estimate, in words
    gpu: str = ""  # what the budget is checked against, as shown
    budget_gb: float | None = None  # usable memory on that GPU
    terms: list[Term] = field(default_factory=list)
    torch_peak_gb: float = 0.0
    device_total_gb: float = 0.0
    error_band_gb: float = 0.0  # the estimate's expected error (held-out residuals), as `qlc estimate` shows
    verdict: str = ""  # fits, tight, does_not_fit, unknown
    advice: list[Suggestion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checkpointing: str = ""  # the checkpointing plan the figures are for, in words
    checkpointed: str = ""  # the same in a few words: "24 of 32 layers checkpointed (auto)"
    split: str = ""  # the batch split train.batch_split: auto chose, in words ("" when fixed)
    out_of_reach: str = ""  # when no listed change fits: what it would take, the line `qlc fit` prints

    @property
    def headroom_gb(self) -> float | None:
        return None if self.budget_gb is None else self.budget_gb - self.device_total_gb

    def advice_fitting_first(self) -> list[Suggestion]:
        """The suggestions that make it fit first, the calculator's order otherwise: the Memory
        pane's list and the launch warning show them alike."""
        return sorted(self.advice, key=lambda a: not a.text.endswith(", fits"))

    @property
    def fits(self) -> bool:
        """Only a definite "does not fit" stops a launch for confirmation."""
        return self.verdict != "does_not_fit"

    def summary(self) -> str:
        """One short line for the Presets pane: the verdict, then the checkpointing plan."""
        if not self.available:
            return self.reason
        total = f"{self.device_total_gb:.2f} GiB"
        if self.budget_gb is None:
            return f"? needs {total}; no GPU to check against"
        mark = {"fits": "✓ fits", "tight": "! tight", "does_not_fit": "✗ DOES NOT FIT"}.get(
            self.verdict, self.verdict
        )
        plan = f" · {self.checkpointed}" if self.checkpointed else ""
        return f"{mark}: {total} of {self.budget_gb:.2f} GiB on {self.gpu}{plan}"


@dataclass(frozen=True)
class GpuChoice:
    label: str
    spec: str  # what engine.memory.resolve_gpu accepts: "auto", a catalog name, or "24GB"


def _memory() -> Any | None:
    try:
        return importlib.import_module("engine.memory")
    except ImportError:
        return None


def gpu_problem(spec: str) -> str:
    """Why `spec` names no GPU the calculator knows ("" when it does): the size box asks before it
    re-checks the budget, so that it refuses what `qlc estimate --gpu` refuses (a bare 3080 is a
    card's model number, not 3080 GiB)."""
    memory = _memory()
    if memory is None or not hasattr(memory, "resolve_gpu"):
        return ""
    try:
        memory.resolve_gpu(spec)
    except UserError as exc:
        return f"{exc.message} ({exc.hint})" if exc.hint else exc.message
    return ""


def gpu_choices() -> list[GpuChoice]:
    """The picker's entries: the GPU actually present (auto), then the catalog cards."""
    choices = [GpuChoice("this machine's GPU (auto)", "auto")]
    memory = _memory()
    if memory is None or not hasattr(memory, "gpu_catalog"):
        return choices
    try:
        catalog = memory.gpu_catalog()
    except Exception:  # a broken catalog file: the sizes still work
        return choices
    for name, gpu in catalog.items():
        choices.append(GpuChoice(f"{gpu.label} ({gpu.total_gb:.0f} GB)", str(name)))
    return choices


def checkpoint_plan(est: Any) -> str:
    """The checkpointing plan an estimate is for, as the calculator decided it: "auto: 24 of 32
    layers checkpointed to fit 24.0 GiB (...)", "train.gradient_checkpointing is true: 32 of 32
    layers". `qlc estimate` and the console both print this, so their figures say the same."""
    base = getattr(est, "base", est)  # a per-GPU share carries the one-GPU estimate it came from
    reason = str(getattr(base, "checkpoint_reason", "") or "")
    if reason:
        return reason
    return f"{base.checkpointed_layers} of {base.arch.layers} layers checkpointed"


def split_plan(est: Any) -> str:
    """The batch split where train.batch_split is auto: "micro-batch 4 x grad-accum 1 · auto,
    written 2 x 2: fits 79.6 GiB without checkpointing"; "" when the split is fixed. Of an
    estimate (`qlc estimate`, the Memory pane) or of a run's model_ready event (`qlc train`, the
    dashboard log), which carry the same three fields."""
    base = getattr(est, "base", est)
    reason = str(getattr(base, "split_reason", "") or "")
    if not reason:
        return ""
    return f"micro-batch {base.micro_batch} x grad-accum {base.grad_accum} · {reason}"


def checkpointed_layers(est: Any, setting: object) -> str:
    """The plan in a few words, for one-line summaries."""
    base = getattr(est, "base", est)
    k, layers = base.checkpointed_layers, base.arch.layers
    words = (
        "no layer checkpointed"
        if k == 0
        else f"all {layers} layers checkpointed"
        if k >= layers
        else f"{k} of {layers} layers checkpointed"
    )
    return f"{words} (auto)" if setting == "auto" else words


def compute(cfg: RunConfig, gpu_spec: str | None = None) -> BudgetView:
    """The estimate for `cfg` against `gpu_spec` (default: the config's hardware.gpu): the same
    call `qlc estimate` makes, so `train.gradient_checkpointing: auto` is planned against that
    GPU's budget here too, and both show the same figure for the same preset and GPU."""
    memory = _memory()
    if memory is None or not hasattr(memory, "estimate"):
        return BudgetView(False, reason="memory calculator not available")
    spec = gpu_spec or cfg.hardware.gpu or "auto"
    try:
        gpu, no_gpu = memory.resolve_gpu(spec), ""
    except UserError as exc:  # "auto" on a machine without a GPU: an estimate without a budget
        gpu, no_gpu = None, str(exc.message)
    try:
        est = memory.estimate(cfg, gpu=gpu)  # the GPU picks the budget and the card class, as in qlc estimate
    except UserError as exc:
        return BudgetView(False, reason=f"no estimate: {exc}")
    except Exception as exc:  # the calculator's bug must not take the console down
        return BudgetView(False, reason=f"no estimate ({type(exc).__name__}: {exc})")
    order = {name: i for i, name in enumerate(memory.TERM_NAMES)}
    terms = sorted(est.terms, key=lambda t: order.get(t.name, len(order)))
    view = BudgetView(
        True,
        gpu=spec,
        terms=terms,
        torch_peak_gb=float(est.torch_peak_gb),
        device_total_gb=float(est.device_total_gb),
        error_band_gb=float(est.error_band_gb),
        verdict="unknown",
        notes=list(getattr(est, "notes", ()) or ()),
        checkpointing=checkpoint_plan(est),
        checkpointed=checkpointed_layers(est, cfg.train.gradient_checkpointing),
        split=split_plan(est),
    )
    if gpu is None:
        return replace(view, reason=no_gpu)
    verdict = est.verdict(gpu)
    ranked = _ranked(memory, cfg, gpu, est.arch)
    return replace(
        view,
        gpu=str(gpu.label),
        budget_gb=float(verdict.budget_gb),
        verdict=str(verdict.status),
        # str(advice) reads "what to change: 7.9 GiB (saves 4.1 GiB), fits"
        advice=[Suggestion(str(a), list(a.overrides), float(a.saves_gb)) for a in ranked or []],
        # Only from advice that was computed: a failed call is not "no change lowers it".
        out_of_reach=_out_of_reach(memory, cfg, gpu, ranked, est.arch)
        if ranked is not None and verdict.status == "does_not_fit"
        else "",
    )


def _ranked(memory: Any, cfg: RunConfig, gpu: Any, arch: Any = None) -> list[Any] | None:
    """The calculator's ranked changes (empty when it fits); None, not an exception, when it fails."""
    try:
        return list(memory.advise(cfg, gpu, arch))
    except Exception:
        return None


def _out_of_reach(memory: Any, cfg: RunConfig, gpu: Any, ranked: list[Any], arch: Any) -> str:
    """`qlc fit`'s line when no listed change fits this card (what it would take); "" otherwise."""
    try:
        reach = memory.per_gpu.out_of_reach(cfg, gpu, ranked, arch)
    except Exception:  # a calculator's bug must not take the console down
        return ""
    return str(reach) if reach is not None else ""


def fit(cfg: RunConfig, gpu_spec: str | None = None) -> tuple[list[str], str]:
    """Overrides that make `cfg` fit (micro-batch, grad-accum, seq_len), and a sentence about
    them; ([], why) when nothing needs changing or nothing fits."""
    memory = _memory()
    if memory is None or not hasattr(memory, "fit"):
        return [], "memory calculator not available"
    try:
        gpu = memory.resolve_gpu(gpu_spec or cfg.hardware.gpu or "auto")
        result = memory.fit(cfg, gpu)
    except UserError as exc:
        return [], str(exc)
    except Exception as exc:
        return [], f"auto-fit failed ({type(exc).__name__}: {exc})"
    if not result.fits:
        return [], result.summary
    if not result.overrides:
        return [], f"nothing to change: {result.summary}"
    return list(result.overrides), result.summary
