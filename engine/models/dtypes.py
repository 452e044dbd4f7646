"""The compute dtype a run trains in: `quant.compute_dtype`, with `auto` chosen by what the device
runs fast.

- A CUDA GPU: bf16 where it has bf16 (Ampere and later), fp16 on older cards.
- A CPU: bf16 only where it has a native bf16 path, else fp32. On x86 that is the avx512_bf16 or
  amx_bf16 flag in /proc/cpuinfo: without them PyTorch emulates bf16, and a bf16 matmul of the
  demo model's shapes took 54x the fp32 time on an AVX2 EPYC (issue 19). Elsewhere (ARM, or no
  /proc/cpuinfo) a one-time micro-probe times a bf16 and an fp32 matmul of the demo model's shapes,
  forward and backward, and the answer is cached per CPU and torch version.

`cpu_choice` and `gpu_choice` decide from what they are given (pure, tested with injected flags);
`resolve` gathers the facts (torch, /proc/cpuinfo, the probe) in engine processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# bf16 wins the probe when it takes at most this much of the fp32 time: a native path is faster
# than fp32 (half the bytes); an emulated one is several times slower.
PROBE_BF16_MAX_RATIO = 1.0
X86 = ("x86_64", "amd64", "i386", "i686")


@dataclass(frozen=True)
class DtypeChoice:
    name: str  # bf16, fp16 or fp32
    reason: str  # one clause, for the run header


def cpu_choice(
    flags: set[str] | None, machine: str, probe: Callable[[], tuple[float, float]] | None = None
) -> DtypeChoice:
    """`auto` on a CPU. `flags`: /proc/cpuinfo's flags (None: unknown); `machine`: platform.machine();
    `probe`: () -> (bf16 seconds, fp32 seconds), called only where the flags cannot tell."""
    native = sorted(set(NATIVE_BF16_FLAGS) & (flags or set()))
    if native:
        return DtypeChoice("bf16", f"auto: this CPU computes bf16 natively ({', '.join(native)})")
    if flags is not None and machine.lower() in X86:
        return DtypeChoice(
            "fp32", "auto: this CPU has no native bf16 (no avx512_bf16 or amx_bf16), where fp32 is far faster"
        )
    if probe is None:
        return DtypeChoice("fp32", "auto: no native bf16 known on this CPU")
    bf16, fp32 = probe()
    ratio = bf16 / fp32 if fp32 > 0 else float("inf")
    if ratio <= PROBE_BF16_MAX_RATIO:
        return DtypeChoice("bf16", f"auto: a bf16 matmul ran in {ratio:.2f}x the fp32 time on this CPU")
    return DtypeChoice("fp32", f"auto: a bf16 matmul took {ratio:.1f}x the fp32 time on this CPU")


def gpu_choice(bf16_supported: bool, name: str = "this GPU") -> DtypeChoice:
    if bf16_supported:
        return DtypeChoice("bf16", f"auto: {name} computes bf16")
    return DtypeChoice("fp16", f"auto: {name} has no bf16 (before Ampere)")


def explicit(name: str) -> DtypeChoice:
    return DtypeChoice(name, f"quant.compute_dtype is {name}")


# ---------------------------------------------------------------------------------------------
# The facts, in engine processes
# ---------------------------------------------------------------------------------------------


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's feature flags (x86 "flags", ARM "Features"), None where /proc/cpuinfo is absent."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "CPU part", "Hardware"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_matmul(repeats: int = 5) -> tuple[float, float]:
    """(bf16 seconds, fp32 seconds): the best of `repeats` forward + backward passes of one MLP-sized
    matmul of the demo model (1024 tokens x 256 by 256 x 704), as training runs it."""
    import torch

    def best(dtype: torch.dtype) -> float:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1024, 256, generator=g).to(dtype).requires_grad_()
        w = torch.randn(256, 704, generator=g).to(dtype).requires_grad_()
        times = []
        for _ in range(repeats + 1):  # the first one warms up
            t0 = time.perf_counter()
            (x @ w).sum().backward()
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    return best(torch.bfloat16), best(torch.float32)


def _probe_cache(flags: set[str] | None) -> Path:
    import torch

    from engine.paths import cache_root

    key = json.dumps([_cpu_model(), sorted(flags or ()), torch.__version__, platform.machine()])
    return cache_root() / "cpu-dtype" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def cached_probe(flags: set[str] | None) -> Callable[[], tuple[float, float]]:
    """The probe, run once per CPU model, flags and torch version; later runs read its answer."""

    def run() -> tuple[float, float]:
        path = _probe_cache(flags)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return float(data["bf16_s"]), float(data["fp32_s"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        bf16, fp32 = probe_matmul()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"bf16_s": bf16, "fp32_s": fp32}), encoding="utf-8")
            tmp.rename(path)
        except OSError:  # a read-only cache only costs the probe next time
            pass
        return bf16, fp32

    return run


def resolve(want: str, device: str) -> DtypeChoice:
    """`quant.compute_dtype` on `device` ("cuda" or "cpu"): explicit values as they are, auto decided."""
    if want != "auto":
        return explicit(want)
    if device == "cuda":
        import torch

        return gpu_choice(torch.cuda.is_bf16_supported(), torch.cuda.get_device_name())
    flags = cpu_flags()
    return cpu_choice(flags, platform.machine(), cached_probe(flags))
