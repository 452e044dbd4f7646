"""The calibration matrix: which configurations run, in which processes, in which order of value,
and what each is guessed to cost (GPU seconds, device memory), for bench/calibration_matrix.py.

Rows span what users run (issue 15): six catalog architectures from 1B to 14B (tied and untied
embeddings, vocabularies from 32K to 262K, GQA ratios 3 to 7, q/k/v biases, sliding windows),
sequence lengths 1024 to 16384, ranks 8 to 128, attention-only and all-linear targets, micro-batch
1 to 8, full, partial and no checkpointing, on both backends.

Each process loads one architecture once and sweeps its configurations in-process:
- hf: one process per architecture; each configuration gets fresh adapters (peft's unload, then
  the engine's own apply_lora), so ranks and targets change in-process;
- unsloth: one process per (architecture, LoRA group): Unsloth cannot take its adapters off again
  (its fused kernels are patched onto the layers), and it only ever adds layers it does not
  checkpoint, so a process runs its configurations from every layer checkpointed to partial to
  none.

The time guesses only order and budget the work: the driver's deadline decides what runs.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

from engine.memory.constants import UNSLOTH_FAST_FAMILIES

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")


# Unsloth marks the layers it should not checkpoint and never unmarks them: once a process has run
# a partial configuration it cannot checkpoint every layer again (none stays possible: that turns
# every layer's flag off). Its partial configurations therefore come last.
def unsloth_order(c: ConfigPlan) -> tuple[bool, int, float]:
    """An Unsloth process's configurations, the fewest tokens per micro-batch first: Unsloth's
    global buffers (the offloaded checkpoints' staging buffers) grow to the largest micro-batch a
    process has run and are never freed, so a short configuration measured after a long one
    carried the long one's buffers (Gemma-3-1B at 1024 tokens after 16384: 0.07 GiB held beyond
    its own, 2026-12-05). Partial checkpointing goes last (it reconfigures the model)."""
    return (c.shape.gc == "half", c.shape.tokens, -c.value)


def unsloth_candidates(remaining: list[ConfigPlan], half_done: bool) -> list[ConfigPlan]:
    """An Unsloth process's next configurations, in the order to try them (the first that fits
    the time left runs): the shortest micro-batches first (unsloth_order), partial checkpointing
    last, since it reconfigures the model and closes off full checkpointing in that process. A
    partial configuration worth more than every other left goes first, with only those without
    checkpointing after it (they remain possible)."""
    ordered = sorted((c for c in remaining if not (half_done and c.shape.gc == "all")), key=unsloth_order)
    halves = [c for c in ordered if c.shape.gc == "half"]
    others = [c for c in ordered if c.shape.gc != "half"]
    if halves and (not others or max(c.value for c in halves) > max(c.value for c in others)):
        return halves + [c for c in ordered if c.shape.gc == "none"]
    return ordered


@dataclass(frozen=True)
class Lora:
    r: int
    targets: str  # "all" (every linear layer) or "attn" (attention projections only)

    @property
    def name(self) -> str:
        return f"r{self.r}-{self.targets}"


@dataclass(frozen=True)
class Shape:
    seq: int
    mb: int
    gc: str  # "all", "half" (the first half of the layers checkpointed) or "none"
    value: float
    ga: int = 1  # micro-batches per optimizer step

    @property
    def name(self) -> str:
        gc = {"all": "", "half": "-half", "none": "-nogc"}[self.gc]
        ga = f"a{self.ga}" if self.ga > 1 else ""
        return f"s{self.seq}x{self.mb}{ga}{gc}"

    @property
    def tokens(self) -> int:
        """Tokens a micro-batch (what the memory peak follows)."""
        return self.seq * self.mb

    @property
    def step_tokens(self) -> int:
        return self.tokens * self.ga


BASE, HIGH = Lora(16, "all"), Lora(128, "all")
ATTN8, ATTN16 = Lora(8, "attn"), Lora(16, "attn")

SEED = Shape(4096, 2, "all", 10)  # the seed recipe's shape
LONG = Shape(16384, 1, "all", 9)
NOGC = Shape(2048, 2, "none", 8.5)
PARTIAL = Shape(4096, 1, "half", 8)
WIDE = Shape(2048, 8, "all", 7)
SHORT = Shape(1024, 1, "all", 6)
HIGH_LONG = Shape(8192, 1, "all", 9)  # Unsloth's worst miss: a smaller model, a high rank, 8K
HIGH_PARTIAL = Shape(2048, 4, "half", 5)
ATTN_MB4 = Shape(2048, 4, "all", 7)
ATTN_MB4_NOGC = Shape(2048, 4, "none", 6)  # issue 16: hf beat Unsloth here on a 7B
ATTN_LONG = Shape(8192, 1, "all", 5)
# Several micro-batches a step (build_plan's grad_accum, on the rank-16 all-linear group): rows of
# one micro-batch a step cannot tell a step's fixed costs from a micro-batch's, and the H100 fit
# of 2026-12-06 predicted the 8B's 1 x 4 steps 12-60% too long. Worth little to the memory fit:
# the peak follows the micro-batch.
GA_NOGC = Shape(2048, 1, "none", 3, ga=4)
GA_NOGC_LONG = Shape(4096, 1, "none", 3, ga=4)  # the seed recipe's layout at 24 GB
GA_HALF = Shape(4096, 2, "half", 3, ga=2)
GA_ALL = Shape(4096, 1, "all", 3, ga=4)
GA_SHAPES = (GA_NOGC, GA_NOGC_LONG, GA_HALF, GA_ALL)

SMALL_GROUPS = {
    BASE: (SEED, LONG, SHORT, PARTIAL, WIDE, NOGC),
    HIGH: (HIGH_LONG, HIGH_PARTIAL),
    ATTN8: (ATTN_MB4, ATTN_LONG),
}
SEVEN_GROUPS = {
    BASE: (SEED, LONG, SHORT, PARTIAL, WIDE, NOGC),
    HIGH: (HIGH_LONG,),
    ATTN16: (ATTN_MB4, ATTN_MB4_NOGC),
}


@dataclass(frozen=True)
class ArchPlan:
    name: str
    value: float  # how much the architecture adds to the fit (orders builds and grants)
    hf: dict[Lora, tuple[Shape, ...]]
    unsloth: dict[Lora, tuple[Shape, ...]]


ARCH_PLANS: tuple[ArchPlan, ...] = (
    ArchPlan("llama-3.2-3b", 1.0, SMALL_GROUPS, SMALL_GROUPS),
    ArchPlan("qwen2.5-7b", 0.95, SEVEN_GROUPS, SEVEN_GROUPS),
    ArchPlan("llama-3.2-1b", 0.9, SMALL_GROUPS, {BASE: SMALL_GROUPS[BASE], HIGH: SMALL_GROUPS[HIGH]}),
    ArchPlan(
        "qwen2.5-14b",
        0.85,
        {BASE: (SEED, LONG, SHORT, PARTIAL, NOGC), HIGH: (HIGH_LONG,)},
        {BASE: (SEED, LONG, SHORT, PARTIAL)},
    ),
    # Unsloth's generic path (FastModel) on the sliding-window architecture with a 262k vocabulary:
    # every group, for the padding-free row's masks at several ranks and targets.
    ArchPlan(
        "gemma-3-1b",
        0.75,
        SMALL_GROUPS,
        {**SMALL_GROUPS, ATTN8: (*SMALL_GROUPS[ATTN8], ATTN_MB4_NOGC)},
    ),
    ArchPlan(
        "mistral-7b",
        0.7,
        {BASE: (SEED, LONG, SHORT, NOGC)},
        {BASE: (SEED, LONG, SHORT, PARTIAL)},
    ),
)
UNSLOTH_VALUE = 1.1  # Unsloth's torch peak is the figure that misses (issue 15, item 1)
DEPTH_DECAY = 0.8


# Any other catalog architecture (--arch): its seed-recipe shape and the three checkpointing modes,
# and attention-only adapters with and without checkpointing (a layer without MLP adapters saves
# less: on Unsloth's generic path, Gemma-3-1B, 2026-12-05).
GENERIC_GROUPS = {BASE: (SEED, SHORT, PARTIAL, NOGC), ATTN16: (SEED, NOGC)}


@dataclass(frozen=True)
class E2ESpec:
    """A configuration run end to end through the real `qlc train` (a fresh engine process)."""

    name: str
    arch: str
    backend: str
    lora: Lora
    shape: Shape
    steps: int = 8
    same_as: str | None = None  # the in-process configuration it repeats, if any

    def checkpointed(self, layers: int) -> int:
        return checkpointed_layers(self.shape.gc, layers)


E2E_SPECS: tuple[E2ESpec, ...] = (
    # The same configuration as an in-process record: do the two methods agree?
    E2ESpec("e2e-qwen7b-hf-seed", "qwen2.5-7b", "hf", BASE, SEED, same_as="qwen2.5-7b/hf/r16-all/s4096x2"),
    # Held out: Unsloth with partial checkpointing at rank 64 (no in-process record has either).
    E2ESpec("e2e-3b-unsloth-r64-half", "llama-3.2-3b", "unsloth", Lora(64, "all"), Shape(8192, 1, "half", 8)),
    # Held out: hf, rank 32 attention-only, micro-batch 4, a quarter of the layers kept.
    E2ESpec("e2e-1b-hf-r32-attn", "llama-3.2-1b", "hf", Lora(32, "attn"), Shape(4096, 4, "half", 6)),
)


def checkpointed_layers(gc: str, layers: int) -> int:
    return {"all": layers, "half": layers // 2, "none": 0}[gc]


@functools.cache
def architecture(name: str) -> Any:
    from engine.memory.architectures import catalog

    return catalog()[name]


def targets(arch: str, lora: Lora) -> list[str]:
    mods = list(architecture(arch).linear_modules())
    return mods if lora.targets == "all" else [m for m in mods if m in ATTN_MODULES]


@dataclass(frozen=True)
class ConfigPlan:
    id: str
    arch: str
    backend: str
    lora: Lora
    shape: Shape
    steps: int
    value: float
    est_seconds: float  # GPU seconds of the training window, guessed
    est_device_gib: float  # the memory model's device total

    def spec(self, dry_run: bool = False) -> dict[str, Any]:
        """What the worker needs (JSON)."""
        a = architecture(self.arch)
        seq, mb, steps = self.shape.seq, self.shape.mb, self.steps
        if dry_run:
            seq, steps = max(16, seq // 64), 3
        return {
            "id": self.id,
            "arch": self.arch,
            "backend": self.backend,
            "lora_r": self.lora.r,
            "lora_alpha": 2 * self.lora.r,
            "lora_group": self.lora.name,
            "target_modules": targets(self.arch, self.lora),
            "seq_len": seq,
            "micro_batch": mb,
            "grad_accum": self.shape.ga,
            "gc": self.shape.gc,
            "layers": a.layers,
            "checkpointed_layers": checkpointed_layers(self.shape.gc, a.layers),
            "steps": steps,
            "value": self.value,
            "est_seconds": self.est_seconds,
            "est_device_gib": self.est_device_gib,
        }


@dataclass
class WorkerPlan:
    name: str
    arch: str
    backend: str
    configs: list[ConfigPlan] = field(default_factory=list)
    value: float = 0.0
    resident_gib: float = 0.0  # weights + CUDA context, held while the process lives
    peak_extra_gib: float = 0.0  # the most a configuration adds on top of that
    startup_seconds: float = 0.0  # imports, load and warm-up, guessed

    @property
    def max_seq(self) -> int:
        return max(c.shape.seq for c in self.configs)


@dataclass
class Plan:
    archs: list[str]
    workers: list[WorkerPlan]
    e2e: list[E2ESpec]

    def gpu_seconds(self) -> float:
        return sum(c.est_seconds for w in self.workers for c in w.configs)

    def table(self) -> list[str]:
        """The planned rows, for the log and the docs."""
        out = [
            f"{'id':48s} {'value':>5s} {'steps':>5s} {'est s':>6s} {'est dev GB':>10s}",
        ]
        for w in sorted(self.workers, key=lambda w: -w.value):
            for c in w.configs:
                out.append(
                    f"{c.id:48s} {c.value:5.2f} {c.steps:5d} {c.est_seconds:6.1f} {c.est_device_gib:10.1f}"
                )
        return out


# ---------------------------------------------------------------------------------------------
# Guesses: seconds and memory (planning only)
# ---------------------------------------------------------------------------------------------


def flops_per_token(arch: str, shape: Shape) -> float:
    """Training FLOPs per token with a frozen 4-bit base: forward, the input-gradient backward
    (no weight gradients), the recompute of checkpointed layers, attention and the LM head."""
    a = architecture(arch)
    linear = a.param_counts()["linear"]
    recompute = {"all": 1.0, "half": 0.5, "none": 0.0}[shape.gc]
    body = 2 * linear * (2 + recompute)
    head = 2 * a.vocab * a.hidden * 2
    attention = 2 * shape.seq * a.q_dim * a.layers * (3 + recompute)
    return body + head + attention


def step_seconds_guess(arch: str, backend: str, shape: Shape) -> float:
    """Fitted by eye to the H100 steps in bench/results (8B: ~405 TFLOP/s effective; 1B: overhead-
    bound); Unsloth about 10% faster."""
    a = architecture(arch)
    efficiency = 480e12 * a.hidden / (a.hidden + 768)
    seconds = (
        shape.step_tokens * flops_per_token(arch, shape) / efficiency + (0.1 + 0.005 * a.layers) * shape.ga
    )
    return seconds * (0.9 if backend == "unsloth" else 1.0)


def folder_gib(arch: str) -> float:
    return architecture(arch).param_counts()["total"] * 2 / 2**30


def build_seconds_guess(arch: str) -> float:
    """Child start and imports, random init on the GPU, save (8B measured 20-23 s on the H100)."""
    return 8.0 + 1.4 * folder_gib(arch)


def startup_seconds_guess(arch: str, backend: str) -> float:
    """Imports, load through the engine's path, warm-up steps (Unsloth imports in ~30 s and
    compiles in its first steps, 20-40 s)."""
    load = 4.0 + 1.0 * folder_gib(arch)
    return (30.0 + load + 30.0) if backend == "unsloth" else (10.0 + load + 5.0)


def _estimate(arch: str, backend: str, lora: Lora, shape: Shape, budget_gib: float) -> Any:
    from engine.config import config_from_dict
    from engine.memory.estimate import estimate

    cfg = config_from_dict(
        {
            "model": {"name_or_path": arch, "arch": arch},
            "lora": {"r": lora.r, "alpha": 2 * lora.r, "target_modules": targets(arch, lora)},
            "data": {"source": "calibration-plan"},
            "train": {
                "seq_len": shape.seq,
                "micro_batch": shape.mb,
                "gradient_checkpointing": checkpointed_layers(shape.gc, architecture(arch).layers),
            },
            "hardware": {"backend": backend},
        },
        source="calibration plan",
    )
    return estimate(
        cfg, backend=backend, budget_gb=budget_gib, padded=False, liger=backend == "hf", expandable=True
    )


def device_gib(arch: str, backend: str, lora: Lora, shape: Shape, budget_gib: float) -> float:
    return float(_estimate(arch, backend, lora, shape, budget_gib).device_total_gb)


def resident_gib(arch: str, backend: str, lora: Lora, budget_gib: float) -> float:
    """What a process holds between configurations: the weights, the CUDA context and kernels."""
    est = _estimate(arch, backend, lora, SHORT, budget_gib)
    return float(est.term("weights").gb) + est.outside_torch_gb


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def steps_for(seconds: float) -> int:
    """Five optimizer steps: two to skip (the first builds the optimizer state, the second still
    settles), three to time; four for the slowest steps."""
    return 4 if seconds > 3.0 else 5


def build_plan(
    archs: list[str] | None = None,
    backends: tuple[str, ...] = ("hf", "unsloth"),
    budget_gib: float = 140.0,
    max_device_gib: float = 60.0,
    e2e: bool = True,
    unsloth_process_per_gc: bool = False,
    grad_accum: bool = False,
) -> Plan:
    """Every worker and configuration of the matrix, most valuable first. Configurations the memory
    model puts above `max_device_gib` are left out: concurrent processes share the GPU.

    `unsloth_process_per_gc`: one Unsloth process per (architecture, LoRA group, checkpointing
    mode), so that no configuration runs on a model Unsloth has reconfigured (get_peft_model asked
    again): the rows without or with partial checkpointing of the 2026-12-05 table ran after a
    fully checkpointed one in their process, slower per token than it (docs/backends.md).

    `grad_accum`: the base LoRA group also runs GA_SHAPES, several micro-batches a step."""
    chosen = [p for p in ARCH_PLANS if archs is None or p.name in archs]
    for name in archs or []:
        if name not in {p.name for p in ARCH_PLANS}:
            architecture(name)  # a catalog entry, or KeyError
            chosen.append(ArchPlan(name, 0.5, GENERIC_GROUPS, GENERIC_GROUPS))
    workers: list[WorkerPlan] = []
    for ap in chosen:
        a = architecture(ap.name)
        for backend in backends:
            groups = ap.hf if backend == "hf" else ap.unsloth
            bonus = UNSLOTH_VALUE if backend == "unsloth" else 1.0
            hf_worker = WorkerPlan(f"{ap.name}-hf", ap.name, "hf") if backend == "hf" else None
            for lora, shapes in groups.items():
                unsloth: dict[str, WorkerPlan] = {}  # this LoRA group's processes, by name
                for shape in (*shapes, *GA_SHAPES) if grad_accum and lora == BASE else shapes:
                    if shape.seq > a.max_positions:
                        continue
                    worker = hf_worker
                    if worker is None:
                        name = f"{ap.name}-unsloth-{lora.name}"
                        # Unsloth's generic path (no fast family) cannot change a process's
                        # checkpointing mode at all: one process per mode there, always.
                        per_gc = unsloth_process_per_gc or a.family not in UNSLOTH_FAST_FAMILIES
                        name += f"-gc-{shape.gc}" if per_gc else ""
                        worker = unsloth.setdefault(name, WorkerPlan(name, ap.name, "unsloth"))
                    dev = device_gib(ap.name, backend, lora, shape, budget_gib)
                    if dev > max_device_gib:
                        continue
                    step = step_seconds_guess(ap.name, backend, shape)
                    steps = steps_for(step)
                    first = 4.0 if backend == "unsloth" else 2.0  # a new shape's first step
                    worker.configs.append(
                        ConfigPlan(
                            id=f"{ap.name}/{backend}/{lora.name}/{shape.name}",
                            arch=ap.name,
                            backend=backend,
                            lora=lora,
                            shape=shape,
                            steps=steps,
                            value=round(ap.value * shape.value * bonus, 3),
                            est_seconds=round(steps * step + first, 1),
                            est_device_gib=round(dev, 2),
                        )
                    )
                workers += [w for w in unsloth.values() if w.configs]
            if hf_worker is not None and hf_worker.configs:
                workers.append(hf_worker)
    for w in workers:
        # Breadth before depth: within a LoRA group each further configuration is worth a fifth
        # less, so every process's best configurations are granted before anyone's fifth.
        for group in {c.lora for c in w.configs}:
            ranked = sorted((c for c in w.configs if c.lora == group), key=lambda c: -c.value)
            decayed = {c.id: round(c.value * DEPTH_DECAY**k, 3) for k, c in enumerate(ranked)}
            w.configs = [dataclasses.replace(c, value=decayed.get(c.id, c.value)) for c in w.configs]
        w.configs.sort(key=unsloth_order if w.backend == "unsloth" else lambda c: -c.value)
        w.value = max(c.value for c in w.configs)
        lora = w.configs[0].lora
        w.resident_gib = resident_gib(w.arch, w.backend, lora, budget_gib)
        w.peak_extra_gib = max(c.est_device_gib for c in w.configs) - w.resident_gib
        w.startup_seconds = startup_seconds_guess(w.arch, w.backend)
    names = {p.name for p in chosen}
    specs = [e for e in E2E_SPECS if e.arch in names and e.backend in backends] if e2e else []
    return Plan([p.name for p in chosen], workers, specs)


def dry_run_shape(shape: Shape) -> Shape:
    return dataclasses.replace(shape, seq=max(16, shape.seq // 64))
