"""Per-GPU memory of a run on several GPUs, how many GPUs of a kind a run needs, and what hardware
a recipe would take where no change `advise` lists fits its card (out_of_reach).

Built on the one-GPU model (terms.py, estimate.py): the same plan, the same phases of a step, the
same constants; a strategy changes only where the bytes live. train.gradient_checkpointing: auto
is searched on the per-GPU figure (gpu_share), the one the verdict compares, both here and in the
plan a run on several GPUs makes (engine.memory.checkpointing).

- ddp (PyTorch DistributedDataParallel, as accelerate wraps it): every GPU holds the whole 4-bit
  model, its adapters, gradients and optimizer state, and runs its own micro-batch. DDP adds its
  gradient buckets: the reducer copies every trainable gradient into flat buckets to all-reduce
  them (gradient_as_bucket_view is off by default), a second copy of the gradients. More GPUs
  never lower the memory one GPU needs.
- fsdp (FSDP2 `fully_shard` per decoder layer, as transformers 5.17 and accelerate 1.15 apply
  it): every parameter is split across the N GPUs, the packed 4-bit weights included (stored in
  the compute dtype, so they shard like bf16). bitsandbytes keeps each layer's quantization state
  (absmax, the nested constants) on the module, outside the parameter: every GPU holds all of it.
  Gradients and optimizer state are sharded alike; the optimizer is torch's AdamW
  (config.validate: bitsandbytes' optimizers cannot step sharded weights). While it runs, a GPU
  also holds the layer it computes, gathered whole, and the next one, prefetched; the final norm
  and LM head are gathered at the end of the forward and kept until the backward starts
  (accelerate wraps them with reshard_after_forward=False).

Not modelled: NCCL's own buffers, allocated outside PyTorch's allocator (their size depends on the
GPUs' links and NCCL's settings); nothing of this module has been checked against a measurement on
several GPUs yet. bench/multi_gpu.py measures per-GPU peaks to compare (docs/multi-gpu.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine import stacks
from engine.config import RunConfig
from engine.errors import UserError
from engine.memory import constants as C
from engine.memory import terms
from engine.memory.advice import Advice
from engine.memory.architectures import Architecture, resolve_architecture
from engine.memory.estimate import (
    DOES_NOT_FIT,
    FITS,
    TERM_NAMES,
    Estimate,
    Share,
    Term,
    Verdict,
    estimate,
    plan_for,
)
from engine.memory.fit import with_changes
from engine.memory.gpus import Gpu, resolve_gpu
from engine.protocol import EstimateEvent

STRATEGIES = ("ddp", "fsdp")
MAX_GPUS = 64  # "how many GPUs" searches up to this many
FSDP_OPTIMIZER = "adamw_torch"
UNMEASURED = "not yet checked against a measurement on several GPUs (bench/multi_gpu.py)"


@dataclass(frozen=True)
class PerGpuEstimate:
    """What one GPU of an N-GPU run holds at the step's peak."""

    strategy: str
    gpus: int
    base: Estimate  # the one-GPU estimate of the same config (the optimizer fsdp trains with)
    terms: tuple[Term, ...]
    torch_peak_gb: float
    torch_allocated_gb: float
    device_total_gb: float
    peak_phase: str
    host_load_gb: float | None  # host memory one host's ranks hold while loading (fsdp), GiB
    notes: tuple[str, ...] = field(default=())
    # Of device_total_gb, what the strategy splits across the GPUs (fsdp's shards; 0 under ddp):
    # the rest every GPU holds whole, so more GPUs never take a GPU's total below it.
    sharded_gb: float = 0.0

    @property
    def arch(self) -> Architecture:
        return self.base.arch

    @property
    def backend(self) -> str:
        return self.base.backend

    @property
    def backend_reason(self) -> str:
        return self.base.backend_reason

    @property
    def device_profile(self) -> str:
        return self.base.device_profile

    @property
    def error_band_fraction(self) -> float:
        return self.base.error_band_fraction

    @property
    def error_band_gb(self) -> float:
        """The one-GPU model's expected error, on this GPU's total (several GPUs are unmeasured)."""
        return self.device_total_gb * self.base.error_band_fraction

    def term(self, name: str) -> Term:
        return next(t for t in self.terms if t.name == name)

    def verdict(self, gpu: Gpu) -> Verdict:
        return dataclasses.replace(self.base, device_total_gb=self.device_total_gb).verdict(gpu)

    def to_event(self, gpu: Gpu | None = None) -> EstimateEvent:
        """The estimate event a run on several GPUs sends: one GPU's share."""
        share = dataclasses.replace(
            self.base,
            terms=self.terms,
            torch_peak_gb=self.torch_peak_gb,
            torch_allocated_gb=self.torch_allocated_gb,
            device_total_gb=self.device_total_gb,
        )
        return share.to_event(gpu)

    def to_dict(self, gpu: Gpu | None = None) -> dict[str, Any]:
        out = self.base.to_dict(gpu)  # same layout as a one-GPU estimate, per GPU
        out.update(
            strategy=self.strategy,
            gpus=self.gpus,
            per_gpu=True,
            terms=[{"name": t.name, "gb": t.gb, "parts": dict(t.parts)} for t in self.terms],
            torch_peak_gb=self.torch_peak_gb,
            torch_allocated_gb=self.torch_allocated_gb,
            device_total_gb=self.device_total_gb,
            error_band_gb=self.error_band_gb,
            peak_phase=self.peak_phase,
            host_load_gb=self.host_load_gb,
            notes=list(self.notes),
        )
        if gpu is not None:
            v = self.verdict(gpu)
            out["verdict"] = {"status": v.status, "headroom_gb": v.headroom_gb, "used_gb": v.used_gb}
        return out


def resolve_strategy(cfg: RunConfig, strategy: str | None) -> str:
    chosen = (strategy or cfg.hardware.strategy).lower()
    if chosen not in STRATEGIES:
        raise UserError(f"--strategy {chosen!r}: unknown", f"choose {' or '.join(STRATEGIES)}")
    return chosen


def _backend(cfg: RunConfig, gpus: int, backend: str | None) -> tuple[str | None, str]:
    """The stack for `gpus` processes, and why, when that differs from the one-GPU choice:
    engine.stacks' rule, as the engine applies it."""
    want = (backend or cfg.hardware.backend or stacks.AUTO).lower()
    if gpus <= 1 or want not in (stacks.AUTO, *stacks.NAMES):
        return backend, ""
    if want != stacks.AUTO:
        if stacks.STACKS[want].one_process:
            label = stacks.STACKS[want].label
            raise UserError(
                f"--backend {want}: {label} trains on one GPU", "use --backend hf with --gpus > 1"
            )
        return backend, ""
    # Several processes: only stacks that train on several GPUs (a CUDA GPU present, or not, does
    # not change which of those comes first).
    name, why = stacks.choose(stacks.AUTO, cuda=True, processes=gpus, is_installed=_every_stack_installed())
    return stacks.STACKS[name].memory_profile, why


def _every_stack_installed() -> dict[str, bool]:
    return dict.fromkeys(stacks.NAMES, True)


def _gib(parts: dict[str, float]) -> dict[str, float]:
    return {k: v / C.GIB for k, v in parts.items() if v}


def per_gpu(
    cfg: RunConfig,
    gpus: int,
    strategy: str | None = None,
    arch: Architecture | None = None,
    backend: str | None = None,
    *,
    budget_gb: float | None = None,
    padded: bool | None = None,
    gpu: Gpu | None = None,
    checkpointed: int | None = None,
) -> PerGpuEstimate:
    """The memory one GPU of a `gpus`-GPU run of `cfg` needs, with `strategy` (default: the
    config's hardware.strategy). One GPU is the one-GPU estimate itself. `padded` as in
    engine.memory.estimate (rows all seq_len long carry no padding); `checkpointed` the layers a
    running engine chose (None: as gradient_checkpointing says)."""
    if gpus < 1:
        raise UserError(f"--gpus: must be at least 1, got {gpus}")
    strategy = resolve_strategy(cfg, strategy)
    arch = arch or resolve_architecture(cfg)
    backend, reason = _backend(cfg, gpus, backend)
    notes: list[str] = []
    if gpus > 1 and strategy == "fsdp" and cfg.train.optimizer != FSDP_OPTIMIZER:
        cfg = with_changes(cfg, **{"train.optimizer": FSDP_OPTIMIZER})
        notes.append(
            f"fsdp trains with {FSDP_OPTIMIZER} (bitsandbytes optimizers cannot step sharded weights): "
            f"--set train.optimizer={FSDP_OPTIMIZER}"
        )
    if budget_gb is None and gpu is not None:
        budget_gb = gpu.budget_gb
    # Several ranks keep train.batch_split as written, as the engine's do (estimate.choose_split);
    # auto checkpointing spends each GPU's budget on that GPU's share, the figure the verdict
    # below compares (the one-GPU plan would count the whole model under FSDP).
    share = gpu_share(strategy, gpus) if gpus > 1 else None
    base = estimate(
        cfg, arch, backend, budget_gb=budget_gb, padded=padded, gpu=gpu, processes=gpus, share=share,
        checkpointed=checkpointed,
    )  # fmt: skip
    if reason:
        base = dataclasses.replace(base, backend_reason=reason)
    if gpus == 1:
        return PerGpuEstimate(
            strategy,
            1,
            base,
            base.terms,
            base.torch_peak_gb,
            base.torch_allocated_gb,
            base.device_total_gb,
            base.peak_phase,
            None,
            base.notes,
        )
    device = gpu.device if gpu is not None else None
    plan = plan_for(
        cfg, arch, base.backend, budget_gb, padded, checkpointed=base.checkpointed_layers, device=device
    )
    return _build(strategy)(base, plan, gpus, tuple(notes) + base.notes + (UNMEASURED,))


def _build(strategy: str) -> Callable[[Estimate, terms.Plan, int, tuple[str, ...]], PerGpuEstimate]:
    return _ddp if strategy == "ddp" else _fsdp


def gpu_share(strategy: str, gpus: int) -> Share:
    """What one of `gpus` GPUs holds of a planned step under `strategy`, for the layout searches
    (estimate.choose_checkpointing): the same arithmetic as per_gpu's figures, so the plan auto
    chooses and the verdict on it agree."""
    build = _build(strategy)

    def total_gb(one: Estimate, plan: terms.Plan) -> float:
        return build(one, plan, gpus, ()).device_total_gb

    return Share(total_gb, f"on each of {gpus} GPUs under {strategy}")


def _ddp(base: Estimate, plan: terms.Plan, gpus: int, notes: tuple[str, ...]) -> PerGpuEstimate:
    buckets = sum(terms.gradients(plan).values())
    out = []
    for t in base.terms:
        if t.name == "gradients":
            parts = {**t.parts, "DDP gradient buckets (a second copy, all-reduced)": buckets / C.GIB}
            t = Term(t.name, sum(parts.values()), parts)
        out.append(t)
    extra = buckets / C.GIB
    return PerGpuEstimate(
        "ddp",
        gpus,
        base,
        tuple(out),
        base.torch_peak_gb + extra,
        base.torch_allocated_gb + extra,
        base.device_total_gb + extra,
        base.peak_phase,
        None,
        notes,
    )


def layer_bytes(plan: terms.Plan) -> float:
    """One decoder layer's parameters as FSDP gathers them: the packed 4-bit (or 16-bit) linears,
    the norms, and the layer's LoRA adapters."""
    a = plan.arch
    linear = sum(i * o for i, o in a.linear_modules().values())
    packed = linear * (0.5 if plan.load_in_4bit else plan.compute_bytes)
    norms = (a.norms_per_layer * a.hidden + (2 * a.head_dim if a.qk_norm else 0)) * plan.frozen_16bit_bytes
    lora = terms.lora_params(plan) / a.layers * plan.lora_bytes
    return packed + norms + lora


def _fsdp(base: Estimate, plan: terms.Plan, gpus: int, notes: tuple[str, ...]) -> PerGpuEstimate:
    a, n = plan.arch, gpus
    counts = a.param_counts()
    full_weights = terms.weights(plan)
    weights: dict[str, float] = {}
    for name, value in full_weights.items():
        if name == "4-bit linears":
            packed = counts["linear"] * 0.5
            weights[f"4-bit linears, packed (1/{n} each)"] = packed / n
            weights["4-bit quantization state (every GPU)"] = value - packed
        else:
            weights[f"{name} (1/{n} each)"] = value / n
    grads = {f"{k} (1/{n} each)": v / n for k, v in terms.gradients(plan).items()}
    opt_torch, paged = terms.optimizer_states(plan)
    optimizer = {f"{k} (1/{n} each)": v / n for k, v in opt_torch.items()}
    paged /= n
    quant_state = weights.get("4-bit quantization state (every GPU)", 0.0)
    sharded = sum(weights.values()) - quant_state + sum(grads.values()) + sum(optimizer.values()) + paged
    workspaces = float(plan.device.workspace_bytes)
    static = sum(weights.values()) + sum(grads.values()) + sum(optimizer.values()) + workspaces

    gathered_layers = 2 * layer_bytes(plan)  # the layer computing and the next one, prefetched
    layer_lora_grads = terms.lora_params(plan) / a.layers * plan.lora_bytes
    head = (counts["lm_head"] or counts["embed_tokens"]) * plan.frozen_16bit_bytes + a.hidden * 2
    best: tuple[float, float, terms.Phase, dict[str, float]] | None = None
    for phase in terms.phases(plan):
        gathered = {"gathered layers (the one computing + the next, prefetched)": gathered_layers}
        if phase.name.startswith("backward"):
            gathered["the layer's unsharded LoRA gradients (before reduce-scatter)"] = layer_lora_grads
        if phase.name.startswith("loss"):
            gathered["gathered final norm + LM head (kept until the backward starts)"] = head
        allocated = static + sum(phase.activations.values()) + sum(phase.workspace.values())
        allocated += sum(gathered.values())
        slack = terms.allocator_slack(plan, phase)  # unmeasured under FSDP: the one-GPU fit
        if best is None or allocated + slack > best[0] + best[1]:
            best = (allocated, slack, phase, gathered)
    assert best is not None
    allocated, slack, phase, gathered = best
    context = plan.device.context_gib * C.GIB
    modules = C.KERNEL_MODULES_GIB.get(plan.modules_key, 0.0) * C.GIB
    if paged:
        optimizer["paged states (managed memory, outside torch)"] = paged
    workspace = {
        "CUDA context (outside torch)": context,
        "kernel modules (outside torch)": modules,
        "cuBLAS + cuBLASLt workspaces": workspaces,
        **gathered,
        **phase.workspace,
        "allocator slack (reserved - allocated)": slack,
    }
    parts = {
        "weights": weights,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": phase.activations,
        "workspace": workspace,
    }
    built = tuple(Term(t, sum(_gib(parts[t]).values()), _gib(parts[t])) for t in TERM_NAMES)
    # Each rank of a host quantizes the whole model on the CPU before FSDP moves its shard to
    # the GPU (engine/train/backends/parallel.py): the host holds one 4-bit model per local GPU.
    host_load = sum(full_weights.values()) * n / C.GIB
    reserved = allocated + slack
    return PerGpuEstimate(
        "fsdp",
        gpus,
        base,
        built,
        reserved / C.GIB,
        allocated / C.GIB,
        (reserved + context + modules + paged) / C.GIB,
        phase.name,
        host_load,
        (
            *notes,
            f"loading: each rank holds a whole 4-bit model in host memory ({host_load:.1f} GiB for {n} on one host)",
        ),
        sharded / C.GIB,
    )


@dataclass(frozen=True)
class GpusNeeded:
    """The fewest GPUs of one kind a config needs, per strategy (None: no number does)."""

    gpu: Gpu
    needed: dict[str, int | None]
    estimates: dict[str, PerGpuEstimate | None]

    @property
    def best(self) -> tuple[str, int] | None:
        found = [(n, s) for s, n in self.needed.items() if n is not None]
        if not found:
            return None
        n, s = min(found)
        return s, n


def gpus_needed(
    cfg: RunConfig,
    gpu: Gpu,
    arch: Architecture | None = None,
    backend: str | None = None,
    max_gpus: int = MAX_GPUS,
) -> GpusNeeded:
    """How many GPUs of `gpu`'s kind the config needs, with each strategy, at its micro-batch and
    seq_len: the fewest whose per-GPU estimate fits (not merely tight). DDP needs one or none:
    its per-GPU memory never falls with more GPUs. Per-GPU memory under FSDP falls with N, so
    the search doubles, then bisects."""
    arch = arch or resolve_architecture(cfg)
    needed: dict[str, int | None] = {}
    found: dict[str, PerGpuEstimate | None] = {}

    def fits(strategy: str, n: int) -> PerGpuEstimate | None:
        e = per_gpu(cfg, n, strategy, arch, backend, gpu=gpu)
        return e if e.verdict(gpu).status == FITS else None

    one = fits("ddp", 1)
    needed["ddp"], found["ddp"] = (1, one) if one else (None, None)
    good: int | None = None
    lo, hi = 1, 2
    while hi <= max_gpus and fits("fsdp", hi) is None:
        lo, hi = hi, hi * 2
    if hi <= max_gpus:
        good = hi
        while good - lo > 1:
            mid = (lo + good) // 2
            if fits("fsdp", mid) is not None:
                good = mid
            else:
                lo = mid
    needed["fsdp"] = good
    found["fsdp"] = fits("fsdp", good) if good else None
    return GpusNeeded(gpu, needed, found)


# Below the changes `advise` lists: what a recipe none of them fits on its card would take instead.
CHANGE_WORDS = {
    "micro_batch": "micro-batch",
    "gradient_checkpointing": "checkpointing",
    "optimizer": "optimizer",
    "attention": "attention",
    "backend": "backend",
    "modules_to_save": "modules_to_save",
    "rank": "LoRA rank",
    "seq_len": "seq_len",
}
CARD_SEARCH_GB = 4096  # the largest plain size resolve_gpu takes


@dataclass(frozen=True)
class OutOfReach:
    """A recipe that no listed change fits on its card, in one line: the lowest the changes get it
    to, the smallest card that holds it with them, and how many of these GPUs FSDP would shard the
    recipe as written over. `qlc estimate` and `qlc fit` print the same line, so neither sends the
    user to the other for a change that does not exist."""

    gpu: Gpu
    closest_gb: float  # the lowest device total the listed changes reach (as written if none lowers it)
    changed: tuple[str, ...]  # the kinds of change that reach it, in the order they apply
    card_gb: int | None  # the smallest plain size (whole GiB, as --gpu takes it) it fits; None: none
    fsdp_gpus: int | None  # GPUs of this kind the recipe as written needs under fsdp (gpus_needed)
    fsdp_checked: bool  # False where no multi-GPU stack was asked (--backend unsloth)

    def __str__(self) -> str:
        if not self.changed:
            how = "as written: no listed change lowers it"
        elif len(self.changed) == 1:
            how = f"with the {CHANGE_WORDS.get(self.changed[0], self.changed[0])} changed"
        else:
            words = [CHANGE_WORDS.get(k, k) for k in self.changed]
            how = f"with {', '.join(words[:-1])} and {words[-1]} changed together"
        text = (
            f"nothing in reach fits {self.gpu}: "
            f"the smallest this recipe gets to is {self.closest_gb:.2f} GiB ({how})"
        )
        if self.card_gb is not None:
            text += f", which needs a GPU of at least {self.card_gb} GiB"
        if self.fsdp_checked:
            text += (
                f"; or, as written, fsdp over {self.fsdp_gpus} of these GPUs"
                if self.fsdp_gpus is not None
                else f"; fsdp over up to {MAX_GPUS} of these GPUs does not fit it either"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": str(self),
            "closest_gb": self.closest_gb,
            "changed": list(self.changed),
            "card_gb": self.card_gb,
            "fsdp_gpus": self.fsdp_gpus if self.fsdp_checked else None,
        }


def out_of_reach(
    cfg: RunConfig,
    gpu: Gpu,
    advice: list[Advice],
    arch: Architecture | None = None,
    backend: str | None = None,
    needed: GpusNeeded | None = None,
) -> OutOfReach | None:
    """None while the recipe, or any change `advice` (advise's list for it on `gpu`) lists, fits
    `gpu` (tight counts: the advice table shows it); else what it would take. `needed`: the
    gpus_needed answer already at hand (`qlc fit` prints it), so both say the same number."""
    if any(a.status != DOES_NOT_FIT for a in advice):
        return None
    arch = arch or resolve_architecture(cfg)
    written = estimate(cfg, arch, backend, gpu=gpu)
    if written.verdict(gpu).status != DOES_NOT_FIT:
        return None
    lowered = [a for a in advice if a.kinds and a.config is not None and a.after_gb < written.device_total_gb]
    closest = min(lowered, key=lambda a: a.after_gb, default=None)
    if closest is not None and closest.config is not None:
        config, profile, total = closest.config, closest.profile or backend, closest.after_gb
        changed = closest.kinds
    else:
        config, profile, total, changed = cfg, backend, written.device_total_gb, ()
    card_gb = _smallest_card(config, arch, profile, total)
    checked = True
    if needed is None:
        try:
            needed = gpus_needed(cfg, gpu, arch, backend)
        except UserError:  # a one-GPU stack asked for (--backend unsloth): no fsdp to offer
            checked = False
    fsdp = needed.needed.get("fsdp") if needed is not None else None
    return OutOfReach(gpu, total, changed, card_gb, fsdp, checked)


def _smallest_card(cfg: RunConfig, arch: Architecture, backend: str | None, total_gb: float) -> int | None:
    """The smallest whole-GiB plain size (`--gpu NGB`) on which `cfg` fits, not merely tight: each
    size re-estimated (its budget sets auto's checkpointing and Unsloth's loss chunks), from the
    total on the card at hand up to a little past where the tight line would clear it."""
    first = max(1, math.ceil(total_gb))
    last = min(CARD_SEARCH_GB, math.ceil(total_gb / (1 - C.TIGHT_FRACTION)) + 8)
    for size in range(first, last + 1):
        card = resolve_gpu(f"{size}GB")
        if estimate(cfg, arch, backend, gpu=card).verdict(card).status == FITS:
            return size
    return None
