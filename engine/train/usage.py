"""What this process uses, for the step and model-ready events: host RSS and CUDA memory."""

from __future__ import annotations

import os

GIB = 1024**3


def host_rss_gb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB
    except (OSError, ValueError):
        return None


def cuda_memory() -> dict[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {
        "memory_allocated_gb": torch.cuda.memory_allocated() / GIB,
        "memory_reserved_gb": torch.cuda.memory_reserved() / GIB,
        "memory_peak_allocated_gb": torch.cuda.max_memory_allocated() / GIB,
        "memory_peak_reserved_gb": torch.cuda.max_memory_reserved() / GIB,
    }


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
