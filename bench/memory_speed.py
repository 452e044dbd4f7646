"""How fast the memory model answers (targets: estimate < 5 ms, auto-fit < 200 ms). CPU only.

.venv/bin/python bench/memory_speed.py
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import load_preset
from engine.memory import advise, estimate, fit, resolve_architecture, resolve_gpu


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median milliseconds of `repeat` calls."""
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def main() -> int:
    cfg = load_preset("llama-3.1-8b-rtx4060")
    arch = resolve_architecture(cfg)
    gpu = resolve_gpu("rtx4060")
    big = resolve_gpu("rtx4090")
    rows = [
        ("estimate (architecture resolved)", timed(lambda: estimate(cfg, arch), 500), 5.0),
        ("estimate (from the config)", timed(lambda: estimate(cfg), 500), 5.0),
        ("fit on an RTX 4090", timed(lambda: fit(cfg, big, arch), 50), 200.0),
        ("advise on an RTX 4060 (combinations)", timed(lambda: advise(cfg, gpu, arch), 20), 200.0),
    ]
    for name, ms, target in rows:
        print(f"{name:40s} {ms:8.3f} ms   (target < {target:g} ms)")
    return 0 if all(ms < target for _, ms, target in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
