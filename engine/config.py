"""Run configuration: the dataclasses, preset loading, `--set` overrides and validation.

A setting travels one path: preset YAML -> `load_preset` (typed, validated, every problem reported
at once) -> the run's resolved `config.yaml` -> the engine child. Nothing downstream re-parses or
re-defaults a value; code reads it from `RunConfig`.

Pure Python (yaml + dataclasses): the console and the memory model import it without torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from engine import stacks
from engine.errors import ConfigError, UserError
from engine.paths import is_local

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:tiny-llama"
    """Hub id, local model directory, or `builtin:tiny-llama` (built offline on first use)."""
    arch: str | None = None
    """Entry of presets/models/ for the memory model; None derives it from the model's config."""
    revision: str | None = None
    """A branch, tag or commit of a hub model; None: the default branch. A run pins the commit it
    resolved to at its start (RUN_DIR/sources.json) and a resume loads that commit."""
    trust_remote_code: bool = False
    allow_pickle: bool = False
    """Download and load PyTorch pickle weights (.bin) when a hub repo has no safetensors: loading a
    pickle can run code, so only for a repo you trust."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


@dataclass
class QuantConfig:
    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """The dtype matmuls run in. auto: bf16 on a GPU that has it (fp16 on older ones); on a CPU,
    bf16 only where the CPU computes it natively, else fp32 (engine.models.dtypes says why)."""
    storage: Literal["auto", "uint8", "bf16", "fp16", "fp32"] = "auto"
    """What the packed 4-bit weights are stored as (bitsandbytes' quant_storage). auto: uint8, or
    the compute dtype under FSDP, which shards only floating tensors."""


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    source: str = ""
    """A .jsonl/.json/.csv/.parquet file, a folder of them, or a hub dataset id."""
    split: str = "train"
    subset: str | None = None
    revision: str | None = None
    """A branch, tag or commit of a hub dataset (data.source); pinned at a run's start like model.revision."""
    format: Literal["auto", "alpaca", "messages", "sharegpt", "text", "tokens"] = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    """Rename columns to the format's names, e.g. {instruction: question, output: answer}."""
    template: str = "auto"
    """auto (the tokenizer's own, else by model family), llama3, gemma3, chatml, mistral."""
    system_prompt: str | None = None
    responses_only: bool = True
    packing: bool = False
    too_long: Literal["truncate", "drop"] = "truncate"
    bad_records: Literal["stop", "skip"] = "stop"
    """A record that cannot be read or does not fit the format (a broken JSON line, a missing or
    empty field, no assistant turn): stop at it (name it, train nothing), or skip it and go on,
    counted in the data report with the first few named."""
    val_fraction: float = 0.0
    val_max_examples: int | None = 1000
    """At most this many validation examples (a seeded choice): an eval loss's noise falls as one
    over the square root of the examples, while each evaluation's time grows with all of them.
    null keeps every one."""
    val_source: str | None = None
    val_revision: str | None = None
    """data.revision for data.val_source, when that is another hub dataset."""
    max_examples: int | None = None
    shuffle_seed: int = 0


@dataclass
class TrainConfig:
    seq_len: int = 2048
    micro_batch: int = 1
    grad_accum: int = 1
    batch_split: Literal["fixed", "auto"] = "fixed"
    """fixed: micro_batch x grad_accum as written. auto: once no layer needs checkpointing, the same
    rows per optimizer step may run as fewer, larger micro-batches where they fit the budget
    (engine.memory.estimate.choose_split): the same training, fewer passes over the 4-bit weights."""
    epochs: float = 1.0
    max_steps: int | None = None
    """The run's length in optimizer steps: it replaces `epochs` (the data repeats as needed, or is
    left unfinished); None trains for `epochs`."""
    lr: float = 2e-4
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: Literal["paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch"] = (
        "paged_adamw_8bit"
    )
    gradient_checkpointing: bool | int | Literal["auto"] = True
    """true: checkpoint every layer; false: none; N: the first N layers (the rest keep their
    activations); auto: as few as the GPU's memory budget (hardware.gpu) allows."""
    liger: bool = True
    """Use Liger's fused RMSNorm/SwiGLU/RoPE kernels when liger-kernel is installed (CUDA, hf backend)."""
    seed: int = 42
    logging_steps: int = 1
    save_steps: int = 100
    save_total_limit: int = 3
    eval_steps: int = 0
    """Evaluate every N steps when there is a validation split; 0 evaluates once per epoch."""


# `auto` or a stack of engine.stacks: a new stack is accepted here without an edit.
BackendName = Literal[(stacks.AUTO, *stacks.NAMES)]  # type: ignore[valid-type]


@dataclass
class HardwareConfig:
    backend: BackendName = "auto"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    gpu: str = "auto"
    """What the memory budget is checked against: a catalog name (rtx4090), a size (24GB), or auto."""
    gpus: int | Literal["auto"] = 1
    """Processes on this host, one per GPU (N, or auto: every visible GPU), started through torchrun.
    With device cpu, N CPU processes over gloo. Several hosts: `qlc train --nnodes` (docs/multi-gpu.md)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """With more than one GPU: ddp (each GPU holds the whole 4-bit model) or fsdp (4-bit weights,
    adapters and optimizer state sharded across the GPUs: FSDP-QLoRA)."""
    keep_warm: int | Literal["auto"] = "auto"
    """Minutes an engine with this run's backend imported waits, after the run, for the next launch
    from the same environment (engine/run/standby.py): that launch skips the imports (Unsloth's
    take 25-30 s). 0: none; auto: 10 on a GPU, none on the CPU. It holds a CUDA context meanwhile;
    a run that starts without it stops it first."""


@dataclass
class RunConfig:
    name: str = ""
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)

    @property
    def effective_batch(self) -> int:
        return self.train.micro_batch * self.train.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Typed conversion from plain data, collecting problems instead of stopping at the first
# ---------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_NO = object()


def _convert(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Return `value` as type `tp`, or _NO after recording why it is not one."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        shown = repr(value)
        if isinstance(value, bool) and all(isinstance(c, str) for c in choices):
            # `--set train.batch_split=yes` arrives as True: say where the boolean came from.
            shown = f"{str(value).lower()} (YAML reads yes/no/on/off as a boolean)"
        problems.append(f"{where}: {shown} is not one of {', '.join(repr(c) for c in choices)}")
        return _NO
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            sub: list[str] = []
            out = _convert(value, arg, where, sub)
            if out is not _NO:
                return out
        problems.append(f"{where}: expected {_type_name(tp)}, {_got(value)}")
        return _NO
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected {_type_name(tp)}, got {value!r}{_list_hint(value)}")
            return _NO
        (item_tp,) = typing.get_args(tp)
        items = [_convert(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return _NO if _NO in items else items
    if origin is dict:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            problems.append(f"{where}: expected a mapping of names to names, got {value!r}")
            return _NO
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a section of keys, got {value!r}")
            return _NO
        return _build(tp, value, where, problems)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # YAML 1.1 reads `2e-4` (no dot) as a string; accept any spelling Python reads as a number.
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                return float(value)
        except ValueError:
            pass
        except OverflowError:  # an integer beyond any float
            problems.append(f"{where}: {str(value)[:20]}… is too large")
            return _NO
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `name: 7b` style values YAML reads as numbers
    problems.append(f"{where}: expected {_type_name(tp)}, {_got(value)}")
    return _NO


LIST_HINT = "write a list in brackets: "
_PLAIN_ITEM = re.compile(r"[A-Za-z_][\w.\-/]*")


def _list_hint(value: Any) -> str:
    """What to write instead of a single value where a list goes: `q_proj,v_proj` is one string
    to YAML (and so to `--set`), `[q_proj,v_proj]` is a list. The items are shown without spaces
    so the same text works in a preset and, unquoted, as one `--set` argument."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return ""
    items = [x for x in re.split(r"[,\s]+", str(value).strip().strip("[]")) if x]
    # An item YAML reads as another type (yes, null, 1e-4) would not round-trip: show the shape only.
    if not items or not all(_PLAIN_ITEM.fullmatch(x) and isinstance(yaml.safe_load(x), str) for x in items):
        return f" ({LIST_HINT}[q_proj,v_proj])"
    return f" ({LIST_HINT}[{','.join(items)}])"


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            problems.append(f"{where}: unknown key{_suggest(str(key), list(hints))}")
            continue
        out = _convert(value, hints[key], where, problems)
        if out is not _NO:
            kwargs[key] = out
    return cls(**kwargs)


# What transformers, TRL, peft and bitsandbytes call our keys: a preset written from their
# arguments names them so (TrainingArguments' learning_rate is train.lr).
LIBRARY_NAMES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "micro_batch",
    "batch_size": "micro_batch",
    "gradient_accumulation_steps": "grad_accum",
    "max_seq_length": "seq_len",
    "max_length": "seq_len",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "scheduler",
    "optim": "optimizer",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "model_name_or_path": "name_or_path",
    "dataset_name": "source",
    "bnb_4bit_quant_type": "quant_type",
    "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_compute_dtype": "compute_dtype",
}


def _suggest(word: str, options: list[str]) -> str:
    """The key a library's name stands for, else the closest option, else the few nearest, else
    where to look: never the whole list of fifty keys on one line."""
    section, _, leaf = word.rpartition(".")
    ours = LIBRARY_NAMES.get(leaf)
    if ours is not None:
        # In a section, the options are its keys; for --set, section.key.
        matches = [o for o in options if o == ours or o.endswith(f".{ours}")]
        if section:
            matches = [o for o in matches if o in (ours, f"{section}.{ours}")] or matches
        if matches:
            return f" (did you mean {matches[0]!r}? {leaf} is what transformers, TRL or peft call it)"
    close = difflib.get_close_matches(word, options, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    near = difflib.get_close_matches(word, options, n=3, cutoff=0.4)
    if near:
        return f" (closest: {', '.join(repr(n) for n in near)})"
    if len(options) <= 8:
        return f" (known: {', '.join(options)})"
    sections = list(dict.fromkeys(o.split(".")[0] for o in options if "." in o))
    return f" (keys are section.key, in {', '.join(sections)}; `qlc presets NAME` shows every key)"


def _got(value: Any) -> str:
    """How a wrong value reads in a message: a number or a boolean in quotes is said to be one."""
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, (bool, int, float)):
            return f"got the quoted string {value!r} (remove the quotes)"
    return f"got {value!r}"


def config_from_dict(data: dict[str, Any], source: str = "") -> RunConfig:
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError(["expected a mapping of sections (model, lora, data, train, ...)"], source)
    cfg = _build(RunConfig, data, "", problems)
    # Ranges and cross-field checks run even when a type is wrong (that field keeps its default,
    # which passes them): one pass reports every problem.
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def validate(cfg: RunConfig) -> list[str]:
    """Checks across fields and ranges that types alone do not catch."""
    p: list[str] = []
    t, lo, d = cfg.train, cfg.lora, cfg.data
    for name in ("seq_len", "micro_batch", "grad_accum", "logging_steps", "save_steps"):
        if getattr(t, name) < 1:
            p.append(f"train.{name}: must be at least 1, got {getattr(t, name)}")
    # NaN passes every negated comparison below: report non-finite values once, as such.
    nonfinite = set()
    for where, value in (
        ("train.epochs", t.epochs),
        ("train.lr", t.lr),
        ("train.warmup_ratio", t.warmup_ratio),
        ("train.weight_decay", t.weight_decay),
        ("train.max_grad_norm", t.max_grad_norm),
        ("lora.dropout", lo.dropout),
        ("data.val_fraction", d.val_fraction),
    ):
        if not math.isfinite(value):
            p.append(f"{where}: must be a finite number, got {value}")
            nonfinite.add(where)
    if "train.epochs" not in nonfinite and t.epochs <= 0:
        p.append(f"train.epochs: must be positive, got {t.epochs}")
    if t.max_steps is not None and t.max_steps < 1:
        p.append(f"train.max_steps: must be at least 1 or null, got {t.max_steps}")
    if "train.lr" not in nonfinite and not 0 < t.lr < 1:
        p.append(f"train.lr: must be between 0 and 1, got {t.lr}")
    if "train.warmup_ratio" not in nonfinite and not 0 <= t.warmup_ratio < 1:
        p.append(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if "train.weight_decay" not in nonfinite and t.weight_decay < 0:
        p.append(f"train.weight_decay: must be 0 or positive, got {t.weight_decay}")
    if "train.max_grad_norm" not in nonfinite and t.max_grad_norm < 0:
        p.append(f"train.max_grad_norm: must be 0 (off) or positive, got {t.max_grad_norm}")
    if t.eval_steps < 0 or t.save_total_limit < 1:
        p.append("train.eval_steps must be >= 0 and train.save_total_limit >= 1")
    if lo.r < 1:
        p.append(f"lora.r: must be at least 1, got {lo.r}")
    if lo.alpha < 1:
        p.append(f"lora.alpha: must be at least 1, got {lo.alpha}")
    if "lora.dropout" not in nonfinite and not 0 <= lo.dropout < 1:
        p.append(f"lora.dropout: must be in [0, 1), got {lo.dropout}")
    if not lo.target_modules:
        p.append("lora.target_modules: name at least one module (q_proj, v_proj, ...)")
    if not d.source:
        p.append("data.source: required (a .jsonl/.json/.csv/.parquet file, a folder, or a hub dataset id)")
    if "data.val_fraction" not in nonfinite and not 0 <= d.val_fraction < 1:
        p.append(f"data.val_fraction: must be in [0, 1), got {d.val_fraction}")
    if d.max_examples is not None and d.max_examples < 1:
        p.append(f"data.max_examples: must be at least 1 or null, got {d.max_examples}")
    if d.val_max_examples is not None and d.val_max_examples < 1:
        p.append(f"data.val_max_examples: must be at least 1 or null, got {d.val_max_examples}")
    gc = t.gradient_checkpointing
    if not isinstance(gc, bool) and isinstance(gc, int) and gc < 0:
        p.append(f"train.gradient_checkpointing: a layer count must be 0 or more, got {gc}")
    hw = cfg.hardware
    p += stacks.config_problems(hw.backend, hw.device, hw.gpus)
    if isinstance(hw.keep_warm, int) and hw.keep_warm < 0:
        p.append(f"hardware.keep_warm: must be 0 (off), minutes or auto, got {hw.keep_warm}")
    if isinstance(hw.gpus, int) and hw.gpus < 1:
        p.append(f"hardware.gpus: must be at least 1 or auto, got {hw.gpus}")
    if cfg.hardware.strategy == "fsdp" and cfg.hardware.device == "cpu" and cfg.hardware.gpus != 1:
        # accelerate turns its FSDP plugin on only for GPU process groups: on CPUs it would train
        # DDP while the config says fsdp (docs/multi-gpu.md).
        p.append("hardware.strategy: fsdp needs CUDA GPUs (accelerate shards only on GPUs); use ddp on CPUs")
    if cfg.hardware.strategy == "fsdp" and cfg.hardware.gpus != 1 and cfg.quant.storage == "uint8":
        p.append(
            "quant.storage: FSDP shards only floating tensors, so uint8 cannot be sharded; "
            "with hardware.strategy=fsdp set quant.storage=auto (the compute dtype)"
        )
    if cfg.hardware.strategy == "fsdp" and cfg.hardware.gpus != 1 and t.optimizer != "adamw_torch":
        # bitsandbytes' optimizer kernels have no rule for FSDP2's sharded (DTensor) parameters.
        p.append(
            f"train.optimizer: {t.optimizer} cannot step FSDP's sharded parameters (bitsandbytes "
            "optimizers); with hardware.strategy=fsdp set train.optimizer=adamw_torch"
        )
    return p


# ---------------------------------------------------------------------------------------------
# Overrides: --set key=value
# ---------------------------------------------------------------------------------------------


def _leaf_paths() -> dict[str, list[str]]:
    """Map each short key (`lr`) to its full dotted paths (`train.lr`)."""
    out: dict[str, list[str]] = {}
    for section, cls in _hints(RunConfig).items():
        if dataclasses.is_dataclass(cls):
            for key in _hints(cls):
                out.setdefault(key, []).append(f"{section}.{key}")
        else:
            out.setdefault(section, []).append(section)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-4` -> ("train.lr", "1e-4" read as YAML). A unique short key (`lr`) is accepted."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected key=value, e.g. --set train.lr=1e-4"])
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    leaves = _leaf_paths()
    if "." not in key:
        paths = leaves.get(key, [])
        if len(paths) == 1:
            key = paths[0]
        elif len(paths) > 1:
            raise ConfigError([f"--set {key}: ambiguous, say one of {', '.join(paths)}"])
    section, _, leaf = key.partition(".")
    sections = _hints(RunConfig)
    if section not in sections:
        all_keys = [p for ps in leaves.values() for p in ps]
        raise ConfigError([f"--set {key}: unknown key{_suggest(key, all_keys)}"])
    if leaf and (not dataclasses.is_dataclass(sections[section]) or leaf not in _hints(sections[section])):
        options = (
            [f"{section}.{k}" for k in _hints(sections[section])]
            if dataclasses.is_dataclass(sections[section])
            else []
        )
        raise ConfigError([f"--set {key}: unknown key{_suggest(key, options)}"])
    return key, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The preset's data with overrides applied, and the problems of the overrides that could not be."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    problems: list[str] = []
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ConfigError as exc:
            problems += exc.problems
            continue
        section, _, leaf = key.partition(".")
        if leaf:
            target = out.setdefault(section, {})
            if not isinstance(target, dict):
                problems.append(f"--set {key}: section {section!r} is not a mapping in the preset")
                continue
            target[leaf] = value
        else:
            out[section] = value
    return out, problems


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def preset_dirs() -> list[Path]:
    """Where presets are looked up, first match wins: $QLC_PRESETS_DIR, the user's config folder,
    the repository's presets/, the copy installed with the package."""
    dirs: list[Path] = []
    for entry in os.environ.get("QLC_PRESETS_DIR", "").split(os.pathsep):
        if entry:
            dirs.append(Path(entry))
    try:
        import platformdirs

        dirs.append(Path(platformdirs.user_config_dir("qlora-console")) / "presets")
    except ImportError:  # pragma: no cover - platformdirs is a dependency
        pass
    here = Path(__file__).resolve().parent
    dirs += [here.parent / "presets", here / "_presets"]
    return [d for d in dirs if d.is_dir()]


NOT_PRESETS = {"gpus"}  # presets/gpus.yaml is the GPU catalog of the memory model


def list_presets() -> list[Path]:
    seen: dict[str, Path] = {}
    for d in preset_dirs():
        for p in sorted(d.glob("*.yaml")):
            if p.stem in NOT_PRESETS:
                continue
            seen.setdefault(p.stem, p)
    return sorted(seen.values(), key=lambda p: p.stem)


def _is_file(path: Path) -> bool:
    """is_file() for any text a user typed: a name too long, or an unknown ~user, is not a file."""
    try:
        return path.expanduser().is_file()
    except (OSError, RuntimeError, ValueError):
        return False


def find_preset(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or os.sep in name:
        if _is_file(path):
            return path.expanduser().resolve()
        raise UserError(
            f"preset file {name}: not found", "check the path, or name a preset from `qlc presets`"
        )
    for d in preset_dirs():
        candidate = d / f"{name}.yaml"
        if _is_file(candidate):
            return candidate.resolve()
    names = [p.stem for p in list_presets()]
    raise UserError(f"unknown preset {name!r}{_suggest(name, names)}", "`qlc presets` lists them")


def is_preset(target: str) -> bool:
    """Whether `target` names a preset (a YAML path, or a preset's name) rather than a model: a
    YAML path is one even when missing, so that its `not found` is the error a user sees."""
    if Path(target).suffix in (".yaml", ".yml"):
        return True
    try:
        find_preset(target)
    except UserError:
        return False
    return True


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from None
    return parse_yaml(text, path)


def parse_yaml(text: str, path: Path) -> dict[str, Any]:
    """A preset file's text as a mapping of sections; one line naming the problem otherwise."""
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a preset", "fix the syntax") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{where}: invalid YAML: {problem}", "fix the syntax") from None
    if data is None:
        raise UserError(
            f"{path}: the file is empty", "a preset needs at least model, data and train sections"
        )
    if not isinstance(data, dict):
        raise ConfigError(["expected a mapping of sections (model, lora, data, train, ...)"], str(path))
    return data


def _resolve_local_paths(cfg: RunConfig, preset: Path, overridden: set[str | None]) -> None:
    """Paths in a preset are relative to the preset's folder, else to the working folder; hub ids
    stay as they are. A data path found in neither is made absolute where it was meant to be, so
    that its "not found" (raised where the data is read) names the place."""
    base = preset.parent

    def resolve(value: str | None, key: str) -> str | None:
        if not value or value.startswith("builtin:"):
            return value
        try:
            p = Path(value).expanduser()
            if not p.is_absolute() and (base / p).exists():
                return str((base / p).resolve())
            if p.exists():
                return str(p.resolve())
            if key.startswith("data.") and not p.is_absolute():
                return _missing_data_path(value, p, key, preset, overridden)
        except (OSError, RuntimeError, ValueError):  # not a usable path: later checks say so
            pass
        return value

    cfg.data.source = resolve(cfg.data.source, "data.source") or ""
    cfg.data.val_source = resolve(cfg.data.val_source, "data.val_source")
    cfg.model.name_or_path = resolve(cfg.model.name_or_path, "model.name_or_path") or cfg.model.name_or_path


def _missing_data_path(value: str, p: Path, key: str, preset: Path, overridden: set[str | None]) -> str:
    """`value`, a relative data path found neither beside the preset nor in the working folder, as
    the absolute path where it was meant to be: beside the preset, or in the working folder for a
    `--set`. Its "not found" then says where it was looked for (left relative, a copied preset's
    user could not tell)."""
    if not is_local(value):  # a hub dataset id (owner/name): the hub says if it is missing
        return value
    return str(((Path.cwd() if key in overridden else preset.parent) / p).resolve())


def _config_of(path: Path, data: dict[str, Any], overrides: list[str]) -> RunConfig:
    """The preset file's `data` with `overrides`, typed, validated and with its paths resolved.
    A problem with a value an override set names the `--set`, not the file."""
    data, problems = apply_overrides(data, overrides)
    data.setdefault("name", path.stem)
    keys = {override_key(o) for o in overrides}
    if "model.name_or_path" in keys and "model.arch" not in keys and isinstance(data.get("model"), dict):
        # The preset's model.arch describes the preset's model: another model brings its own
        # architecture (read from its config), or the memory budget would be the old model's.
        data["model"] = {**data["model"], "arch": None}
    try:
        cfg = config_from_dict(data, str(path))
    except ConfigError as exc:
        raise ConfigError(problems + blame_overrides(exc.problems, overrides), str(path)) from None
    if problems:
        raise ConfigError(problems, str(path))
    _resolve_local_paths(cfg, path, keys)
    return cfg


def blame_overrides(problems: list[str], overrides: list[str]) -> list[str]:
    """`lora.r: expected int, ...` becomes `--set lora.r='32': expected int, ...` when an override
    set lora.r: the value came from the command line, not from the file."""
    keys = {}
    for text in overrides:
        key = override_key(text)
        if key:
            keys[key] = text.strip()
    out = []
    for problem in problems:
        field, sep, rest = problem.partition(": ")
        base = re.split(r"[\[]", field)[0]
        text = keys.get(base) or next((t for k, t in keys.items() if base.startswith(k + ".")), None)
        if sep and text:
            # On the command line the list goes after its key, as `--set` takes it.
            rest = rest.replace(f"({LIST_HINT}[", f"({LIST_HINT}{base}=[")
        out.append(f"--set {text}: {rest}" if sep and text else problem)
    return out


def origin(preset: str, overrides: list[str] | None, key: str) -> str:
    """Where `key`'s value came from, as an error line starts: `--set KEY=VALUE` when an override
    set it, else `PRESET_FILE: KEY`. For checks made after loading (engine.preflight's GPU name)."""
    for text in reversed(overrides or []):
        if override_key(text) == key:
            return f"--set {text.strip()}"
    try:
        return f"{find_preset(preset)}: {key}"
    except UserError:
        return key


def load_preset(name: str, overrides: list[str] | None = None) -> RunConfig:
    """A preset by name or path, with overrides applied, typed and validated."""
    path = find_preset(name)
    return _config_of(path, read_yaml(path), overrides or [])


@dataclass(frozen=True)
class PresetDraft:
    """A preset as the console edits it, parsed once: the file's text (its comments) and data, the
    overrides on top, and either the validated RunConfig or every problem (never both).

    `with_overrides` re-validates other overrides without reading the file again. Everything that
    shows or starts a preset (the overrides box, the presets pane, the settings table, the start
    flow) reads one draft instead of loading the preset itself.
    """

    name: str
    path: Path | None
    text: str = ""
    data: dict[str, Any] | None = None
    overrides: tuple[str, ...] = ()
    config: RunConfig | None = None
    problems: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return self.config is not None

    def describe_problems(self) -> str:
        """Every problem on one line, after the file they are in."""
        where = str(self.path) if self.path is not None and self.data is not None else ""
        return str(ConfigError(list(self.problems), where))  # an override's problem names its --set

    @property
    def overridden(self) -> frozenset[str]:
        """The canonical keys (train.lr) the overrides set."""
        return frozenset(k for k in (override_key(o) for o in self.overrides) if k)

    def value(self, key: str) -> Any:
        """A setting of the validated config by its dotted key (None when it does not validate)."""
        node: Any = self.config.to_dict() if self.config is not None else None
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> PresetDraft:
        if self.path is None or self.data is None:
            return dataclasses.replace(self, overrides=tuple(overrides))
        try:
            cfg, problems = _config_of(self.path, self.data, list(overrides)), ()
        except ConfigError as exc:
            cfg, problems = None, tuple(exc.problems)
        except UserError as exc:
            cfg, problems = None, (str(exc),)
        return dataclasses.replace(self, overrides=tuple(overrides), config=cfg, problems=problems)


def draft_preset(name: str, overrides: list[str] | tuple[str, ...] = ()) -> PresetDraft:
    """Read preset `name` once and validate it with `overrides`; a problem is data, not raised."""
    try:
        path = find_preset(name)
        text = path.read_text(encoding="utf-8")
    except UserError as exc:
        return PresetDraft(name, None, overrides=tuple(overrides), problems=(str(exc),))
    except (OSError, UnicodeDecodeError) as exc:
        problem = f"{name}: cannot read ({exc.__class__.__name__}: {exc})"
        return PresetDraft(name, None, overrides=tuple(overrides), problems=(problem,))
    try:
        data = parse_yaml(text, path)
    except ConfigError as exc:
        return PresetDraft(name, path, text, None, tuple(overrides), problems=tuple(exc.problems))
    except UserError as exc:
        return PresetDraft(name, path, text, None, tuple(overrides), problems=(str(exc),))
    return PresetDraft(name, path, text, data).with_overrides(overrides)


def override_key(text: str) -> str | None:
    """The canonical key an override sets (`lr=1e-4` -> train.lr), or None if it names none."""
    try:
        return parse_override(text)[0]
    except UserError:
        return None


def merge_override(overrides: list[str] | tuple[str, ...], text: str) -> list[str]:
    """`text` replaces any override of the same (canonical) key; order is kept otherwise."""
    key = override_key(text)
    kept = [o for o in overrides if override_key(o) != key]
    return [*kept, text.strip()]


# Keys added after runs were written, whose default would change what an older run does when it
# is resumed or exported: such a run's config.yaml gets the value it ran with instead.
RAN_WITHOUT = {("data", "val_max_examples"): None}  # before it, every validation example was kept


def load_resolved(path: Path) -> RunConfig:
    """A run's saved config.yaml (already resolved: paths absolute, defaults filled)."""
    data = read_yaml(path)
    for (section, key), value in RAN_WITHOUT.items():
        part = data.get(section)
        if isinstance(part, dict):
            part.setdefault(key, value)
    return config_from_dict(data, str(path))
