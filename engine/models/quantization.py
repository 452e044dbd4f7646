"""How the base model's weights are quantized: what a run asks for (`quant.*`) and what a checkpoint
already is (its config.json's `quantization_config`), read without loading anything.

Both backends build their bitsandbytes settings from `requested` and check a pre-quantized
checkpoint against the request with `check_request` before they load a byte; the memory model
reads `of_checkpoint` to count the weights as they will really be stored. Pure Python (json, and
huggingface_hub's local cache lookup only): the console and the memory model import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import QuantConfig, RunConfig
from engine.errors import UserError

# A multimodal checkpoint (Gemma 3 4B/12B/27B) is quantized whole, its SigLIP vision tower too: the
# tower is frozen and never runs in a text fine-tune, so 4 bits cost nothing there and save ~0.6 GB
# on the 4B. (Skip lists naming "vision_tower", as Unsloth's SKIP_QUANTIZATION_MODULES does, match
# nothing in transformers 5.17: quantizers_utils.should_convert_module matches a key as a prefix of
# the module's full name, "model.vision_tower...", or as its end.) Both backends pass the same
# settings, so they train on the same weights.
TORCH_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "uint8": "uint8"}


@dataclass(frozen=True)
class Quantization:
    """One model's 4-bit layout, as bitsandbytes' settings name it."""

    load_in_4bit: bool
    quant_type: str = "nf4"  # nf4 or fp4
    double_quant: bool = True
    compute_dtype: str | None = None  # bf16 / fp16 / fp32; None: not stated
    storage: str = "uint8"  # what the packed weights are stored as
    skip_modules: tuple[str, ...] | None = None  # None: transformers' defaults (the LM head)
    method: str = "bitsandbytes"  # quant_method of a checkpoint (gptq, awq, fp8, ... are not bnb)
    load_in_8bit: bool = False

    @property
    def is_bnb_4bit(self) -> bool:
        return self.method == "bitsandbytes" and self.load_in_4bit

    @property
    def quantized(self) -> bool:
        """Whether the weights are stored quantized (a config can carry an empty bitsandbytes block)."""
        return self.load_in_4bit or self.load_in_8bit or self.method != "bitsandbytes"

    def keeps_16bit(self, module: str) -> bool:
        """Whether a checkpoint stores `module` (a name like "vision_tower") unquantized: its skip
        list names it in any spelling."""
        return any(module in s for s in self.skip_modules or ())

    def describe(self) -> str:
        if not self.load_in_4bit and not self.load_in_8bit:
            return f"{self.method}" if self.method != "bitsandbytes" else "16-bit (not quantized)"
        if not self.is_bnb_4bit:
            return f"{self.method}" + (" 8-bit" if self.load_in_8bit else "")
        dq = " + double quant" if self.double_quant else ""
        compute = f", {self.compute_dtype} compute" if self.compute_dtype else ""
        storage = f", stored as {self.storage}" if self.storage != "uint8" else ""
        return f"4-bit {self.quant_type.upper()}{dq}{compute}{storage}"


def requested(q: QuantConfig, compute: str, *, sharded: bool = False) -> Quantization | None:
    """What `quant.*` asks a backend to quantize on load (None: load 16-bit). `compute` is the
    resolved compute dtype (engine.models.dtypes); `sharded` an FSDP run, whose storage auto is the
    compute dtype. The skip list is transformers' default (the LM head and tied embeddings)."""
    if not q.load_in_4bit:
        return None
    storage = q.storage if q.storage != "auto" else (compute if sharded else "uint8")
    return Quantization(
        load_in_4bit=True,
        quant_type=q.quant_type,
        double_quant=q.double_quant,
        compute_dtype=compute,
        storage=storage,
    )


def bnb_kwargs(quant: Quantization, torch_dtype: Any) -> dict[str, Any]:
    """BitsAndBytesConfig's keyword arguments for `quant`; `torch_dtype(name)` makes dtypes."""
    kwargs: dict[str, Any] = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": quant.quant_type,
        "bnb_4bit_use_double_quant": quant.double_quant,
        "bnb_4bit_compute_dtype": torch_dtype(quant.compute_dtype or "bf16"),
        "bnb_4bit_quant_storage": torch_dtype(quant.storage),
    }
    if quant.skip_modules is not None:
        kwargs["llm_int8_skip_modules"] = list(quant.skip_modules)
    return kwargs


# ---------------------------------------------------------------------------------------------
# What a checkpoint is
# ---------------------------------------------------------------------------------------------


def _dtype_name(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).removeprefix("torch.")
    return TORCH_NAMES.get(text, text)


def of_config(config: dict[str, Any]) -> Quantization | None:
    """A config.json's `quantization_config` (or its text_config's), None when it stores no quantized weights."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = str(qc.get("quant_method") or "bitsandbytes")
    skip = qc.get("llm_int8_skip_modules")
    found = Quantization(
        load_in_4bit=bool(qc.get("load_in_4bit", method != "bitsandbytes")),
        load_in_8bit=bool(qc.get("load_in_8bit", False)),
        quant_type=str(qc.get("bnb_4bit_quant_type") or "nf4"),
        double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
        compute_dtype=_dtype_name(qc.get("bnb_4bit_compute_dtype")),
        storage=_dtype_name(qc.get("bnb_4bit_quant_storage")) or "uint8",
        skip_modules=tuple(str(s) for s in skip) if isinstance(skip, list) else None,
        method=method,
    )
    return found if found.quantized else None


def checkpoint_config(name_or_path: str, revision: str | None = None) -> dict[str, Any] | None:
    """A model's config.json without any network call: a local folder's, or the local hub cache's
    copy of a hub id's (None when neither is at hand)."""
    try:
        folder = Path(name_or_path).expanduser()
        path: Path | None = folder / "config.json" if folder.is_dir() else None
    except (OSError, RuntimeError, ValueError):
        return None
    if path is None and "/" in name_or_path and not name_or_path.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - a dependency of transformers
            return None
        cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def of_checkpoint(name_or_path: str, revision: str | None = None) -> Quantization | None:
    """The checkpoint's stored quantization, None when it is not quantized (or not at hand)."""
    config = checkpoint_config(name_or_path, revision)
    return of_config(config) if config is not None else None


def is_multimodal(config: dict[str, Any] | None) -> bool:
    """A checkpoint with a vision tower beside its language model (Gemma 3 4B/12B/27B)."""
    return isinstance(config, dict) and isinstance(config.get("vision_config"), dict)


def check_request(cfg: RunConfig, ckpt: Quantization | None, backend: str) -> None:
    """A pre-quantized checkpoint loads as it was saved: refuse, before loading, a `quant.*` value
    it cannot honour (one line naming the value and what to set instead)."""
    if ckpt is None:
        return
    name, q = cfg.model.name_or_path, cfg.quant
    where = f"model.name_or_path: {name} is already quantized ({ckpt.describe()})"
    if not ckpt.is_bnb_4bit:
        if ckpt.load_in_8bit or ckpt.method != "bitsandbytes":
            raise UserError(
                f"{where}; the engine trains on bitsandbytes 4-bit weights only",
                "use the model's 16-bit original, which is quantized on load",
            )
        return
    if not q.load_in_4bit:
        raise UserError(
            f"{where}, so quant.load_in_4bit=false cannot load it in 16-bit",
            "set quant.load_in_4bit=true, or use the model's 16-bit original",
        )
    if q.quant_type != ckpt.quant_type:
        raise UserError(
            f"quant.quant_type: {q.quant_type} asked for, but {name} is stored as {ckpt.quant_type}",
            f"set quant.quant_type={ckpt.quant_type}, or use the model's 16-bit original",
        )
    if q.double_quant != ckpt.double_quant:
        raise UserError(
            f"quant.double_quant: {str(q.double_quant).lower()} asked for, but {name} was saved "
            f"{'with' if ckpt.double_quant else 'without'} double quantization",
            f"set quant.double_quant={str(ckpt.double_quant).lower()}, or use the model's 16-bit original",
        )
    if q.storage not in ("auto", ckpt.storage):
        raise UserError(
            f"quant.storage: {q.storage} asked for, but {name} stores its 4-bit weights as {ckpt.storage}",
            f"set quant.storage=auto, or use the model's 16-bit original ({backend} backend)",
        )
