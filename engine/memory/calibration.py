"""Measured peaks, as bench/ records them, and their replay through the estimator.

A records file (bench/results/memory-calibration-*.json, bench/results/anchors-*.json):

    {"date": "2026-11-23", "gpu": "NVIDIA H100 80GB HBM3", "versions": {"torch": "2.11.0", ...},
     "gpu_total_gib": 79.65,                       # optional: when "gpu" is not a catalog card
     "records": [{"arch": "llama-3.1-8b", "backend": "hf", "seq_len": 4096, "micro_batch": 2,
                  "gradient_checkpointing": true, "lora_r": 32,
                  "target_modules": ["q_proj", ...], "modules_to_save": [],
                  "optimizer": "paged_adamw_8bit",
                  "peak_allocated_gib": 10.19, "peak_reserved_gib": 10.78,
                  "device_peak_gib": null, "oom": false}]}

`backend` is hf, unsloth, or hf-upcast (the usual recipe with prepare_model_for_kbit_training).
Optional record keys: lora_dropout, attn_implementation, after_load_allocated_gib, note;
allocator ("expandable" or "default", the CUDA allocator's segments; default when absent);
padding_free (Unsloth micro-batches sent as one row, as the engine and bare Unsloth do; an
Unsloth record without it measured padded micro-batches and is replayed as "superseded");
reserved_clean (false when the process held another model's allocator cache: compare allocated);
baseline_allocated_gib (memory already allocated before the model loaded, left by an earlier one
in the same process; also a file-level key): added to the estimate before comparing, except where
the file says `"baseline_additive": false` or comes from bench/calibration_matrix.py: there it is
what the process's warm-up left (the cuBLAS and cuBLASLt workspaces, Unsloth's global buffers),
which a run creates for itself and the estimate already counts (the end-to-end qwen2.5-7b hf run
peaked at 8.6625 GiB allocated, its in-process twin with 0.064 GiB of "baseline" at 8.6630);
superseded_by (added to a record after it was measured: the file that measured its configuration
again, cleanly, and why this one is not: replayed as "superseded", held to no tolerance, left out of
fits); grad_accum (micro-batches per optimizer step; also a file-level key; 1 when absent, as
bench/calibrate_memory.py and bench/calibration_matrix.py run);
vision_tower (true when a multimodal architecture was measured with its vision tower loaded; every
record before 2026-12 built the text stack alone, from bench/gpu_common's text configs).
From bench/calibration_matrix.py (2026-12 on): id (the configuration's name), source ("qlc train"
for a run through the real CLI), device_method (how device_peak_gib was measured:
"nvml-per-process..." counts the run's own processes; absent in older files, whose device figure
is the whole device's used memory), paged_state_gib (the paged optimizer state it measured),
tokens_per_second and speed_valid (no other activity overlapped its timed steps). Other keys
(timings) are ignored. A measured peak may be null when the run did not measure it (a CPU run).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import config_from_dict
from engine.errors import UserError
from engine.memory.architectures import resolve_architecture
from engine.memory.devices import profile_for_name
from engine.memory.estimate import FITS, Estimate, estimate
from engine.memory.gpus import Gpu, resolve_gpu

REQUIRED = (
    "arch",
    "backend",
    "seq_len",
    "micro_batch",
    "gradient_checkpointing",
    "lora_r",
    "target_modules",
    "modules_to_save",
    "optimizer",
    "oom",
)
TOLERANCE = 0.05  # the replay's bound on |estimate / measured - 1| (torch peak)
# The bound on the device total, for records that measured the run's own processes. The held-out
# (leave-one-architecture-out) device errors it rests on: bench/memory_table.py, docs/memory-model.md.
DEVICE_TOLERANCE = 0.05


@dataclass(frozen=True)
class CalibrationRecord:
    arch: str
    backend: str
    seq_len: int
    micro_batch: int
    gradient_checkpointing: bool
    lora_r: int
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    optimizer: str
    oom: bool
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    device_peak_gib: float | None = None
    lora_dropout: float = 0.0
    attn_implementation: str = "sdpa"
    after_load_allocated_gib: float | None = None
    reserved_clean: bool = True
    checkpointed_layers: int | None = None  # partial checkpointing; None: all or none, per the flag
    liger: bool = False
    allocator: str = "default"  # "expandable" when the run had expandable segments
    padding_free: bool = False  # Unsloth rows as one padding-free row (the engine's since 2026-11-23)
    even_rows: bool = False  # ... or, rows of one length, as n x seq_len (the engine's since 2026-12-06)
    baseline_allocated_gib: float = 0.0
    vision_tower: bool = False  # the multimodal checkpoint's vision tower was loaded too
    note: str = ""
    id: str = ""
    source: str = ""
    device_method: str = ""  # "" in files before bench/calibration_matrix.py: the whole device's figure
    paged_state_gib: float | None = None
    tokens_per_second: float | None = None
    speed_valid: bool | None = None
    grad_accum: int = 1
    baseline_additive: bool = True
    superseded_by: str = ""  # a clean re-measurement elsewhere replaces this record

    @property
    def baseline(self) -> float:
        """What the replay adds to the estimate for memory the process held before this run."""
        return self.baseline_allocated_gib if self.baseline_additive else 0.0

    @property
    def superseded(self) -> bool:
        """Replayed for the record and held to nothing: measured again cleanly elsewhere, or an
        Unsloth record of padded micro-batches, which the engine's Unsloth backend no longer builds."""
        return bool(self.superseded_by) or (self.backend == "unsloth" and not self.padding_free)

    @property
    def device_clean(self) -> bool:
        """A device figure of the run's own processes (not the whole device's, nor missing)."""
        m = self.device_method
        return self.device_peak_gib is not None and (m.startswith("nvml-per-process") or m == "baseline")

    def describe(self) -> str:
        mts = f" mts={'+'.join(self.modules_to_save)}" if self.modules_to_save else ""
        gc = "gc" if self.gradient_checkpointing else "no-gc"
        if self.checkpointed_layers is not None:
            gc = f"gc {self.checkpointed_layers} layers"
        liger = " liger" if self.liger else ""
        if self.backend == "unsloth":
            rows = "" if self.padding_free else " padded"
        else:
            rows = " expandable" if self.allocator == "expandable" else ""
        return f"{self.arch} {self.backend}{liger}{rows} seq {self.seq_len} mb {self.micro_batch} r {self.lora_r} {gc}{mts}"


@dataclass(frozen=True)
class CalibrationFile:
    path: Path
    date: str
    gpu: str
    versions: dict[str, str]
    records: tuple[CalibrationRecord, ...]
    gpu_total_gib: float | None = None

    def resolve_gpu(self) -> Gpu:
        """The GPU the records were measured on: its catalog entry, or gpu_total_gib."""
        if self.gpu_total_gib is not None:
            total = self.gpu_total_gib
            return Gpu(self.gpu, self.gpu, total, total, "size", profile_for_name(self.gpu, total))
        return resolve_gpu(self.gpu)


@dataclass(frozen=True)
class ReplayResult:
    record: CalibrationRecord
    estimate: Estimate
    measured_gib: float | None  # peak reserved, else peak allocated; None for an OOM or no measurement
    estimated_gib: float | None  # the matching estimate (torch_peak_gb or torch_allocated_gb)
    compared: str  # "reserved", "allocated", "oom", "superseded" (a path the engine left) or "none"
    estimated_fits: bool  # the verdict on the measuring GPU is "fits"
    problems: list[str] = field(default_factory=list)
    device_measured_gib: float | None = None  # the run's own device peak (device_clean records)
    device_estimated_gib: float | None = None  # the estimate's device_total_gb
    device_problems: list[str] = field(
        default_factory=list
    )  # device totals off by more than DEVICE_TOLERANCE

    @property
    def error(self) -> float | None:
        if self.measured_gib is None or self.estimated_gib is None:
            return None
        return self.estimated_gib / self.measured_gib - 1

    @property
    def device_error(self) -> float | None:
        if self.device_measured_gib is None or self.device_estimated_gib is None:
            return None
        return self.device_estimated_gib / self.device_measured_gib - 1


def parse_record(
    data: Any, where: str, baseline: float = 0.0, grad_accum: int = 1, additive: bool = True
) -> CalibrationRecord:
    """One record of a records file (a JSON object), checked; `where` names it in errors."""
    return _record(data, where, baseline, grad_accum, additive)


def _record(
    data: Any, where: str, baseline: float = 0.0, grad_accum: int = 1, additive: bool = True
) -> CalibrationRecord:
    if not isinstance(data, dict):
        raise UserError(f"{where}: a record must be a JSON object")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)}")

    def num(key: str) -> float | None:
        value = data.get(key)
        return None if value is None else float(value)

    try:
        return CalibrationRecord(
            arch=str(data["arch"]),
            backend=str(data["backend"]),
            seq_len=int(data["seq_len"]),
            micro_batch=int(data["micro_batch"]),
            gradient_checkpointing=bool(data["gradient_checkpointing"]),
            lora_r=int(data["lora_r"]),
            target_modules=tuple(str(m) for m in data["target_modules"]),
            modules_to_save=tuple(str(m) for m in data["modules_to_save"] or []),
            optimizer=str(data["optimizer"]),
            oom=bool(data["oom"]),
            peak_allocated_gib=num("peak_allocated_gib"),
            peak_reserved_gib=num("peak_reserved_gib"),
            device_peak_gib=num("device_peak_gib"),
            lora_dropout=float(data.get("lora_dropout", 0.0) or 0.0),
            attn_implementation=str(data.get("attn_implementation", "sdpa")),
            after_load_allocated_gib=num("after_load_allocated_gib"),
            reserved_clean=bool(data.get("reserved_clean", True)),
            baseline_allocated_gib=float(data.get("baseline_allocated_gib", baseline) or 0.0),
            note=str(data.get("note", "")),
            checkpointed_layers=None
            if data.get("checkpointed_layers") is None
            else int(data["checkpointed_layers"]),
            liger=bool(data.get("liger", False)),
            allocator=str(data.get("allocator", "default")),
            padding_free=bool(data.get("padding_free", False)),
            even_rows=bool(data.get("even_rows", False)),
            id=str(data.get("id", "") or ""),
            source=str(data.get("source", "") or ""),
            device_method=str(data.get("device_method", "") or ""),
            paged_state_gib=num("paged_state_gib"),
            tokens_per_second=num("tokens_per_second"),
            speed_valid=None if data.get("speed_valid") is None else bool(data["speed_valid"]),
            vision_tower=bool(data.get("vision_tower", False)),
            grad_accum=int(data.get("grad_accum", grad_accum) or 1),
            baseline_additive=bool(data.get("baseline_additive", additive)),
            superseded_by=str(data.get("superseded_by", "") or ""),
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: bad value ({exc})") from None


def load_calibration(path: Path | str) -> CalibrationFile:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read calibration records ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise UserError(f"{path}: expected an object with a list of records")
    baseline = float(data.get("baseline_allocated_gib") or 0.0)
    grad_accum = int(data.get("grad_accum") or 1)
    # The calibration matrix's baseline is its warm-up's leftovers, which the run re-creates itself.
    additive = bool(data.get("baseline_additive", data.get("source") != "bench/calibration_matrix.py"))
    records = tuple(
        _record(r, f"{path.name} record {i}", baseline, grad_accum, additive)
        for i, r in enumerate(data["records"])
    )
    total = data.get("gpu_total_gib")
    return CalibrationFile(
        path=path,
        date=str(data.get("date", "")),
        gpu=str(data.get("gpu", "")),
        versions={str(k): str(v) for k, v in (data.get("versions") or {}).items()},
        records=records,
        gpu_total_gib=float(total) if total is not None else None,
    )


def record_config(rec: CalibrationRecord) -> Any:
    """The RunConfig a record measured (what the harness leaves at defaults stays at defaults)."""
    return config_from_dict(
        {
            "model": {
                "name_or_path": rec.arch,
                "arch": rec.arch,
                "attn_implementation": rec.attn_implementation,
            },
            "lora": {
                "r": rec.lora_r,
                "alpha": 2 * rec.lora_r,
                "dropout": rec.lora_dropout,
                "target_modules": list(rec.target_modules),
                "modules_to_save": list(rec.modules_to_save),
            },
            "data": {"source": "calibration-record"},
            "train": {
                "seq_len": rec.seq_len,
                "micro_batch": rec.micro_batch,
                "grad_accum": rec.grad_accum,
                "gradient_checkpointing": rec.checkpointed_layers
                if rec.checkpointed_layers is not None
                else rec.gradient_checkpointing,
                "optimizer": rec.optimizer,
            },
            "hardware": {"backend": "unsloth" if rec.backend == "unsloth" else "hf"},
        },
        source=rec.describe(),
    )


@functools.lru_cache(maxsize=4096)
def _cached_config(rec: CalibrationRecord) -> Any:
    return record_config(rec)


def estimate_record(rec: CalibrationRecord, gpu: Gpu) -> Estimate:
    """The estimate a record is compared with: its config on the GPU it ran on. The harness's rows
    are all seq_len tokens long: no padding, so no attention mask. (The config is built once per
    record: a refit estimates each record many times, engine/memory/fit_constants.py.)"""
    cfg = _cached_config(rec)
    arch = resolve_architecture(cfg)
    if not rec.vision_tower:  # measured on the text stack alone
        arch = dataclasses.replace(arch, vision=None)
    return estimate(
        cfg,
        arch,
        backend=rec.backend,
        gpu=gpu,
        padded=False,
        liger=rec.liger,
        expandable=rec.allocator == "expandable",
        even_rows=rec.even_rows,
    )


def replay(calibration: CalibrationFile) -> list[ReplayResult]:
    """Estimate every record; a result's problems say where the model misses the measurement."""
    gpu = calibration.resolve_gpu()
    results = []
    for rec in calibration.records:
        est = estimate_record(rec, gpu)
        fits = est.verdict(gpu).status == FITS
        problems: list[str] = []
        if rec.oom:
            measured = estimated = None
            compared = "oom"
            if fits:
                problems.append(
                    f"{rec.describe()}: ran out of memory, estimated to fit ({est.device_total_gb:.2f} GiB)"
                )
        elif rec.superseded and rec.peak_allocated_gib is not None:
            measured = rec.peak_reserved_gib if rec.reserved_clean else rec.peak_allocated_gib
            estimated = est.torch_peak_gb if rec.reserved_clean else est.torch_allocated_gb
            compared = "superseded"
        elif rec.peak_reserved_gib is not None and rec.reserved_clean:
            measured, estimated, compared = rec.peak_reserved_gib, est.torch_peak_gb, "reserved"
        elif rec.peak_allocated_gib is not None:
            measured, estimated, compared = rec.peak_allocated_gib, est.torch_allocated_gb, "allocated"
        else:
            measured = estimated = None
            compared = "none"
        if estimated is not None:
            estimated += rec.baseline
        device_measured = (
            rec.device_peak_gib if rec.device_clean and not rec.oom and not rec.superseded_by else None
        )
        device_estimated = est.device_total_gb + rec.baseline if device_measured else None
        device_problems = []
        if (
            device_measured
            and device_estimated
            and abs(device_estimated / device_measured - 1) > DEVICE_TOLERANCE
        ):
            device_problems.append(
                f"{rec.describe()}: estimated device total {device_estimated:.2f} GiB, measured "
                f"{device_measured:.2f} ({device_estimated / device_measured - 1:+.1%})"
            )
        if (
            compared != "superseded"
            and measured is not None
            and estimated is not None
            and abs(estimated / measured - 1) > TOLERANCE
        ):
            problems.append(
                f"{rec.describe()}: estimated {estimated:.2f} GiB {compared}, measured {measured:.2f} "
                f"({estimated / measured - 1:+.1%})"
            )
        results.append(
            ReplayResult(
                rec,
                est,
                measured,
                estimated,
                compared,
                fits,
                problems,
                device_measured,
                device_estimated,
                device_problems,
            )
        )
    return results


def records_files(results_dir: Path) -> list[Path]:
    """Every records file in bench/results: the GPU matrix and the anchors."""
    return sorted(results_dir.glob("memory-calibration-*.json")) + sorted(results_dir.glob("anchors-*.json"))
