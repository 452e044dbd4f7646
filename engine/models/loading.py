"""What every engine process loads the same way: a run's model path (the built-in demo model built
on first use), its tokenizer, and dtype names as torch dtypes. The training backends, sampling,
the export and the data report all load through here. Engine processes only (transformers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.config import RunConfig
from engine.errors import UserError

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, DTYPES[name])


def resolve_model_path(cfg: RunConfig) -> str:
    from engine.models import tiny, tiny_build

    name = cfg.model.name_or_path
    if tiny.is_builtin(name):
        return str(tiny_build.ensure_builtin(name))
    return name


def is_prequantized(path: str, cfg: RunConfig) -> bool:
    """`...-bnb-4bit` checkpoints carry their own quantization_config: load them as they are."""
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        return "quantization_config" in json.loads(config_file.read_text())
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    return getattr(config, "quantization_config", None) is not None


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
