"""The console's one window onto the memory calculator (engine.memory).

Panes read a `BudgetView` (plain data, ready to draw) and never the calculator's own types, so a
change in engine.memory is adapted here and nowhere else. When the calculator is missing or fails
on a config, the view says so in words instead of raising: the console must stay up.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import Any

from engine.config import RunConfig
from engine.errors import UserError
from engine.memory import TERM_NAMES, Term


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
    verdict: str = ""  # fits, tight, does_not_fit, unknown
    advice: list[Suggestion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def headroom_gb(self) -> float | None:
        return None if self.budget_gb is None else self.budget_gb - self.device_total_gb

    @property
    def fits(self) -> bool:
        """Only a definite "does not fit" stops a launch for confirmation."""
        return self.verdict != "does_not_fit"

    def summary(self) -> str:
        """One short line for the Presets pane."""
        if not self.available:
            return self.reason
        total = f"{self.device_total_gb:.1f} GB"
        if self.budget_gb is None:
            return f"? needs {total}; no GPU to check against"
        mark = {"fits": "✓ fits", "tight": "! tight", "does_not_fit": "✗ DOES NOT FIT"}.get(
            self.verdict, self.verdict
        )
        return f"{mark}: {total} of {self.budget_gb:.1f} GB on {self.gpu}"


@dataclass(frozen=True)
class GpuChoice:
    label: str
    spec: str  # what engine.memory.resolve_gpu accepts: "auto", a catalog name, or "24GB"


def _memory() -> Any | None:
    try:
        return importlib.import_module("engine.memory")
    except ImportError:
        return None


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


def compute(cfg: RunConfig, gpu_spec: str | None = None) -> BudgetView:
    """The estimate for `cfg` against `gpu_spec` (default: the config's hardware.gpu)."""
    memory = _memory()
    if memory is None or not hasattr(memory, "estimate"):
        return BudgetView(False, reason="memory calculator not available")
    spec = gpu_spec or cfg.hardware.gpu or "auto"
    try:
        est = memory.estimate(cfg)
    except UserError as exc:
        return BudgetView(False, reason=f"no estimate: {exc}")
    except Exception as exc:  # the calculator's bug must not take the console down
        return BudgetView(False, reason=f"no estimate ({type(exc).__name__}: {exc})")
    order = {name: i for i, name in enumerate(TERM_NAMES)}
    terms = sorted(est.terms, key=lambda t: order.get(t.name, len(order)))
    view = BudgetView(
        True,
        gpu=spec,
        terms=terms,
        torch_peak_gb=float(est.torch_peak_gb),
        device_total_gb=float(est.device_total_gb),
        verdict="unknown",
        notes=list(getattr(est, "notes", ()) or ()),
    )
    try:
        gpu = memory.resolve_gpu(spec)
    except UserError as exc:
        return replace(view, reason=str(exc.message))
    verdict = est.verdict(gpu)
    return replace(
        view,
        gpu=str(gpu.label),
        budget_gb=float(verdict.budget_gb),
        verdict=str(verdict.status),
        advice=_advice(memory, cfg, gpu),
    )


def _advice(memory: Any, cfg: RunConfig, gpu: Any) -> list[Suggestion]:
    """The calculator's ranked changes (empty when it fits); none rather than an exception."""
    try:
        ranked = memory.advise(cfg, gpu)
    except Exception:
        return []
    # str(advice) reads "what to change: 7.9 GB (saves 4.1 GB), fits"
    return [Suggestion(str(a), list(a.overrides), float(a.saves_gb)) for a in ranked]


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
