"""Advice for a config that does not fit: each change re-estimated with `estimate`, never guessed.

Single changes first, ranked: those that make the run fit, gentlest first (a smaller micro-batch
with more accumulation changes nothing the model learns; a shorter sequence truncates data), then
by memory saved. When no single change fits, combinations are searched: each member's value (a
rank, a length, a micro-batch) is chosen again given the others, so a combination asks no more
than it needs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.config import RunConfig
from engine.memory.architectures import Architecture, resolve_architecture
from engine.memory.estimate import DOES_NOT_FIT, FITS, TIGHT, Estimate, estimate, resolve_backend
from engine.memory.fit import SEQ_STEP, _keeping_effective_batch, _largest, closest_grad_accum, with_changes
from engine.memory.gpus import Gpu

MIN_RANK = 8
MAX_COMBINATIONS = 3
STATUS_ORDER = {FITS: 0, TIGHT: 1, DOES_NOT_FIT: 2}
# What a change costs the run, gentlest first: more accumulation changes nothing the model learns;
# checkpointing and the optimizer cost speed; the rest change what is trained or on what data.
COST = {
    kind: i
    for i, kind in enumerate(
        (
            "micro_batch",
            "gradient_checkpointing",
            "optimizer",
            "attention",
            "backend",
            "modules_to_save",
            "rank",
            "seq_len",
        )
    )
}


@dataclass(frozen=True)
class Advice:
    text: str  # what to change, in words
    overrides: list[str]  # the same as --set values
    kinds: tuple[str, ...]  # micro_batch, gradient_checkpointing, optimizer, attention, backend, ...
    before_gb: float  # device total before the change
    after_gb: float  # device total after it, re-estimated
    status: str  # the verdict after the change
    headroom_gb: float  # after the change
    # The changed config and the stack its estimate models: what it would take on another card is
    # re-estimated from them (distributed.out_of_reach), not scaled from after_gb.
    config: RunConfig | None = field(default=None, repr=False, compare=False)
    profile: str = field(default="", repr=False, compare=False)

    @property
    def saves_gb(self) -> float:
        return self.before_gb - self.after_gb

    @property
    def fits(self) -> bool:
        return self.status != DOES_NOT_FIT

    def __str__(self) -> str:
        word = {FITS: "fits", TIGHT: "tight", DOES_NOT_FIT: "still does not fit"}[self.status]
        return f"{self.text}: {self.after_gb:.1f} GiB (saves {self.saves_gb:.1f} GiB), {word}"


@dataclass(frozen=True)
class _State:
    cfg: RunConfig
    backend: str
    text: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()


class _Advisor:
    """Holds the GPU and architecture so every change is estimated the same way."""

    def __init__(self, cfg: RunConfig, gpu: Gpu, arch: Architecture, backend: str) -> None:
        self.cfg, self.gpu, self.arch, self.backend = cfg, gpu, arch, backend

    def estimate(self, s: _State) -> Estimate:
        return estimate(s.cfg, self.arch, s.backend, gpu=self.gpu)

    def fits(self, s: _State) -> bool:
        return self.estimate(s).verdict(self.gpu).status == FITS

    def _then(
        self, s: _State, kind: str, text: str, changes: dict[str, object], backend: str | None = None
    ) -> _State:
        overrides = [f"{k}={_yaml(v)}" for k, v in changes.items()]
        if backend is not None:
            overrides.append(f"hardware.backend={backend}")
        return _State(
            with_changes(s.cfg, **changes) if changes else s.cfg,
            backend or s.backend,
            (*s.text, text),
            (*s.overrides, *overrides),
            (*s.kinds, kind),
        )

    # Each change: None when it does not apply to this config.

    def gradient_checkpointing(self, s: _State) -> _State | None:
        # auto already checkpoints every layer when nothing less fits.
        if s.cfg.train.gradient_checkpointing in (True, "auto"):
            return None
        return self._then(
            s,
            "gradient_checkpointing",
            "turn gradient checkpointing on (every layer)",
            {"train.gradient_checkpointing": True},
        )

    def optimizer(self, s: _State) -> _State | None:
        if s.cfg.train.optimizer in ("paged_adamw_8bit", "adamw_8bit"):
            return None
        return self._then(
            s,
            "optimizer",
            f"8-bit optimizer ({s.cfg.train.optimizer} -> paged_adamw_8bit)",
            {"train.optimizer": "paged_adamw_8bit"},
        )

    def attention(self, s: _State) -> _State | None:
        if s.cfg.model.attn_implementation != "eager":
            return None
        return self._then(
            s, "attention", "SDPA attention instead of eager", {"model.attn_implementation": "sdpa"}
        )

    def other_backend(self, s: _State) -> _State | None:
        if s.backend == "hf-upcast":
            text = "skip prepare_model_for_kbit_training (the engine's hf backend keeps bf16)"
            return self._then(s, "backend", text, {}, "hf")
        if s.backend == "hf":
            return self._then(
                s, "backend", "the unsloth backend (needs a CUDA GPU and pip install unsloth)", {}, "unsloth"
            )
        return self._then(s, "backend", "the hf backend", {}, "hf")

    def drop_modules_to_save(self, s: _State) -> _State | None:
        mts = s.cfg.lora.modules_to_save
        if not mts:
            return None
        return self._then(
            s, "modules_to_save", f"drop modules_to_save ({', '.join(mts)})", {"lora.modules_to_save": []}
        )

    def micro_batch(self, s: _State) -> _State | None:
        t = s.cfg.train
        if t.micro_batch <= 1:
            return None
        best = _largest(
            lambda mb: self.fits(self._then(s, "", "", {"train.micro_batch": mb})), 1, t.micro_batch - 1
        )
        mb = _keeping_effective_batch(max(best, 1), s.cfg.effective_batch)
        ga = closest_grad_accum(s.cfg.effective_batch, mb)
        text = (
            f"micro-batch {t.micro_batch} -> {mb}, grad-accum {t.grad_accum} -> {ga} (effective batch kept)"
        )
        return self._then(s, "micro_batch", text, {"train.micro_batch": mb, "train.grad_accum": ga})

    def rank(self, s: _State) -> _State | None:
        lo = s.cfg.lora
        if lo.r <= MIN_RANK:
            return None
        ranks = []
        r = lo.r // 2
        while r >= MIN_RANK:
            ranks.append(r)
            r //= 2
        if not ranks:
            ranks = [MIN_RANK]
        chosen = next(
            (r for r in ranks if self.fits(self._then(s, "", "", _rank_changes(lo.r, lo.alpha, r)))),
            ranks[-1],
        )
        return self._then(
            s,
            "rank",
            f"LoRA rank {lo.r} -> {chosen} (alpha scaled with it)",
            _rank_changes(lo.r, lo.alpha, chosen),
        )

    def seq_len(self, s: _State) -> _State | None:
        seq = s.cfg.train.seq_len
        if seq <= SEQ_STEP:
            return None
        top = (seq - 1) // SEQ_STEP
        k = _largest(lambda n: self.fits(self._then(s, "", "", {"train.seq_len": n * SEQ_STEP})), 1, top)
        new = k * SEQ_STEP if k >= 1 else max(SEQ_STEP, seq // 2 // SEQ_STEP * SEQ_STEP)
        return self._then(
            s, "seq_len", f"seq_len {seq} -> {new} (longer rows are truncated)", {"train.seq_len": new}
        )

    def changes(self) -> list[tuple[str, Callable[[_State], _State | None]]]:
        """(kind, change) in the order a combination applies them: the searches (micro-batch,
        rank, length) last, so that they pick the mildest value that fits after the others."""
        return [
            ("gradient_checkpointing", self.gradient_checkpointing),
            ("optimizer", self.optimizer),
            ("attention", self.attention),
            ("backend", self.other_backend),
            ("modules_to_save", self.drop_modules_to_save),
            ("micro_batch", self.micro_batch),
            ("rank", self.rank),
            ("seq_len", self.seq_len),
        ]


def _rank_changes(r: int, alpha: int, new: int) -> dict[str, object]:
    return {"lora.r": new, "lora.alpha": max(1, round(alpha * new / r))}


def _yaml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def _advice(advisor: _Advisor, s: _State, before: float) -> Advice:
    est = advisor.estimate(s)
    v = est.verdict(advisor.gpu)
    return Advice(
        "; ".join(s.text),
        list(s.overrides),
        s.kinds,
        before,
        est.device_total_gb,
        v.status,
        v.headroom_gb,
        s.cfg,
        s.backend,
    )


def advise(
    cfg: RunConfig, gpu: Gpu, arch: Architecture | None = None, backend: str | None = None
) -> list[Advice]:
    """Ranked changes for a config that does not fit `gpu` (an empty list when it fits)."""
    arch = arch or resolve_architecture(cfg)
    name, _ = resolve_backend(cfg, backend, arch, gpu)  # the stack estimate() models, speed model and all
    advisor = _Advisor(cfg, gpu, arch, name)
    start = _State(cfg, name)
    base = advisor.estimate(start)
    if base.verdict(gpu).status == FITS:
        return []
    before = base.device_total_gb
    steps = advisor.changes()

    singles: list[Advice] = []
    applicable = []
    for kind, step in steps:
        changed = step(start)
        if changed is None:
            continue
        advice = _advice(advisor, changed, before)
        if advice.saves_gb <= 0:
            continue  # it would need as much or more (the Unsloth backend, on some recipes)
        applicable.append((kind, step))
        singles.append(advice)
    # Changes that fit come first, the gentlest first; the others by what they save.
    singles.sort(key=lambda a: (STATUS_ORDER[a.status], COST[a.kinds[0]] if a.fits else 0, -a.saves_gb))
    if any(a.status == FITS for a in singles):
        return singles

    combos: list[Advice] = []
    for size in range(2, min(len(applicable), 4) + 1):
        for group in itertools.combinations(applicable, size):  # kept in the order they apply
            state: _State | None = start
            for _, step in group:
                state = step(state) if state is not None else None
            if state is not None and len(state.kinds) == size:
                advice = _advice(advisor, state, before)
                if advice.status == FITS:
                    combos.append(advice)
        if combos:
            break
    if not combos and len(applicable) > 1:  # every change at once, to show how far off it still is
        state = start
        for _, step in applicable:
            state = step(state) or state
        combos.append(_advice(advisor, state, before))
    combos.sort(key=lambda a: (sum(COST[k] for k in a.kinds), -a.headroom_gb))
    return singles + combos[:MAX_COMBINATIONS]
