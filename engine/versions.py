"""Installed versions of libraries, read from their metadata: nothing is imported to read one."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable

# The training stack, every backend's: what a warm engine's key and a benchmark's results record.
TRAINING_STACK = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "liger-kernel",
    "unsloth",
    "unsloth_zoo",
)


def installed(names: Iterable[str]) -> dict[str, str]:
    """{name: version} of those of `names` that are installed."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out
