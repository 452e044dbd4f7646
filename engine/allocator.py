"""PyTorch's CUDA caching allocator, configured for training before torch starts.

The default allocator caches fixed-size segments; a QLoRA step frees and allocates tensors of many
sizes (each layer's recomputed activations, the loss chunks), and the split remainders pile up as
memory reserved but not allocated: 0.9 GiB of 10.1 on the Llama-3.1-8B recipe
(bench/results/memory-calibration-*.json). Expandable segments grow one mapping in place instead,
so reserved stays close to allocated. Unsloth turns them on when it is imported; the engine does
the same for every backend, so that both the estimate and the run use one allocator.

A setting the user made (PYTORCH_ALLOC_CONF, or the older PYTORCH_CUDA_ALLOC_CONF) always wins.
Pure Python: the console's memory estimate asks `expandable_segments` what the engine will use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path

ENV = "PYTORCH_ALLOC_CONF"  # read by torch >= 2.10
LEGACY_ENV = "PYTORCH_CUDA_ALLOC_CONF"  # the only one torch < 2.10 reads for CUDA
EXPANDABLE = "expandable_segments:True"


def _torch_reads() -> str:
    """The variable the installed torch reads, found without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(part) for part in version("torch").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return ENV
    return ENV if (major, minor) >= (2, 10) else LEGACY_ENV


def _user_setting(env: Mapping[str, str]) -> str | None:
    for name in (ENV, LEGACY_ENV):
        if env.get(name):
            return env[name]
    return None


def _supported() -> bool:
    """Expandable segments fail under WSL ("CUDA driver error: unknown error") and on Tegra
    boards, whose CUDA lacks the virtual memory calls they are built on."""
    if os.environ.get("WSL_DISTRO_NAME") or os.environ.get("WSL_INTEROP"):
        return False
    try:
        if "microsoft" in os.uname().release.lower():
            return False
    except AttributeError:  # pragma: no cover - not POSIX
        return False
    return not Path("/etc/nv_tegra_release").exists()


def expandable_segments(env: Mapping[str, str] | None = None) -> bool:
    """Whether an engine started with this environment trains with expandable segments."""
    env = os.environ if env is None else env
    setting = _user_setting(env)
    if setting is not None:
        return "expandable_segments:true" in setting.replace(" ", "").lower()
    return _supported()


def configure(env: MutableMapping[str, str] | None = None) -> None:
    """Turn expandable segments on unless the user configured the allocator. Call before torch
    touches CUDA (the engine's entry point does, for every mode)."""
    env = os.environ if env is None else env
    if _user_setting(env) is None and _supported():
        env[_torch_reads()] = EXPANDABLE


def describe(env: Mapping[str, str] | None = None) -> str:
    """A line for the run's log: which allocator settings this process trains with."""
    env = os.environ if env is None else env
    setting = _user_setting(env)
    if setting is None:
        return "CUDA allocator: default (expandable segments are not supported here)"
    return f"CUDA allocator: {setting}"
