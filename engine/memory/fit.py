"""Auto-fit: the largest micro-batch and the longest sequence that fit a GPU, by asking `estimate`.

"Fits" means the verdict is `fits`, not merely `tight`: an auto-fitted run keeps the headroom the
verdict asks for. The estimate grows monotonically with micro-batch and sequence length, so both
searches double then bisect: about 20 estimates, well under a millisecond each.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.config import RunConfig
from engine.memory.architectures import Architecture, resolve_architecture
from engine.memory.estimate import FITS, Estimate, estimate
from engine.memory.gpus import Gpu

SEQ_STEP = 64  # sequence lengths are searched in multiples of this (kernels like them)
MAX_MICRO_BATCH = 4096  # the micro-batch search stops here: a bigger one is never the question


@dataclass(frozen=True)
class FitResult:
    gpu: Gpu
    fits: bool  # a config that fits was found
    micro_batch: int  # recommended micro-batch (the largest that fits, capped at the effective batch)
    grad_accum: int  # keeps micro_batch x grad_accum closest to the preset's effective batch
    seq_len: int  # recommended sequence length (the preset's when it fits at micro-batch 1)
    max_micro_batch: int  # the largest micro-batch that fits at the preset's seq_len (0: none)
    max_seq_len: int  # the longest seq_len that fits at micro-batch 1 (0: none)
    seq_limited_by: str  # "memory" or "max_positions"
    micro_batch_limited_by: str  # "memory" or "search cap"
    target_effective_batch: int
    estimate: Estimate | None  # of the recommended config
    overrides: list[str] = field(default_factory=list)  # --set values that turn the preset into it

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum

    @property
    def summary(self) -> str:
        if not self.fits:
            return f"nothing fits on {self.gpu.label}: not even micro-batch 1 at {SEQ_STEP} tokens"
        what = f"micro-batch {self.micro_batch} x grad-accum {self.grad_accum} at seq_len {self.seq_len}"
        if self.estimate is not None:
            v = self.estimate.verdict(self.gpu)
            what += f": {v.used_gb:.1f} of {v.budget_gb:.1f} GiB"
        return what


def with_changes(cfg: RunConfig, **changes: object) -> RunConfig:
    """A copy of cfg with dotted keys changed: with_changes(cfg, **{"train.seq_len": 1024})."""
    out = copy.deepcopy(cfg)
    for key, value in changes.items():
        section, _, leaf = key.partition(".")
        setattr(getattr(out, section), leaf, value)
    return out


def closest_grad_accum(target_effective: int, micro_batch: int) -> int:
    """grad_accum that keeps micro_batch x grad_accum nearest the target (the larger on a tie)."""
    low = max(1, target_effective // micro_batch)
    high = low + 1
    return (
        high
        if abs(high * micro_batch - target_effective) <= abs(low * micro_batch - target_effective)
        else low
    )


def _keeping_effective_batch(largest: int, target: int) -> int:
    """The micro-batch up to `largest` whose closest grad_accum lands nearest the effective batch
    (the largest such): 6 fits and the preset wants 8 -> 4 x 2, not 6 x 1."""

    def miss(mb: int) -> int:
        return abs(mb * closest_grad_accum(target, mb) - target)

    return min(range(largest, 0, -1), key=miss)


def _largest(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """The largest n in [lo, hi] with fits(n), given fits is monotone (True then False); lo - 1 if none."""
    if not fits(lo):
        return lo - 1
    good, step = lo, 1
    while good + step <= hi and fits(good + step):
        good += step
        step *= 2
    bad = min(good + step, hi + 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def fit(cfg: RunConfig, gpu: Gpu, arch: Architecture | None = None, backend: str | None = None) -> FitResult:
    arch = arch or resolve_architecture(cfg)
    t = cfg.train
    target = cfg.effective_batch

    def fits(c: RunConfig) -> bool:
        return estimate(c, arch, backend, gpu=gpu).verdict(gpu).status == FITS

    max_mb = _largest(lambda mb: fits(with_changes(cfg, **{"train.micro_batch": mb})), 1, MAX_MICRO_BATCH)
    top = arch.max_positions // SEQ_STEP
    k = _largest(
        lambda n: fits(with_changes(cfg, **{"train.micro_batch": 1, "train.seq_len": n * SEQ_STEP})), 1, top
    )
    max_seq = k * SEQ_STEP
    seq_limit = "max_positions" if k == top else "memory"
    mb_limit = "search cap" if max_mb == MAX_MICRO_BATCH else "memory"

    if max_mb >= 1:
        mb, seq = _keeping_effective_batch(min(max_mb, max(target, 1)), target), t.seq_len
    elif max_seq >= SEQ_STEP:
        mb, seq = 1, max_seq
    else:
        return FitResult(gpu, False, 0, 0, 0, 0, 0, seq_limit, mb_limit, target, None)
    ga = closest_grad_accum(target, mb)
    best = with_changes(cfg, **{"train.micro_batch": mb, "train.grad_accum": ga, "train.seq_len": seq})
    overrides = [
        f"train.{key}={value}"
        for key, value in (("micro_batch", mb), ("grad_accum", ga), ("seq_len", seq))
        if getattr(t, key) != value
    ]
    return FitResult(
        gpu=gpu,
        fits=True,
        micro_batch=mb,
        grad_accum=ga,
        seq_len=seq,
        max_micro_batch=max(max_mb, 0),
        max_seq_len=max_seq,
        seq_limited_by=seq_limit,
        micro_batch_limited_by=mb_limit,
        target_effective_batch=target,
        estimate=estimate(best, arch, backend, gpu=gpu),
        overrides=overrides,
    )
