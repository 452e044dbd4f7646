"""The base model a run names, checked before a run directory exists.

Loading the model happens in the engine, seconds after the run directory is made; a typo there
used to leave a failed run behind. What can be known without loading anything is checked here:
a built-in name is known, a local folder exists and holds a config.json, a hub id has a hub id's
shape, and, offline (HF_HUB_OFFLINE), the hub id is in the local cache.

Pure Python: the console imports this module (huggingface_hub only when offline).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from engine.config import RunConfig
from engine.errors import UserError
from engine.models import tiny

WHERE = "model.name_or_path"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def is_hub_model(name: str) -> bool:
    """A hub id, not a built-in model or a local folder (`check` checked its shape)."""
    if tiny.is_builtin(name):
        return False
    try:
        return not Path(name).expanduser().exists()
    except (OSError, RuntimeError, ValueError):
        return False


def _offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, but now: its constant is read once, at import."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def check(cfg: RunConfig) -> None:
    """Raise UserError (one line naming the value) if the model cannot be where the config says."""
    name = cfg.model.name_or_path
    if tiny.is_builtin(name):
        tiny.builtin_config(name)  # an unknown built-in name is refused there
        return
    try:
        path = Path(name).expanduser()
        exists = path.exists()
    except (OSError, RuntimeError, ValueError):
        raise UserError(
            f"{WHERE}: {name!r} is not a usable path", "name a model folder or a hub id"
        ) from None
    if exists:
        if not path.is_dir():
            raise UserError(
                f"{WHERE}: {name} is a file", "name the folder that holds the model's config.json"
            )
        if not (path / "config.json").is_file():
            raise UserError(
                f"{WHERE}: {name} has no config.json", "name a folder written by save_pretrained, or a hub id"
            )
        _check_quantization(cfg)
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise UserError(f"{WHERE}: {name} not found", "check the path (paths in a preset are relative to it)")
    if len(name) > 96 or not _HUB_ID.match(name):
        raise UserError(
            f"{WHERE}: {name!r} is neither a local folder nor a hub id", "a hub id looks like owner/name"
        )
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=cfg.model.revision)
        if not isinstance(cached, str):
            raise UserError(
                f"{WHERE}: {name} is not in the local hub cache, and HF_HUB_OFFLINE is set",
                "download it once with the network on, or name a local folder",
            )
    _check_quantization(cfg)


def _check_quantization(cfg: RunConfig) -> None:
    """A pre-quantized checkpoint whose config.json is on disk (a folder, or the hub cache): refuse
    a quant.* value it cannot honour now, before a run exists. The engine checks again as it loads
    (a hub id's config may only arrive then)."""
    from engine.models import quantization

    ckpt = quantization.of_checkpoint(cfg.model.name_or_path, cfg.model.revision)
    quantization.check_request(cfg, ckpt, cfg.hardware.backend)
