"""What every engine process loads the same way: a run's model path (the built-in demo model built
on first use), its tokenizer, and dtype names as torch dtypes. The training backends, sampling,
the export and the data report all load through here. Engine processes only (transformers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config import RunConfig
from engine.errors import UserError
from engine.models import dtypes
from engine.models.dtypes import DtypeChoice
from engine.models.quantization import Quantization, of_config

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "uint8": "uint8"}


def torch_dtype(name: str) -> Any:
    """A dtype name of the config (bf16, fp16, fp32, uint8) as a torch dtype. `auto` is resolved
    before anything loads (engine.models.dtypes.resolve): it is no dtype of its own."""
    import torch

    return getattr(torch, DTYPES[name])


def with_compute_dtype(cfg: RunConfig, device: str) -> tuple[RunConfig, DtypeChoice]:
    """`cfg` with quant.compute_dtype resolved for `device` (auto decided), and why."""
    import dataclasses

    choice = dtypes.resolve(cfg.quant.compute_dtype, device)
    quant = dataclasses.replace(cfg.quant, compute_dtype=choice.name)
    return dataclasses.replace(cfg, quant=quant), choice


def resolve_model_path(cfg: RunConfig) -> str:
    from engine.models import tiny, tiny_build

    name = cfg.model.name_or_path
    if tiny.is_builtin(name):
        return str(tiny_build.ensure_builtin(name))
    return name


def model_config(path: str, cfg: RunConfig) -> dict[str, Any]:
    """The model's config.json as a mapping: read from disk (a local folder or the hub cache), else
    through transformers (a hub id not cached yet: one small file)."""
    from engine.models.quantization import checkpoint_config

    found = checkpoint_config(path, cfg.model.revision)
    if found is not None:
        return found
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    return config.to_dict()


def checkpoint_quantization(path: str, cfg: RunConfig) -> Quantization | None:
    """How the checkpoint's weights are already quantized (its quantization_config), or None."""
    return of_config(model_config(path, cfg))


def is_prequantized(path: str, cfg: RunConfig) -> bool:
    """`...-bnb-4bit` checkpoints carry their own quantization_config: load them as they are."""
    return checkpoint_quantization(path, cfg) is not None


def resolved_source(model: Any, path: str) -> tuple[str, str]:
    """(repo, commit) of the weights `model` was loaded from: a hub id and the commit transformers
    resolved, a hub cache snapshot folder's repo and commit, or ("", "") for a local folder."""
    config = getattr(model, "config", None)
    name = str(getattr(config, "_name_or_path", "") or path)
    commit = str(getattr(config, "_commit_hash", "") or "")
    parts = Path(name).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/"), parts[-1]
    try:
        local = Path(name).expanduser().exists()
    except (OSError, RuntimeError, ValueError):
        local = False
    if local:
        return "", ""
    return name, commit


def load_tokenizer(cfg: RunConfig, path: str | None = None) -> Any:
    from transformers import AutoTokenizer

    path = path or resolve_model_path(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(
            path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except OSError as exc:
        raise UserError(
            f"model.name_or_path: cannot load a tokenizer from {path!r}: {str(exc).splitlines()[0]}",
            "check the hub id or local path (and your network / HF token for gated models)",
        ) from None
    if tok.pad_token is None:
        # Llama 3 has no pad token; its reserved fine-tune pad token exists for exactly this.
        pad = "<|finetune_right_pad_id|>" if "<|finetune_right_pad_id|>" in tok.get_vocab() else tok.eos_token
        tok.pad_token = pad
    tok.padding_side = "right"
    return tok
