"""Refit the memory model's fitted constants to measured records: a small least-squares problem.

The model (estimate.py, terms.py) reads every constant from engine/memory/constants.py at call
time, so a fit sets candidate values there (temporarily, `constants_set`), re-estimates each
record (calibration.estimate_record, the replay's own estimate) and minimises the squared relative
errors with Levenberg-Marquardt (forward differences, bounds by clipping; a handful of parameters
and at most a few hundred records, so no numerical library is needed).

What is fitted, and against which figure:
- torch level, per backend, against the torch peak (max_memory_reserved; peak allocated where the
  record says reserved was not clean):
  - hf: ACTIVATION_SCALE["hf"] (the saved-tensor inventory's scale), HF_SLACK_PER_KEPT_INPUT (the
    default allocator's slack) and/or HF_EXPANDABLE_SLACK_SHARE (its share with expandable
    segments), whichever allocator the records used, and HF_SLACK_PER_MASKED_LAYER_NO_GC (only
    when records have masked layers without checkpointing);
  - unsloth: UNSLOTH_DEQUANTIZED_WEIGHTS (a multiple of the largest dequantized weight),
    UNSLOTH_TOKEN_BYTES, ALLOCATOR_SLACK_FRACTION["unsloth"] and ALLOCATOR_SLACK_BASE_GIB["unsloth"]:
    the saved-tensor inventory itself (terms.py) is counted from Unsloth's kernels, not scaled;
- device level, per backend, against the run's own device peak (records whose device_method says
  they counted only the run's processes): KERNEL_MODULES_GIB of each kernel set the records used
  (hf; Unsloth's own kernels; Unsloth's FastModel path), what lies outside PyTorch's pool beyond
  the GPU class's bare CUDA context (engine.memory.devices, measured or sourced, never fitted),
  with the torch-level constants of the first stage.
Library facts (bitsandbytes block sizes, TRL's tile sizes, unsloth_zoo's chunk rows...) are never
fitted; neither are the whole numbers BACKWARD_MLP_GRADIENTS, UNSLOTH_BACKWARD_HIDDEN_GRADIENTS,
UNSLOTH_KEPT_LAYER_HIDDEN_TENSORS and LARGE_BUFFER_RESERVED_COPIES (no record trains lm_head).

`leave_one_architecture_out` fits on every architecture but one and predicts the one left out:
the error a user's unmeasured model should expect. `error_band` is the 90th percentile of those
held-out errors (constants.ERROR_BAND). bench/memory_table.py prints all three.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from engine.memory import constants as C
from engine.memory.calibration import CalibrationFile, CalibrationRecord, estimate_record
from engine.memory.gpus import Gpu


@dataclass(frozen=True)
class Param:
    """One fitted constant: a name in constants.py, a key when it is a per-backend dict, bounds."""

    name: str
    key: str | None
    lo: float
    hi: float

    @property
    def label(self) -> str:
        return f"{self.name}[{self.key}]" if self.key else self.name

    def get(self) -> float:
        value = getattr(C, self.name)
        return float(value[self.key] if self.key else value)


HF_SCALE = Param("ACTIVATION_SCALE", "hf", 0.5, 1.5)
HF_KEPT = Param("HF_SLACK_PER_KEPT_INPUT", None, 0.0, 2.0)
HF_MASKED = Param("HF_SLACK_PER_MASKED_LAYER_NO_GC", None, 0.0, 3.0)
HF_EXPANDABLE = Param("HF_EXPANDABLE_SLACK_SHARE", None, 0.0, 1.0)
HF_LIGER_DEFAULT = Param("HF_LIGER_DEFAULT_SLACK_SHARE", None, 0.0, 1.5)
UNSLOTH_PARAMS = (
    Param("UNSLOTH_DEQUANTIZED_WEIGHTS", None, 0.0, 10.0),
    Param("UNSLOTH_TOKEN_BYTES", None, 0.0, 50_000.0),
    Param("ALLOCATOR_SLACK_FRACTION", "unsloth", 0.0, 0.5),
    Param("ALLOCATOR_SLACK_BASE_GIB", "unsloth", 0.0, 1.0),
)


def modules_param(key: str) -> Param:
    """KERNEL_MODULES_GIB of one kernel set (terms.Plan.modules_key)."""
    return Param("KERNEL_MODULES_GIB", key, 0.0, 4.0)


@contextlib.contextmanager
def constants_set(params: Sequence[Param], values: Sequence[float]) -> Iterator[None]:
    """Give constants.py these values for the duration (per-backend dicts are copied, not edited)."""
    saved = {p.name: getattr(C, p.name) for p in params}
    try:
        for p, v in zip(params, values, strict=True):
            current = getattr(C, p.name)
            if p.key is None:
                setattr(C, p.name, v)
            else:
                setattr(C, p.name, {**current, p.key: v})
        yield
    finally:
        for name, value in saved.items():
            setattr(C, name, value)


@dataclass(frozen=True)
class Sample:
    """One measured record, with what it is compared against."""

    record: CalibrationRecord
    gpu: Gpu
    gpu_name: str
    torch_measured: float | None  # peak reserved (peak allocated when reserved was not clean)
    torch_kind: str  # "reserved" or "allocated"
    device_measured: float | None  # the run's own device peak

    @property
    def arch(self) -> str:
        return self.record.arch

    @property
    def backend(self) -> str:
        return self.record.backend

    @property
    def modules_key(self) -> str:
        """Which kernel set the run loaded (constants.KERNEL_MODULES_GIB)."""
        if self.backend != "unsloth":
            return self.backend
        from engine.memory.architectures import find_architecture

        family = find_architecture(self.arch).family
        return "unsloth" if family in C.UNSLOTH_FAST_FAMILIES else "unsloth-generic"

    def torch_error(self) -> float | None:
        if self.torch_measured is None:
            return None
        est = estimate_record(self.record, self.gpu)
        value = est.torch_peak_gb if self.torch_kind == "reserved" else est.torch_allocated_gb
        return (value + self.record.baseline) / self.torch_measured - 1

    def allocated_error(self) -> float | None:
        """Against peak allocated memory: what the model's tensors add up to, before any slack."""
        measured = self.record.peak_allocated_gib
        if measured is None:
            return None
        est = estimate_record(self.record, self.gpu)
        return (est.torch_allocated_gb + self.record.baseline) / measured - 1

    def device_error(self) -> float | None:
        if self.device_measured is None:
            return None
        est = estimate_record(self.record, self.gpu)
        return (est.device_total_gb + self.record.baseline) / self.device_measured - 1


def samples_from(files: Sequence[CalibrationFile]) -> list[Sample]:
    """Every record that ran and measured a torch peak, on the path the engine takes today
    (Unsloth records with padded micro-batches, and records superseded by a clean re-measurement, are
    left out, as the replay holds them to nothing).
    A configuration measured twice with the same figures (a repeat in a later call) counts once."""
    out = []
    seen: set[tuple[object, ...]] = set()
    for f in files:
        gpu = f.resolve_gpu()
        for r in f.records:
            if r.oom or r.superseded:
                continue
            key = (f.gpu, r.describe(), r.peak_allocated_gib, r.peak_reserved_gib, r.device_peak_gib)
            if key in seen:
                continue
            seen.add(key)
            if r.peak_reserved_gib is not None and r.reserved_clean:
                measured, kind = r.peak_reserved_gib, "reserved"
            elif r.peak_allocated_gib is not None:
                measured, kind = r.peak_allocated_gib, "allocated"
            else:
                continue
            device = r.device_peak_gib if r.device_clean else None
            out.append(Sample(r, gpu, f.gpu, measured, kind, device))
    return out


def torch_params(samples: Sequence[Sample], backend: str) -> list[Param]:
    """The torch-level constants these samples can tell apart: allocated_params, then slack_params."""
    return [*allocated_params(backend), *slack_params(samples, backend)]


def allocated_params(backend: str) -> list[Param]:
    """The constants of the tensors themselves, fitted against peak allocated memory."""
    if backend == "unsloth":
        return list(UNSLOTH_PARAMS[:2])
    return [HF_SCALE] if backend == "hf" else []


def slack_params(samples: Sequence[Sample], backend: str) -> list[Param]:
    """The caching allocator's slack constants, fitted against peak reserved memory once the
    tensors are (reserved - allocated is the allocator's, not the model's)."""
    if backend == "unsloth":
        return list(UNSLOTH_PARAMS[2:])
    if backend != "hf":
        return []
    params = []
    mine = [s for s in samples if s.backend == "hf"]
    if any(s.record.allocator != "expandable" for s in mine):
        params.append(HF_KEPT)
    if any(s.record.allocator != "expandable" and s.record.liger for s in mine):
        params.append(HF_LIGER_DEFAULT)
    if any(s.record.allocator == "expandable" for s in mine):
        params.append(HF_EXPANDABLE)
    if any(_masked_without_checkpointing(s.record) for s in mine):
        params.append(HF_MASKED)
    return params


def _masked_without_checkpointing(rec: CalibrationRecord) -> bool:
    from engine.memory.architectures import find_architecture

    try:
        arch = find_architecture(rec.arch)
    except Exception:
        return False
    kept = rec.checkpointed_layers is not None and rec.checkpointed_layers < arch.layers
    no_gc = not rec.gradient_checkpointing or kept
    return no_gc and bool(arch.sliding_window) and rec.seq_len >= arch.sliding_window


@dataclass
class Fit:
    """A fit's outcome: the values, and the relative errors before and after."""

    params: list[Param]
    before: list[float]
    after: list[float]
    errors_before: list[float]
    errors_after: list[float]
    iterations: int = 0
    notes: list[str] = field(default_factory=list)

    @staticmethod
    def _rms(errors: Sequence[float]) -> float:
        return math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else 0.0

    @property
    def rms_before(self) -> float:
        return self._rms(self.errors_before)

    @property
    def rms_after(self) -> float:
        return self._rms(self.errors_after)

    @property
    def worst_before(self) -> float:
        return max(self.errors_before, key=abs, default=0.0)

    @property
    def worst_after(self) -> float:
        return max(self.errors_after, key=abs, default=0.0)

    def describe(self) -> str:
        values = ", ".join(
            f"{p.label} {b:.4g} -> {a:.4g}"
            for p, b, a in zip(self.params, self.before, self.after, strict=True)
        )
        return (
            f"{values}; rms {self.rms_before:.1%} -> {self.rms_after:.1%}, "
            f"worst {self.worst_before:+.1%} -> {self.worst_after:+.1%} ({len(self.errors_after)} records)"
        )


def _errors(samples: Sequence[Sample], kind: str) -> list[float]:
    out = []
    for s in samples:
        if kind == "torch":
            e = s.torch_error()
        elif kind == "allocated":
            e = s.allocated_error()
        else:
            e = s.device_error()
        if e is not None:
            out.append(e)
    return out


def fit(
    samples: Sequence[Sample],
    params: Sequence[Param],
    kind: str = "torch",
    iterations: int = 25,
    extra: tuple[Sequence[Param], Sequence[float]] = ((), ()),
) -> Fit:
    """Least squares of the relative errors (`kind` "torch" or "device") over `params`; `extra`
    holds other constants fixed at given values meanwhile (the first stage's, for the device)."""
    params = list(params)
    x0 = [p.get() for p in params]

    def residuals(x: Sequence[float]) -> list[float]:
        with constants_set([*extra[0], *params], [*extra[1], *x]):
            return _errors(samples, kind)

    r0 = residuals(x0)
    if not params or not r0:
        return Fit(params, x0, x0, r0, r0)
    x, iters, notes = _levenberg_marquardt(
        residuals, x0, [p.lo for p in params], [p.hi for p in params], iterations
    )
    return Fit(params, x0, x, r0, residuals(x), iters, notes)


def _levenberg_marquardt(
    fun: Callable[[Sequence[float]], list[float]],
    x0: Sequence[float],
    lo: Sequence[float],
    hi: Sequence[float],
    iterations: int,
) -> tuple[list[float], int, list[str]]:
    x = list(x0)
    r = fun(x)
    cost = sum(v * v for v in r)
    damping = 1e-3
    notes: list[str] = []
    n = len(x)
    it = 0
    for it in range(1, iterations + 1):
        jac = []  # columns: d r / d x_j
        for j in range(n):
            h = 1e-4 * max(abs(x[j]), hi[j] - lo[j], 1e-6)
            step = list(x)
            step[j] = x[j] + h if x[j] + h <= hi[j] else x[j] - h
            rj = fun(step)
            jac.append([(a - b) / (step[j] - x[j]) for a, b in zip(rj, r, strict=True)])
        jtj = [[sum(a * b for a, b in zip(jac[i], jac[k], strict=True)) for k in range(n)] for i in range(n)]
        jtr = [sum(a * b for a, b in zip(jac[i], r, strict=True)) for i in range(n)]
        improved = False
        for _ in range(8):
            lhs = [
                [jtj[i][k] + (damping * (jtj[i][i] + 1e-12) if i == k else 0.0) for k in range(n)]
                for i in range(n)
            ]
            delta = _solve(lhs, [-g for g in jtr])
            trial = [
                min(max(xi + di, lo_i), hi_i) for xi, di, lo_i, hi_i in zip(x, delta, lo, hi, strict=True)
            ]
            rt = fun(trial)
            trial_cost = sum(v * v for v in rt)
            if trial_cost < cost:
                gain = cost - trial_cost
                x, r, cost = trial, rt, trial_cost
                damping = max(damping / 3, 1e-9)
                improved = True
                if gain < 1e-10 * max(cost, 1e-12):
                    return x, it, notes
                break
            damping *= 4
        if not improved:
            break
    return x, it, notes


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting; a singular direction gets no step."""
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda i: abs(m[i][col]))
        if abs(m[pivot][col]) < 1e-18:
            continue
        m[col], m[pivot] = m[pivot], m[col]
        for i in range(col + 1, n):
            f = m[i][col] / m[col][col]
            for k in range(col, n + 1):
                m[i][k] -= f * m[col][k]
    x = [0.0] * n
    for i in range(n - 1, -1, -1):
        if abs(m[i][i]) < 1e-18:
            continue
        x[i] = (m[i][n] - sum(m[i][k] * x[k] for k in range(i + 1, n))) / m[i][i]
    return x


@dataclass
class BackendFit:
    backend: str
    torch: Fit
    device: Fit | None


def device_params(samples: Sequence[Sample]) -> list[Param]:
    """KERNEL_MODULES_GIB of each kernel set these samples measured the device figure of."""
    keys = sorted({s.modules_key for s in samples if s.device_measured is not None})
    return [modules_param(k) for k in keys]


def fit_torch(samples: Sequence[Sample], backend: str) -> Fit:
    """The torch-level constants in two steps: the tensors' against peak allocated memory, then the
    allocator's slack against peak reserved with those held. Reported as one fit of the torch peak."""
    mine = [s for s in samples if s.backend == backend]
    alloc = allocated_params(backend)
    slack = slack_params(mine, backend)
    first = fit(mine, alloc, "allocated")
    second = fit(mine, slack, "torch", extra=(first.params, first.after))
    before = [p.get() for p in [*alloc, *slack]]
    with constants_set(alloc, before[: len(alloc)]):
        errors_before = _errors(mine, "torch")
    return Fit(
        [*alloc, *slack],
        before,
        [*first.after, *second.after],
        errors_before,
        second.errors_after,
        first.iterations + second.iterations,
    )


def outside_torch(s: Sample) -> float | None:
    """What the run's process held outside PyTorch's pool beyond its GPU class's bare CUDA context:
    device peak - peak reserved - paged state - context (GiB); None without a clean device figure."""
    r = s.record
    if s.device_measured is None or r.peak_reserved_gib is None or not r.reserved_clean:
        return None
    paged = r.paged_state_gib
    if paged is None:
        paged = sum(
            v for k, v in estimate_record(r, s.gpu).term("optimizer").parts.items() if k.startswith("paged")
        )
    return s.device_measured - r.peak_reserved_gib - paged - s.gpu.device.context_gib


def fit_modules(samples: Sequence[Sample], torch: Fit) -> Fit | None:
    """KERNEL_MODULES_GIB of each kernel set: the mean of the records' memory outside PyTorch's pool
    beyond the bare context (outside_torch), a direct measurement the torch-level fit cannot bend."""
    with_device = [s for s in samples if s.device_measured is not None]
    params = device_params(with_device)
    if not params:
        return None
    values = []
    for p in params:
        figures = [
            x for s in with_device if s.modules_key == p.key for x in [outside_torch(s)] if x is not None
        ]
        values.append(sum(figures) / len(figures) if figures else p.get())
    before = [p.get() for p in params]
    with constants_set(torch.params, torch.after):
        with constants_set(params, before):
            errors_before = _errors(with_device, "device")
        with constants_set(params, values):
            errors_after = _errors(with_device, "device")
    return Fit(params, before, values, errors_before, errors_after)


def fit_backend(samples: Sequence[Sample], backend: str) -> BackendFit:
    """Stage 1 the torch-level constants, stage 2 the device-level ones, for one backend."""
    mine = [s for s in samples if s.backend == backend]
    t = fit_torch(mine, backend)
    return BackendFit(backend, t, fit_modules(mine, t))


@dataclass(frozen=True)
class HeldOut:
    """The records of one architecture, predicted by constants fitted without it."""

    backend: str
    arch: str
    records: int
    torch_errors: tuple[float, ...]
    device_errors: tuple[float, ...]
    fitted: str

    @property
    def torch_worst(self) -> float | None:
        return max(self.torch_errors, key=abs) if self.torch_errors else None

    @property
    def device_worst(self) -> float | None:
        return max(self.device_errors, key=abs) if self.device_errors else None


def leave_one_architecture_out(samples: Sequence[Sample], backend: str) -> list[HeldOut]:
    """For each architecture of `backend`'s records: fit on the others, predict it."""
    mine = [s for s in samples if s.backend == backend]
    out = []
    for arch in sorted({s.arch for s in mine}):
        train = [s for s in mine if s.arch != arch]
        test = [s for s in mine if s.arch == arch]
        if not train:
            continue
        bf = fit_backend(train, backend)
        params = [*bf.torch.params, *(bf.device.params if bf.device else [])]
        values = [*bf.torch.after, *(bf.device.after if bf.device else [])]
        # A kernel set only the held-out architecture used has nothing to be fitted on: it takes
        # the fitted value of the backend's other set (Unsloth's FastModel path gets FastLlamaModel's).
        fitted_keys = {p.key for p in params if p.name == "KERNEL_MODULES_GIB"}
        for key in sorted({s.modules_key for s in test if s.device_measured is not None} - fitted_keys):
            others = [v for p, v in zip(params, values, strict=True) if p.name == "KERNEL_MODULES_GIB"]
            if others:
                params.append(modules_param(key))
                values.append(others[0])
        with constants_set(params, values):
            torch_errors = tuple(_errors(test, "torch"))
            device_errors = tuple(_errors(test, "device")) if bf.device else ()
        fitted = ", ".join(f"{p.label} {v:.3g}" for p, v in zip(params, values, strict=True))
        out.append(HeldOut(backend, arch, len(test), torch_errors, device_errors, fitted))
    return out


def error_band(held: Sequence[HeldOut], kind: str = "device", quantile: float = 0.9) -> float:
    """The `quantile` of |held-out error| over every held-out record (kind "torch" or "device"):
    the expected relative error of an estimate for an architecture it was not fitted to."""
    errors = sorted(abs(e) for h in held for e in (h.device_errors if kind == "device" else h.torch_errors))
    if not errors:
        return 0.0
    # Nearest rank: the smallest error at or above the quantile of the records.
    rank = max(1, math.ceil(quantile * len(errors)))
    return errors[rank - 1]


def band_for(held: Sequence[HeldOut], quantile: float = 0.9) -> float:
    """constants.ERROR_BAND of a backend: the larger of the torch-peak and device-total quantiles
    (the device total is what the verdict compares; more records measured the torch peak)."""
    return max(error_band(held, "torch", quantile), error_band(held, "device", quantile))
