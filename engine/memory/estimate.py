"""`estimate(cfg)`: the five terms, the torch-level and device-level peaks, and the verdict for a GPU.

Reported numbers are GiB (2**30 bytes), named `gb` as nvidia-smi and the protocol name them.
- torch_peak_gb: what torch.cuda.max_memory_reserved() shows at the step's peak;
- device_total_gb: what nvidia-smi shows: torch_peak + the CUDA context + paged optimizer state
  (managed memory, resident while there is room). The verdict uses device_total_gb: it is what
  has to fit in the card, and counting the evictable paged state keeps the verdict on the safe side.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import allocator, stacks
from engine.config import ALL_LINEAR, RunConfig
from engine.errors import UserError
from engine.memory import constants as C
from engine.memory import devices, flops, speed, terms
from engine.memory.architectures import Architecture, resolve_architecture
from engine.memory.gpus import Gpu, peak_tflops
from engine.models import quantization
from engine.models.quantization import Quantization
from engine.models.tiny import is_builtin
from engine.protocol import EstimateEvent, MemoryTerm

# The memory model's calibrated profiles: each stack's (engine.stacks), and hf-upcast, the usual
# tutorial recipe (prepare_model_for_kbit_training) that `qlc estimate --backend usual` compares.
BACKENDS = tuple(sorted({s.memory_profile for s in stacks.STACKS.values()} | {"hf-upcast"}))
BACKEND_ALIASES = {"usual": "hf-upcast", "upcast": "hf-upcast"}
TERM_NAMES = ("weights", "gradients", "optimizer", "activations", "workspace")
FITS, TIGHT, DOES_NOT_FIT = "fits", "tight", "does_not_fit"
MODULES_TO_SAVE = (terms.EMBED, terms.LM_HEAD)


@dataclass(frozen=True)
class Term:
    name: str
    gb: float
    parts: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    status: str  # fits, tight or does_not_fit
    used_gb: float  # the estimate the verdict compares: device_total_gb
    budget_gb: float
    headroom_gb: float  # budget - used; negative when it does not fit
    gpu: str
    basis: str = "device_total"

    @property
    def verdict(self) -> str:
        return self.status

    @property
    def fits(self) -> bool:
        return self.status != DOES_NOT_FIT

    def __str__(self) -> str:
        word = {FITS: "fits", TIGHT: "tight", DOES_NOT_FIT: "does not fit"}[self.status]
        room = (
            f"{self.headroom_gb:.2f} GiB headroom"
            if self.headroom_gb >= 0
            else f"{-self.headroom_gb:.2f} GiB over"
        )
        return f"{word}: {self.used_gb:.2f} of {self.budget_gb:.2f} GiB on {self.gpu} ({room})"


@dataclass(frozen=True)
class Estimate:
    arch: Architecture
    backend: str
    backend_reason: str
    seq_len: int
    micro_batch: int
    terms: tuple[Term, ...]
    torch_peak_gb: float  # max_memory_reserved at the peak
    torch_allocated_gb: float  # max_memory_allocated at the peak
    device_total_gb: float  # nvidia-smi: torch_peak + CUDA context + paged optimizer state
    peak_phase: str  # the moment of the step the peak is at
    verdict_basis: str = "device_total"
    checkpointed_layers: int = 0  # of arch.layers, after resolving train.gradient_checkpointing
    checkpoint_reason: str = ""
    grad_accum: int = 1  # with micro_batch: the step's rows as the estimate laid them out
    split_reason: str = ""  # why, where train.batch_split is auto
    notes: tuple[str, ...] = ()
    # The device-level constants used (engine.memory.devices): the GPU class and where its numbers
    # come from, as `qlc estimate` prints them.
    device_profile: str = ""
    # The expected relative error of the device total: the 90th percentile of the leave-one-
    # architecture-out errors measured for this backend (constants.ERROR_BAND).
    error_band_fraction: float = 0.0
    # The work of one trained token (engine.memory.flops), for the dashboard's utilisation.
    flops_per_token: float = 0.0

    @property
    def outside_torch_gb(self) -> float:
        """What the process holds outside PyTorch's pool besides paged state: the CUDA context and
        the kernel modules the backend loads."""
        ws = self.term("workspace").parts
        return ws.get("CUDA context (outside torch)", 0.0) + ws.get("kernel modules (outside torch)", 0.0)

    @property
    def error_band_gb(self) -> float:
        """The device total's expected error in GB (for "22.3 GB ± 0.5")."""
        return self.device_total_gb * self.error_band_fraction

    def term(self, name: str) -> Term:
        return next(t for t in self.terms if t.name == name)

    def verdict(self, gpu: Gpu) -> Verdict:
        used = self.device_total_gb
        headroom = gpu.budget_gb - used
        if headroom < 0:
            status = DOES_NOT_FIT
        elif headroom < C.TIGHT_FRACTION * gpu.budget_gb:
            status = TIGHT
        else:
            status = FITS
        return Verdict(status, used, gpu.budget_gb, headroom, gpu.label, self.verdict_basis)

    def to_event(self, gpu: Gpu | None = None) -> EstimateEvent:
        v = self.verdict(gpu) if gpu is not None else None
        return EstimateEvent(
            terms=[
                MemoryTerm(name=t.name, gb=round(t.gb, 4), parts={k: round(x, 4) for k, x in t.parts.items()})
                for t in self.terms
            ],
            torch_peak_gb=round(self.torch_peak_gb, 4),
            device_total_gb=round(self.device_total_gb, 4),
            budget_gb=round(gpu.budget_gb, 4) if gpu is not None else None,
            verdict=v.status if v else "",
            gpu=gpu.label if gpu is not None else "",
            checkpoint_reason=self.checkpoint_reason,
            flops_per_token=round(self.flops_per_token),
            peak_tflops=(peak_tflops(gpu) or 0.0) if gpu is not None else 0.0,
        )

    def to_dict(self, gpu: Gpu | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "arch": self.arch.name,
            "backend": self.backend,
            "backend_reason": self.backend_reason,
            "seq_len": self.seq_len,
            "micro_batch": self.micro_batch,
            "unit": "GiB (2**30 bytes)",
            "terms": [{"name": t.name, "gb": t.gb, "parts": dict(t.parts)} for t in self.terms],
            "torch_peak_gb": self.torch_peak_gb,
            "torch_allocated_gb": self.torch_allocated_gb,
            "device_total_gb": self.device_total_gb,
            "verdict_basis": self.verdict_basis,
            "peak_phase": self.peak_phase,
            "error_band_gb": self.error_band_gb,
            "error_band_fraction": self.error_band_fraction,
            "device_profile": self.device_profile,
            "notes": list(self.notes),
        }
        if gpu is not None:
            v = self.verdict(gpu)
            out["gpu"] = {
                "name": gpu.name,
                "label": gpu.label,
                "total_gb": gpu.total_gb,
                "budget_gb": gpu.budget_gb,
            }
            out["verdict"] = {
                "status": v.status,
                "headroom_gb": v.headroom_gb,
                "used_gb": v.used_gb,
                "basis": v.basis,
            }
        return out


# ---------------------------------------------------------------------------------------------
# Backend
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _nvidia_gpu_present() -> bool:
    """An NVIDIA GPU on this machine, asked through NVML (no CUDA context, no torch)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount() > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return False


def resolve_backend(
    cfg: RunConfig, backend: str | None = None, arch: Architecture | None = None, gpu: Gpu | None = None
) -> tuple[str, str]:
    """(memory profile to model, why). `backend` overrides hardware.backend; `auto` is decided by
    engine.stacks' rule on this machine (a CUDA GPU asked through NVML, without torch), by
    predicted speed on `gpu` where a speed model covers every stack that can run (`arch` known)."""
    want = (backend or cfg.hardware.backend or stacks.AUTO).lower()
    want = BACKEND_ALIASES.get(want, want)
    if want in BACKENDS:
        return want, "requested" if backend else "requested in the config"
    if want == stacks.AUTO:
        cuda = _nvidia_gpu_present()
        fast = speed_predictor(cfg, arch, gpu) if cuda and arch is not None and gpu is not None else None
        name, why = stacks.choose(stacks.AUTO, cuda=cuda, speed=fast)
        return stacks.STACKS[name].memory_profile, why
    raise UserError(
        f"backend {backend or cfg.hardware.backend!r}: unknown", f"choose one of auto, {', '.join(BACKENDS)}"
    )


def speed_predictor(
    cfg: RunConfig, arch: Architecture, gpu: Gpu, budget_gb: float | None = None
) -> stacks.SpeedOf:
    """What hardware.backend auto compares: each stack's predicted step on `gpu` for this run, laid
    out as that stack would run it there (its own checkpointing and batch split, then the fastest
    layout: Unsloth may fit a budget without recomputation where hf needs some). None for a stack
    no speed model covers on this card (_speed_model)."""
    budget = gpu.budget_gb if budget_gb is None else budget_gb

    def predict(stack_name: str) -> stacks.Predicted | None:
        profile = stacks.STACKS[stack_name].memory_profile
        model = _speed_model(cfg, profile, gpu)
        if model is None:
            return None
        k, mb, ga, _, _ = choose_layout(cfg, arch, profile, budget, gpu)
        work = model.work(cfg, arch, k, mb, ga)
        f = model.fit
        return stacks.Predicted(
            f.predict_s(work), model.basis, f.typical_error, f.covers(work), ratio_error=f.typical_ratio_error
        )

    return predict


@dataclass(frozen=True)
class _SpeedModel:
    """A stack's speed fit on the card at hand, with the card's peak its matmul term needs."""

    fit: speed.SpeedFit
    peak_tflops: float

    @property
    def basis(self) -> str:
        f = self.fit
        held = (
            f"median {f.typical_error:.0%}, worst {f.held_out_error:.0%}"
            if f.typical_error
            else f"within {f.held_out_error:.0%}"
        )
        return f"speed model of {f.configurations} configurations on {f.gpu}, held out {held}"

    def work(self, cfg: RunConfig, arch: Architecture, k: int, mb: int, ga: int) -> speed.StepWork:
        return speed.step_work(
            arch, seq_len=cfg.train.seq_len, micro_batch=mb, grad_accum=ga, r=cfg.lora.r,
            targets=_targets(cfg, arch), checkpointed=k, peak_tflops=self.peak_tflops,
        )  # fmt: skip

    def step_s(self, cfg: RunConfig, arch: Architecture, k: int, mb: int, ga: int) -> float:
        return self.fit.predict_s(self.work(cfg, arch, k, mb, ga))

    def takes(self, cfg: RunConfig, micro_batch: int) -> bool:
        return True  # every split its fit can time

    def extrapolates(self, cfg: RunConfig, arch: Architecture, k: int, mb: int, ga: int) -> bool:
        """Whether no step the fit was measured on lies near this layout (SpeedFit.covers)."""
        return bool(self.fit.covers(self.work(cfg, arch, k, mb, ga)))

    def cost(self, s: float, against: float | None = None) -> str:
        return (
            f"{s:.2f} against {against:.2f} s a step"
            if against is not None
            else f"predicted {s:.2f} s a step"
        )


def _speed_model(cfg: RunConfig, profile: str, gpu: Gpu) -> _SpeedModel | None:
    """The stack's fit measured on this card, for a 4-bit run (the fits were measured on 4-bit
    runs: a 16-bit base dequantizes nothing), on a card whose dense peak the catalog states."""
    if not loaded_quantization(cfg).load_in_4bit:
        return None
    fit, peak = speed.fit_for(profile, gpu.label), peak_tflops(gpu)
    return _SpeedModel(fit, peak) if fit is not None and peak else None


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------


def _targets(cfg: RunConfig, arch: Architecture) -> tuple[str, ...]:
    mods = arch.linear_modules()
    wanted = list(cfg.lora.target_modules)
    if wanted in (["all-linear"], ["all_linear"]):
        return tuple(mods)
    missing = [m for m in wanted if m not in mods]
    if missing:
        hint = f"{arch.name} has {', '.join(mods)}"
        if arch.fused_qkv and set(missing) <= set(ALL_LINEAR):
            hint += " (q/k/v and gate/up are fused in this architecture)"
        raise UserError(f"lora.target_modules: {', '.join(missing)} not found in {arch.name}", hint)
    return tuple(dict.fromkeys(wanted))


def plan_for(
    cfg: RunConfig,
    arch: Architecture,
    backend: str,
    budget_gb: float | None = None,
    padded: bool | None = None,
    checkpointed: int | None = None,
    liger: bool | None = None,
    expandable: bool | None = None,
    device: devices.DeviceProfile | None = None,
    even_rows: bool = False,
) -> terms.Plan:
    """`checkpointed` overrides train.gradient_checkpointing (the auto search sets it);
    `expandable` the allocator (None: what an engine started from this environment uses);
    `device` the GPU class (None: the safe default, engine.memory.devices)."""
    t, lo, q = cfg.train, cfg.lora, cfg.quant
    # The config is validated (engine.config): only what depends on the architecture is checked here.
    problems = []
    if t.seq_len > arch.max_positions:
        problems.append(
            f"train.seq_len: {t.seq_len} is above {arch.name}'s maximum of {arch.max_positions} positions"
        )
    unknown = [m for m in lo.modules_to_save if m not in MODULES_TO_SAVE]
    if unknown:
        problems.append(
            f"lora.modules_to_save: {', '.join(unknown)} not modelled (known: {', '.join(MODULES_TO_SAVE)})"
        )
    if problems:
        raise UserError("; ".join(problems))
    quant = loaded_quantization(cfg)
    return terms.Plan(
        arch=arch,
        backend=backend,
        micro_batch=t.micro_batch,
        seq_len=t.seq_len,
        r=lo.r,
        targets=_targets(cfg, arch),
        modules_to_save=tuple(dict.fromkeys(lo.modules_to_save)),
        dropout=lo.dropout > 0,
        load_in_4bit=quant.load_in_4bit,
        double_quant=quant.double_quant,
        vision_4bit=quant.load_in_4bit and not quant.keeps_16bit("vision_tower"),
        compute_bytes=4 if q.compute_dtype == "fp32" else 2,
        optimizer=t.optimizer,
        checkpointed_layers=fixed_checkpointing(cfg, arch) if checkpointed is None else checkpointed,
        attention=cfg.model.attn_implementation,
        budget_bytes=budget_gb * C.GIB if budget_gb is not None else None,
        packing=cfg.data.packing,
        padding_free=stacks.padding_free(backend),
        even_rows=even_rows and stacks.padding_free(backend),
        # Rows of different lengths padded to the longest: a mask on every layer. One row, packed
        # rows, or the padding-free row the Unsloth backend builds, need no padding mask.
        padded=(t.micro_batch > 1 and not cfg.data.packing and not stacks.padding_free(backend))
        if padded is None
        else padded,
        liger=(liger_runs_here() if liger is None else liger) and backend == "hf" and t.liger,
        expandable=allocator.expandable_segments() if expandable is None else expandable,
        grad_accum=max(1, int(t.grad_accum)),
        device=device or devices.default_profile(),
    )


def loaded_quantization(cfg: RunConfig) -> Quantization:
    """The weights' layout as they will be loaded: a pre-quantized checkpoint's own
    quantization_config (read from its config.json on disk, never over the network), else what
    `quant.*` asks for."""
    ckpt = _checkpoint_quantization(cfg.model.name_or_path, cfg.model.revision)
    if ckpt is not None:
        # Other methods (GPTQ, AWQ, fp8) are refused by the engine before loading
        # (quantization.check_request): counted as bitsandbytes 4-bit until then.
        return dataclasses.replace(ckpt, load_in_4bit=True) if not ckpt.is_bnb_4bit else ckpt
    q = cfg.quant
    asked = quantization.requested(q, q.compute_dtype)
    return asked or Quantization(load_in_4bit=False)


def _checkpoint_quantization(name: str, revision: str | None) -> Quantization | None:
    if is_builtin(name):
        return None
    try:
        local = Path(name).expanduser().is_dir()
    except (OSError, RuntimeError, ValueError):
        local = False
    if local:  # read every time: a folder on disk can change under a long-lived console
        return quantization.of_checkpoint(name, revision)
    return _cached_hub_quantization(name, revision)


@functools.lru_cache(maxsize=64)
def _cached_hub_quantization(name: str, revision: str | None) -> Quantization | None:
    """A hub id's, from the local hub cache only (a commit's files do not change)."""
    return quantization.of_checkpoint(name, revision)


@functools.lru_cache(maxsize=1)
def liger_runs_here() -> bool:
    """Whether the engine's hf backend would use Liger's kernels on this machine (engine.train.backends.
    hf.apply_kernels): liger-kernel installed and an NVIDIA GPU present."""
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    return _nvidia_gpu_present()


@dataclass(frozen=True)
class Share:
    """What one GPU of a run on several holds of a planned step (engine.memory.distributed builds
    it): auto's search has to spend the budget on the figure the verdict compares, the per-GPU
    total, not the one-GPU plan's (under FSDP that holds the whole model, under DDP it lacks the
    gradient buckets)."""

    total_gb: Callable[[Estimate, terms.Plan], float]  # a GPU's device total, from the one-GPU estimate
    label: str  # where the budget is spent, in words: "on each of 2 GPUs under fsdp"


def _device_total(cfg: RunConfig, arch: Architecture, plan: terms.Plan, share: Share | None) -> float:
    """The device total the verdict compares for `plan`: one GPU's, or a GPU's share of several."""
    one = _estimate_plan(cfg, arch, plan)
    return one.device_total_gb if share is None else share.total_gb(one, plan)


def fixed_checkpointing(cfg: RunConfig, arch: Architecture) -> int:
    """Checkpointed layers for true / false / N; auto counts as every layer until it is searched."""
    gc = cfg.train.gradient_checkpointing
    if isinstance(gc, bool):
        return arch.layers if gc else 0
    if isinstance(gc, int):
        return max(0, min(gc, arch.layers))
    return arch.layers


def choose_checkpointing(
    cfg: RunConfig,
    arch: Architecture,
    backend: str,
    budget_gb: float | None,
    padded: bool | None = None,
    liger: bool | None = None,
    expandable: bool | None = None,
    device: devices.DeviceProfile | None = None,
    share: Share | None = None,
) -> tuple[int, str]:
    """(checkpointed layers, why) for train.gradient_checkpointing; auto spends the budget.

    Checkpointing a layer recomputes its forward in backward (about a third of its work), so auto
    checkpoints the fewest layers whose estimate still "fits" the budget (under the tight line,
    which covers the model's error), and every layer when nothing less fits. `share`: a run on
    several GPUs, whose budget is each GPU's and whose estimate is a GPU's share of the step.
    """
    L = arch.layers
    gc = cfg.train.gradient_checkpointing
    if gc != "auto":
        k = fixed_checkpointing(cfg, arch)
        return k, f"train.gradient_checkpointing is {str(gc).lower()}: {k} of {L} layers"
    if budget_gb is None:
        return L, f"auto with no memory budget known: every layer ({L})"
    limit = budget_gb * (1 - C.TIGHT_FRACTION)
    per = f" {share.label}" if share is not None else ""

    def total(k: int) -> float:
        plan = plan_for(cfg, arch, backend, budget_gb, padded, k, liger, expandable, device)
        return _device_total(cfg, arch, plan, share)

    if total(0) <= limit:
        return 0, f"auto: the whole step fits {budget_gb:.1f} GiB{per} without checkpointing"
    if total(L) > limit:
        return L, f"auto: even with every layer checkpointed it needs more than {limit:.1f} GiB{per}"
    lo, hi = 0, L  # total(lo) > limit >= total(hi): memory falls as k grows
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if total(mid) <= limit else (mid, hi)
    return (
        hi,
        f"auto: {hi} of {L} layers checkpointed to fit {budget_gb:.1f} GiB{per} "
        f"(with {C.TIGHT_FRACTION:.0%} kept free)",
    )


def with_split(cfg: RunConfig, micro_batch: int, grad_accum: int) -> RunConfig:
    """cfg with the step's rows laid out as micro_batch x grad_accum."""
    train = dataclasses.replace(cfg.train, micro_batch=micro_batch, grad_accum=grad_accum)
    return dataclasses.replace(cfg, train=train)


def choose_split(
    cfg: RunConfig,
    arch: Architecture,
    backend: str,
    budget_gb: float | None,
    checkpointed: int,
    liger: bool | None = None,
    expandable: bool | None = None,
    device: devices.DeviceProfile | None = None,
    processes: int = 1,
) -> tuple[int, int, str]:
    """(micro_batch, grad_accum, why) for train.batch_split.

    auto, once no layer is checkpointed: the step's rows (micro_batch x grad_accum, kept exactly)
    run as the fewest micro-batches whose estimate still fits the budget under the tight line.
    Every micro-batch dequantizes each 4-bit weight in its forward and again in its backward, and
    launches the same kernels whatever its size: fewer, larger micro-batches do the same work in
    fewer passes. The training is the same: the trainer normalises the loss over the whole
    accumulated batch (transformers' num_items_in_batch), and the rows come in the same order.
    """
    t = cfg.train
    mb, ga = t.micro_batch, t.grad_accum
    if t.batch_split != "auto":
        return mb, ga, ""
    rows = mb * ga
    if ga == 1:
        return mb, ga, f"auto: {mb} rows already run as one micro-batch"
    if processes > 1:
        return mb, ga, "auto: kept as written with several processes (one GPU only for now)"
    if budget_gb is None:
        return mb, ga, "auto with no memory budget known: as written"
    if checkpointed > 0:
        return mb, ga, f"auto: kept as written while {checkpointed} of {arch.layers} layers are checkpointed"
    if not cfg.data.packing and not stacks.padding_free(backend):
        # hf pads each micro-batch to its longest row: a larger one would compute more padding.
        return (
            mb,
            ga,
            "auto: kept as written: unpacked rows are padded per micro-batch (data.packing: true lifts it)",
        )
    limit = budget_gb * (1 - C.TIGHT_FRACTION)
    for m in sorted((d for d in range(mb + 1, rows + 1) if rows % d == 0), reverse=True):
        c = with_split(cfg, m, rows // m)
        plan = plan_for(c, arch, backend, budget_gb, None, 0, liger, expandable, device)
        if _estimate_plan(c, arch, plan).device_total_gb <= limit:
            return m, rows // m, f"auto, written {mb} x {ga}: fits {budget_gb:.1f} GiB without checkpointing"
    return (
        mb,
        ga,
        f"auto: kept {mb} x {ga}: no larger micro-batch fits {budget_gb:.1f} GiB without checkpointing",
    )


@dataclass(frozen=True)
class StepForecast:
    """How fast a planned run should train on a card, from its stack's speed model."""

    step_s: float
    tokens_per_s: float
    utilisation: float | None  # model FLOPs utilisation (engine.memory.flops)
    basis: str  # the speed model it rests on
    # The host's floor sets the step (engine.memory.speed): the device waits on Python and launches
    # between short kernels, so more rows per micro-batch would cost the step little.
    host_bound: bool = False
    split_auto: bool = False  # train.batch_split is auto already: no need to suggest it

    def __str__(self) -> str:
        mfu = f", {self.utilisation:.0%} of the card's dense 16-bit peak" if self.utilisation else ""
        host = ""
        if self.host_bound:
            split = "" if self.split_auto else " (train.batch_split: auto re-splits the rows)"
            host = (
                "; bound by the host (launching each layer's kernels), not the GPU: fewer, larger "
                f"micro-batches would cost little more a step{split}"
            )
        return (
            f"{self.step_s:.2f} s a step, about {self.tokens_per_s:,.0f} tokens/s{mfu} ({self.basis}){host}"
        )


def forecast_step(cfg: RunConfig, est: Estimate, gpu: Gpu) -> StepForecast | None:
    """The estimate's plan (its checkpointing and split) timed by the speed model of its stack on
    `gpu`; None where no model covers them (_speed_model)."""
    model = _speed_model(cfg, est.backend, gpu)
    if model is None:
        return None
    work = model.work(cfg, est.arch, est.checkpointed_layers, est.micro_batch, est.grad_accum)
    step_s = model.fit.predict_s(work)
    tokens_per_s = work.tokens / step_s
    mfu = (
        flops.utilisation(tokens_per_s, est.flops_per_token, model.peak_tflops)
        if est.flops_per_token
        else None
    )
    outside = model.fit.covers(work)
    # The host floor is what an extrapolated fit knows least (speed.SpeedFit.covers): no hint then.
    host_bound = not outside and speed.host_s(model.fit.costs, work) > speed.device_s(model.fit.costs, work)
    return StepForecast(
        step_s=step_s,
        tokens_per_s=tokens_per_s,
        utilisation=mfu,
        basis=model.basis + (f"; an extrapolation: {outside}" if outside else ""),
        host_bound=host_bound,
        split_auto=cfg.train.batch_split == "auto",
    )


# A layout predicted faster by less than this keeps the one the memory rules chose: a tie within
# rounding is not worth a layout other than the one the rules would explain.
FASTER_BY = 0.01


class RecomputeRule:
    """Where no speed model covers the card: a layout's cost relative to the same rows run in one
    pass of 16384 tokens or more with no layer recomputed (constants.RECOMPUTE_SHARE, PASS_COST,
    both measured). At 24 GB the seed recipe's 2 x 2 recomputes 17 of 32 layers; 1 x 4 fits with
    none, and its shorter passes cost less than the recompute they save (on an H100, 0.79 of bare
    Unsloth's step against 0.87)."""

    basis = "recompute rule measured on an H100"
    min_tokens = min(C.PASS_COST)

    @classmethod
    def where_measured(cls, cfg: RunConfig, backend: str) -> RecomputeRule | None:
        """The rule where it was measured: Unsloth on a 4-bit base. (hf's recompute and passes
        were not timed against each other, and a 16-bit base dequantizes nothing per pass.)"""
        if backend == "unsloth" and loaded_quantization(cfg).load_in_4bit:
            return cls()
        return None

    def takes(self, cfg: RunConfig, micro_batch: int) -> bool:
        """Passes shorter than any measured are not taken (the written split always is)."""
        return micro_batch == cfg.train.micro_batch or micro_batch * cfg.train.seq_len >= self.min_tokens

    def extrapolates(self, cfg: RunConfig, arch: Architecture, k: int, mb: int, ga: int) -> bool:
        return False  # its range is takes'

    def step_s(self, cfg: RunConfig, arch: Architecture, k: int, mb: int, ga: int) -> float:
        recompute = 1 + C.RECOMPUTE_SHARE * k / max(arch.layers, 1)
        return recompute * pass_cost(mb * cfg.train.seq_len)

    def cost(self, s: float, against: float | None = None) -> str:
        return f"relative cost {s:.2f}" + (f" against {against:.2f}" if against is not None else "")


def pass_cost(tokens: int) -> float:
    """constants.PASS_COST at `tokens` per micro-batch, read on a log scale between its points (and
    held at its ends)."""
    points = sorted(C.PASS_COST.items())
    if tokens <= points[0][0]:
        return points[0][1]
    for (t0, c0), (t1, c1) in itertools.pairwise(points):
        if tokens <= t1:
            w = math.log(tokens / t0) / math.log(t1 / t0)
            return c0 + w * (c1 - c0)
    return points[-1][1]


def fastest_layout(
    cfg: RunConfig,
    arch: Architecture,
    backend: str,
    budget_gb: float | None,
    gpu: Gpu,
    chosen: tuple[int, int, int],
    liger: bool | None = None,
    expandable: bool | None = None,
) -> tuple[int, int, int, str, str] | None:
    """(checkpointed, micro_batch, grad_accum, checkpointing's why, split's why) of a faster layout
    than `chosen` (checkpointed, micro_batch, grad_accum, as the memory rules chose it), or None.

    With train.gradient_checkpointing and train.batch_split both auto, every split of the step's
    rows is planned with the fewest checkpointed layers that fit, and the one predicted fastest
    wins: by the stack's speed model on this card (_speed_model) where steps it was fitted on lie
    near every layout compared; where there is none, or a layout lies far from them, by the
    measured RecomputeRule (Unsloth on a 4-bit base; elsewhere the memory rules' layout stands).
    A smaller micro-batch may need fewer layers recomputed: at 24 GB, 1 x 4 with few layers
    checkpointed can beat 2 x 2 with many. The training is the same either way (choose_split says
    why). When the chosen layout does not fit at all, any split that fits is better."""
    t = cfg.train
    if t.batch_split != "auto" or t.gradient_checkpointing != "auto" or budget_gb is None:
        return None
    rows = t.micro_batch * t.grad_accum
    k0, m0, _ = chosen
    fit, rule = _speed_model(cfg, backend, gpu), RecomputeRule.where_measured(cfg, backend)
    if fit is None and rule is None:
        return None  # nothing ranks layouts here: no need to plan them
    limit = budget_gb * (1 - C.TIGHT_FRACTION)
    # hf pads each micro-batch to its longest row: a larger one would compute more padding.
    grow = cfg.data.packing or stacks.padding_free(backend)

    def total(c: RunConfig, k: int) -> float:
        plan = plan_for(c, arch, backend, budget_gb, None, k, liger, expandable, gpu.device)
        return _estimate_plan(c, arch, plan).device_total_gb

    layouts: list[tuple[int, int, str]] = []  # (checkpointed, micro-batch, why) of each split that fits
    for m in (d for d in range(1, rows + 1) if rows % d == 0 and (grow or d <= t.micro_batch)):
        c = with_split(cfg, m, rows // m)
        k, why = choose_checkpointing(c, arch, backend, budget_gb, None, liger, expandable, gpu.device)
        if total(c, k) <= limit:  # else not even every layer checkpointed fits at this micro-batch
            layouts.append((k, m, why))
    model: _SpeedModel | RecomputeRule | None = fit
    if fit is None or any(
        fit.extrapolates(cfg, arch, k, m, rows // m) for k, m, _ in [(k0, m0, ""), *layouts]
    ):
        # No fit, or a layout lies where the fit has no row: its predictions are acted on only
        # where they cover every layout compared (SpeedFit.covers); the measured rule ranks them
        # otherwise. (hf always compares one micro-batch a step of all the rows: with fits of one
        # micro-batch a step, hf's layouts of 3 or more rows stay as the memory rules chose them.)
        model = rule
    if model is None:
        return None
    fits0 = total(with_split(cfg, m0, rows // m0), k0) <= limit
    t0 = model.step_s(cfg, arch, k0, m0, rows // m0) if fits0 else math.inf
    best: tuple[float, int, int, str] | None = None
    for k, m, why in layouts:
        if not model.takes(cfg, m):
            continue
        s = model.step_s(cfg, arch, k, m, rows // m)
        if best is None or s < best[0]:
            best = (s, k, m, why)
    if best is None or best[0] > t0 * (1 - FASTER_BY):
        return None
    s, k, m, why = best
    than = (
        f"predicted {t0 / s:.2f}x the speed of {m0} x {rows // m0} with {k0} ({model.cost(s, t0)}"
        if fits0
        else f"fits where {m0} x {rows // m0} does not ({model.cost(s)}"
    )
    split = (
        f"auto, written {t.micro_batch} x {t.grad_accum}: {m} x {rows // m} with {k} layers checkpointed "
        f"{than}; {model.basis})"
    )
    return k, m, rows // m, why, split


def choose_layout(
    cfg: RunConfig,
    arch: Architecture,
    backend: str,
    budget_gb: float | None,
    gpu: Gpu | None = None,
    padded: bool | None = None,
    liger: bool | None = None,
    expandable: bool | None = None,
    processes: int = 1,
    share: Share | None = None,
) -> tuple[int, int, int, str, str]:
    """(checkpointed, micro_batch, grad_accum, checkpointing's why, split's why): the memory rules
    (choose_checkpointing, then choose_split), then on a known card the fastest layout where a
    speed model or the recompute rule says one beats theirs (fastest_layout; one process, rows as
    the config pads them).
    What `qlc estimate` shows and what hardware.backend auto predicts each stack at. `share`: one
    GPU's part of a run on several (choose_checkpointing)."""
    device = gpu.device if gpu is not None else None
    k, why = choose_checkpointing(cfg, arch, backend, budget_gb, padded, liger, expandable, device, share)
    mb, ga, split = choose_split(cfg, arch, backend, budget_gb, k, liger, expandable, device, processes)
    if gpu is not None and processes == 1 and padded is None:
        faster = fastest_layout(cfg, arch, backend, budget_gb, gpu, (k, mb, ga), liger, expandable)
        if faster is not None:
            return faster
    return k, mb, ga, why, split


# ---------------------------------------------------------------------------------------------
# Estimate
# ---------------------------------------------------------------------------------------------


def _gib(parts: dict[str, float]) -> dict[str, float]:
    return {k: v / C.GIB for k, v in parts.items() if v}


def estimate(
    cfg: RunConfig,
    arch: Architecture | None = None,
    backend: str | None = None,
    *,
    budget_gb: float | None = None,
    padded: bool | None = None,
    checkpointed: int | None = None,
    liger: bool | None = None,
    expandable: bool | None = None,
    gpu: Gpu | None = None,
    processes: int = 1,
    share: Share | None = None,
    even_rows: bool = False,
) -> Estimate:
    """The memory a training step of `cfg` needs at its peak.

    `backend` overrides cfg.hardware.backend (auto resolves as the engine would on this machine).
    `budget_gb` only matters for Unsloth, whose loss chunks shrink with the GPU's free memory;
    without it they are sized as on a large GPU (4 GiB chunks), which errs on the safe side.
    `padded` says whether micro-batches carry padding (an attention mask on every layer); by
    default they do when micro_batch > 1 without packing. Measurements on rows all seq_len long
    pass False. `checkpointed` fixes how many layers are checkpointed (a running engine's choice);
    `liger` whether the hf backend uses Liger's kernels (None: as the engine would on this machine);
    `expandable` whether the CUDA allocator grows expandable segments (None: as the engine started
    from this environment will, engine.allocator). `gpu` the card it runs on: its class sets the
    CUDA context and workspaces (engine.memory.devices), and its budget is the default `budget_gb`.
    `processes` the ranks of the run (per_gpu's base estimate: train.batch_split stays as written);
    `share` what one of them holds, so that auto checkpointing spends each GPU's budget on the
    per-GPU figure its verdict compares (engine.memory.distributed.per_gpu passes it).
    `even_rows` says that the Unsloth backend sends the micro-batches as rows of one length
    (a running engine knows it from its data; the layout search and `qlc estimate`, which have not
    read the data, count the one padding-free row, which needs a little more).
    """
    arch = arch or resolve_architecture(cfg)
    name, reason = resolve_backend(cfg, backend, arch, gpu)
    device = gpu.device if gpu is not None else None
    if budget_gb is None and gpu is not None:
        budget_gb = gpu.budget_gb
    split = ""
    if checkpointed is None:
        k, mb, ga, why, split = choose_layout(
            cfg, arch, name, budget_gb, gpu, padded, liger, expandable, processes, share
        )
        cfg = with_split(cfg, mb, ga)
    else:  # what a running engine decided (its split is already in cfg)
        k, why = (
            max(0, min(checkpointed, arch.layers)),
            f"{checkpointed} of {arch.layers} layers, as the run chose",
        )
    plan = plan_for(cfg, arch, name, budget_gb, padded, k, liger, expandable, device, even_rows)
    est = _estimate_plan(cfg, arch, plan)
    return dataclasses.replace(est, backend_reason=reason, checkpoint_reason=why, split_reason=split)


def _estimate_plan(cfg: RunConfig, arch: Architecture, plan: terms.Plan) -> Estimate:
    name = plan.backend

    weights = terms.weights(plan)
    grads = terms.gradients(plan)
    grad_bytes = sum(grads.values())
    opt_torch, paged = terms.optimizer_states(plan)
    workspaces = float(plan.device.workspace_bytes)
    static = sum(weights.values()) + sum(opt_torch.values()) + workspaces

    best: tuple[float, float, terms.Phase] | None = None
    for phase in terms.phases(plan):
        allocated = static + phase.grads * grad_bytes
        allocated += sum(phase.activations.values()) + sum(phase.workspace.values())
        slack = terms.allocator_slack(plan, phase)
        if best is None or allocated + slack > best[0] + best[1]:
            best = (allocated, slack, phase)
    assert best is not None
    allocated, slack, phase = best
    acts = phase.activations
    reserved = allocated + slack
    context = plan.device.context_gib * C.GIB
    modules = C.KERNEL_MODULES_GIB.get(plan.modules_key, 0.0) * C.GIB

    grad_parts = {k: v * phase.grads for k, v in grads.items()}
    if phase.grads < 1.0:
        grad_parts = {f"{k} ({phase.grads:.0%} alive at the peak)": v for k, v in grad_parts.items()}
    optimizer_parts = dict(opt_torch)
    if paged:
        optimizer_parts["paged states (managed memory, outside torch)"] = paged
    workspace = {
        "CUDA context (outside torch)": context,
        "kernel modules (outside torch)": modules,
        "cuBLAS + cuBLASLt workspaces": workspaces,
        **phase.workspace,
        "allocator slack (reserved - allocated)": slack,
    }
    term_parts = {
        "weights": weights,
        "gradients": grad_parts,
        "optimizer": optimizer_parts,
        "activations": acts,
        "workspace": workspace,
    }
    built = tuple(Term(n, sum(_gib(term_parts[n]).values()), _gib(term_parts[n])) for n in TERM_NAMES)

    notes = list(arch.notes)
    ckpt = _checkpoint_quantization(cfg.model.name_or_path, cfg.model.revision)
    if ckpt is not None:
        notes.append(f"weights counted as the checkpoint stores them: {ckpt.describe()}")
    if arch.vision is not None:
        notes.append("the vision tower is loaded beside the text stack (frozen): counted in the weights")
    if name == "unsloth" and not plan.unsloth_fast:
        notes.append(
            f"Unsloth loads {arch.family} through FastModel (no fused LoRA kernels): one architecture measured"
        )
    if not cfg.data.packing:
        notes.append("every row counted at train.seq_len tokens: shorter rows only lower the peak")
    if plan.padded:
        notes.append("micro-batches counted as padded: an attention mask on every layer")
    if name == "hf" and not plan.expandable:
        notes.append("CUDA allocator without expandable segments (PYTORCH_ALLOC_CONF): more slack")
    if plan.liger:
        notes.append("Liger's RMSNorm and SwiGLU kernels (installed, with a GPU): fewer saved activations")
    return Estimate(
        arch=arch,
        backend=name,
        backend_reason="",
        seq_len=plan.seq_len,
        micro_batch=plan.micro_batch,
        grad_accum=plan.grad_accum,
        terms=built,
        torch_peak_gb=reserved / C.GIB,
        torch_allocated_gb=allocated / C.GIB,
        device_total_gb=(reserved + context + modules + paged) / C.GIB,
        peak_phase=phase.name,
        notes=tuple(notes),
        checkpointed_layers=plan.checkpointed_layers,
        device_profile=plan.device.describe(),
        error_band_fraction=C.ERROR_BAND.get(name, max(C.ERROR_BAND.values())),
        flops_per_token=sum(
            flops.training_flops_per_token(
                arch,
                plan.seq_len,
                plan.r,
                plan.targets,
                plan.checkpointed_layers,
                lm_head_trained=terms.LM_HEAD in plan.modules_to_save,
            ).values()
        ),
    )
