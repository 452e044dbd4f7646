"""How long an optimizer step takes on each stack, predicted from the work it does: what
`hardware.backend: auto` compares when more than one stack can train here.

A step's time is modelled as a sum of seven kinds of work, each with a cost per unit that a stack's
kernels set (fitted to measured steps by engine.memory.speed_fit, never guessed):

- matmul: the step's FLOPs (engine.memory.flops: forward, input-gradient backward, adapters,
  recompute) at the card's dense 16-bit peak, attention's apart. Its cost is the inverse of the
  utilisation the stack's matmuls reach;
- attention: attention's QK^T and AV FLOPs at the same peak, run by the attention kernel at its
  own utilisation, which grows with the sequence (on the H200 table a single matmul term
  under-predicted 16384-token steps by 14-24%);
- dequant: 4-bit weight elements turned back into 16-bit ones. Each micro-batch does it for every
  layer in its forward and again in its backward, and once more for each checkpointed layer's
  recompute; this is why fewer, larger micro-batches are faster (train.batch_split);
- elementwise: tokens x hidden x layer passes, the memory-bound work between the matmuls (norms,
  rotary, activations, residuals, the adapters' scaling), which fused kernels shrink;
- adapters: tokens x the adapted projections' input and output widths x layer passes, the
  activations LoRA's small matmuls read and write (attention-only adapters move far fewer);
- frozen: the same for the projections without adapters, which Unsloth runs outside its fused
  LoRA kernels (with attention-only adapters hf was 2-11% faster on all four H100 pairs of
  2026-12-06, where the terms above were the same for both);
- launches: micro-batches x layer passes, the fixed cost of a layer's kernels whatever the rows.

The device runs that work while the host queues it: Python, autograd and the kernel launches cost
the host a roughly fixed time per layer pass, and when a step's kernels are short (a 1B model, a
few thousand tokens) the device waits for the host. So a step takes the longer of the two: the
device's sum, and `host` (seconds per thousand layer passes, fitted like the costs) times the
launches. On the H200 table (2026-12-05) the host floor, 2.2 ms a pass for hf and 3.4 for Unsloth,
is what sets the short steps; with it, the held-out error of the hf fit fell from 7.6% to 4.5%
(median) and from 43.7% to 15.3% (worst), and auto's held-out pick came within 0.6% of the faster
stack on all 14 paired configurations (10.8% off on one before). The device's per-pass cost
("launches") is fitted as 0 then (engine.memory.speed_fit.fit_step): the floor carries it.

A layer pass counts a layer's forward as one and its backward as two (it computes two gradients
where the forward computed one output); a checkpointed layer's recompute is one more forward. So
every term is affine in the number of checkpointed layers: on the Llama-3.1-8B recipe on an H100
(bench/results/stacks-llama-3.1-8b-h100-2026-11-23.json, one call, Unsloth), the step with 17 of
32 layers checkpointed (1.467 s) is 1.4% slower than the line through 0 (1.186 s) and 32 layers
(1.677 s) predicts.

The fits live in speed_fits.json beside this file, one per stack and card: which card they were
measured on, how many configurations, and the held-out error (bench/speed_table.py writes it).
They are fitted to 4-bit runs, and used for 4-bit runs on the card they were measured on only.
Pure Python: the console reads it too.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.memory import flops
from engine.memory.architectures import Architecture

FEATURES: tuple[str, ...] = (
    "matmul",
    "attention",
    "dequant",
    "elementwise",
    "adapters",
    "frozen",
    "launches",
)
HOST = "host"  # a cost key beside FEATURES: the host's seconds per thousand layer passes (a floor)
FITS_PATH = Path(__file__).with_name("speed_fits.json")
# Where a fit's rows lie, per step: what auto checks before it trusts a fit's prediction
# (SpeedFit.covers). Recomputation and the micro-batch's size decide how much of a step is the
# host's and the offloaded checkpoint copies'; the number of micro-batches, how much is a step's
# fixed cost.
SHARE_SLACK = 0.25  # a step recomputing up to a quarter of the layers fewer (or more) than a row
TOKENS_SLACK = 2.0  # micro-batches up to half (or twice) the size of that row's
# and up to half (or twice) its micro-batches a step. A step's fixed costs (the optimizer's, the
# host's) and a micro-batch's cannot be told apart on rows of one micro-batch a step: the H100 fit
# of 2026-12-06 (all such rows) predicted the 8B's 2 x 2 steps within -3.2% to +5.8% and its 1 x 4
# steps 12-60% too long (earlier H100 runs: bench/results/stacks-llama-3.1-8b-*, split-*, pair-*,
# speed-holdout-*; docs/backends.md).
GA_SLACK = 2


@dataclass(frozen=True)
class StepWork:
    """One optimizer step's work, in the units the fitted costs multiply."""

    matmul: float  # seconds at 100% of the card's dense 16-bit peak, attention's matmuls apart
    attention: float  # attention's QK^T and AV (forward, backward, recompute), seconds at the peak
    dequant: float  # 4-bit weight elements dequantized, billions
    elementwise: float  # tokens x hidden x layer passes, billions
    adapters: float  # tokens x the adapted modules' input and output widths x layer passes, billions
    frozen: float  # the same for the projections without adapters, billions
    launches: float  # micro-batches x layer passes, thousands
    tokens: int  # tokens per optimizer step (what tokens/s divides)
    # Not work, but where the step lies (SpeedFit.covers): what share of the layers it recomputes
    # and how many tokens each micro-batch carries.
    recomputed_share: float
    micro_batch_tokens: int
    grad_accum: int

    @property
    def point(self) -> tuple[float, int, int]:
        return (round(self.recomputed_share, 4), int(self.micro_batch_tokens), int(self.grad_accum))

    def vector(self) -> tuple[float, ...]:
        return tuple(float(getattr(self, f)) for f in FEATURES)


def step_work(
    arch: Architecture,
    *,
    seq_len: int,
    micro_batch: int,
    grad_accum: int,
    r: int,
    targets: tuple[str, ...],
    checkpointed: int,
    peak_tflops: float,
) -> StepWork:
    """The work of one optimizer step of full seq_len rows (packed or padding-free)."""
    per_token = flops.training_flops_per_token(arch, seq_len, r, targets, checkpointed)
    tokens = seq_len * micro_batch * grad_accum
    mods = arch.linear_modules()
    # Each micro-batch dequantizes a layer's weights in its forward, its backward and its recompute.
    dequantized = grad_accum * (2 * arch.layers + checkpointed) * sum(i * o for i, o in mods.values())
    adapted = sum(i + o for m, (i, o) in mods.items() if m in targets)
    frozen = sum(i + o for m, (i, o) in mods.items() if m not in targets)
    layer_passes = 3 * arch.layers + checkpointed  # forward 1, backward 2, recompute 1
    # Attention's sequence-wide matmuls run in the attention kernel, at its own utilisation:
    # forward once per layer, backward twice, once more per recompute (engine.memory.flops).
    attention = flops.attention_flops_per_token(arch, seq_len) * layer_passes
    peak = peak_tflops * 1e12
    return StepWork(
        matmul=tokens * (sum(per_token.values()) - attention) / peak,
        attention=tokens * attention / peak,
        dequant=dequantized / 1e9,
        elementwise=tokens * arch.hidden * layer_passes / 1e9,
        adapters=tokens * adapted * layer_passes / 1e9,
        frozen=tokens * frozen * layer_passes / 1e9,
        launches=grad_accum * layer_passes / 1e3,
        tokens=tokens,
        recomputed_share=checkpointed / max(arch.layers, 1),
        micro_batch_tokens=seq_len * micro_batch,
        grad_accum=grad_accum,
    )


def device_s(costs: dict[str, float], work: StepWork) -> float:
    """The device's seconds per optimizer step: each kind of work times its cost."""
    return sum(costs.get(f, 0.0) * x for f, x in zip(FEATURES, work.vector(), strict=True))


def host_s(costs: dict[str, float], work: StepWork) -> float:
    """The host's seconds to queue the step's layer passes (0 for fits without a host floor)."""
    return costs.get(HOST, 0.0) * work.launches


def predict_s(costs: dict[str, float], work: StepWork) -> float:
    """Seconds per optimizer step: the device's work, or the host's where the device waits for it."""
    return max(device_s(costs, work), host_s(costs, work))


@dataclass(frozen=True)
class SpeedFit:
    """A stack's fitted costs on one GPU, and what they rest on."""

    stack: str
    gpu: str  # the card the steps were measured on, as NVML names it
    gpu_class: str  # its class (engine.memory.devices): hopper, ada-ampere...
    costs: dict[str, float]  # seconds per unit of each FEATURES entry, and the HOST floor
    configurations: int
    held_out_error: float  # the worst |relative error| predicting a configuration left out of the fit
    source: str  # the results file(s) it was fitted to
    date: str
    # The median of those errors: within it, auto calls a predicted difference a near tie where the
    # fit has no typical_ratio_error (engine.stacks.margin). 0 for fits written before it was recorded.
    typical_error: float = 0.0
    # Where the steps it was fitted on lie: (recomputed share, tokens a micro-batch, micro-batches
    # a step) of each distinct row (StepWork.point). Empty: not recorded, no bounds.
    domain: tuple[tuple[float, int, int], ...] = ()
    # The median held-out error of this stack's step relative to the other stack's, over the
    # paired configurations of its table (stacks.margin): 0 where not recorded.
    typical_ratio_error: float = 0.0

    def predict_s(self, work: StepWork) -> float:
        return predict_s(self.costs, work)

    def covers(self, work: StepWork) -> str:
        """'' where a row it was fitted on lies near `work` (within SHARE_SLACK of its recomputed
        share, TOKENS_SLACK of its tokens a micro-batch and GA_SLACK of its micro-batches a step,
        all at once), else why not, as a clause. Beyond its rows a fit extrapolates what the
        table never checked: the H200 Unsloth fit (every row fully recomputed, 8,192-16,384
        tokens a micro-batch) predicted 1.30 s for an 8B step with none recomputed and 2,048
        tokens, which took 0.69 s on an H100 (bench/results/speed-holdout-llama-3.1-8b-h100-
        2026-12-06.json: another card, so a direction and a size, not an error; hf's 0.84 s held
        there)."""
        if not self.domain:
            return ""
        share, tokens, ga = work.recomputed_share, work.micro_batch_tokens, work.grad_accum

        def near_share(s: float) -> bool:
            return abs(share - s) <= SHARE_SLACK + 1e-9

        def near_tokens(t: int) -> bool:
            return t / TOKENS_SLACK <= tokens <= t * TOKENS_SLACK

        def near_ga(g: int) -> bool:
            return g / GA_SLACK <= ga <= g * GA_SLACK

        if any(near_share(s) and near_tokens(t) and near_ga(g) for s, t, g in self.domain):
            return ""
        shares = [f"{s:.0%}" for s in sorted({s for s, _, _ in self.domain})]
        seen = shares[0] if len(shares) == 1 else f"{', '.join(shares[:-1])} or {shares[-1]}"
        near = [t for s, t, _ in self.domain if near_share(s)]
        if not near:
            return f"fitted on runs with {seen} of the layers recomputed, this run {share:.0%}"
        if any(near_tokens(t) for t in near):
            gas = sorted({g for s, t, g in self.domain if near_share(s) and near_tokens(t)})
            most = f"{gas[0]}" if len(gas) == 1 else f"{gas[0]}-{gas[-1]}"
            unit = "micro-batch" if most == "1" else "micro-batches"
            return f"fitted on runs of {most} {unit} a step, this run {ga}"
        span = f"{min(near):,}" if min(near) == max(near) else f"{min(near):,}-{max(near):,}"
        return f"fitted on runs with {span} tokens a micro-batch at {share:.0%} of the layers recomputed, this run {tokens:,}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "gpu": self.gpu,
            "gpu_class": self.gpu_class,
            "costs": self.costs,
            "configurations": self.configurations,
            "held_out_error": self.held_out_error,
            "typical_error": self.typical_error,
            "source": self.source,
            "date": self.date,
            **({"domain": [list(p) for p in self.domain]} if self.domain else {}),
            **({"typical_ratio_error": self.typical_ratio_error} if self.typical_ratio_error else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeedFit:
        return cls(
            stack=str(d["stack"]),
            gpu=str(d["gpu"]),
            gpu_class=str(d["gpu_class"]),
            costs={str(k): float(v) for k, v in d["costs"].items()},
            configurations=int(d["configurations"]),
            held_out_error=float(d["held_out_error"]),
            source=str(d["source"]),
            date=str(d["date"]),
            typical_error=float(d.get("typical_error", 0.0)),
            # Domains written before micro-batches a step were recorded: every row had one.
            domain=tuple(
                (float(p[0]), int(p[1]), int(p[2]) if len(p) > 2 else 1) for p in d.get("domain", ())
            ),
            typical_ratio_error=float(d.get("typical_ratio_error", 0.0)),
        )


def domain_of(works: list[StepWork]) -> tuple[tuple[float, int, int], ...]:
    """Where these steps lie (SpeedFit.domain): each distinct (recomputed share, tokens a
    micro-batch, micro-batches a step), sorted."""
    return tuple(sorted({w.point for w in works}))


def load_fits(path: Path = FITS_PATH) -> tuple[SpeedFit, ...]:
    if not path.is_file():
        return ()
    data = json.loads(path.read_text(encoding="utf-8"))
    return tuple(SpeedFit.from_dict(d) for d in data.get("fits", ()))


@functools.cache
def fits() -> tuple[SpeedFit, ...]:
    return load_fits()


def fit_for(stack: str, card: str, known: tuple[SpeedFit, ...] | None = None) -> SpeedFit | None:
    """The stack's fit measured on this card (its name as NVML gives it). Costs measured on one
    card do not transfer to another, not even of the same class: dequantizing and the elementwise
    work follow the memory bandwidth (an H200's is 1.4x an H100's), launches the clocks."""
    want = " ".join(card.lower().split())
    for f in fits() if known is None else known:
        if f.stack == stack and " ".join(f.gpu.lower().split()) == want:
            return f
    return None
