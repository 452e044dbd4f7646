"""What a GPU adds to a training step's memory outside the model: per GPU class, the CUDA context
(outside PyTorch's allocator) and the cuBLAS / cuBLASLt workspaces (inside it).

The device total of an estimate is: torch peak (which holds the workspaces) + this class's CUDA
context + the kernel modules the backend loads (constants.KERNEL_MODULES_GIB, measured) + the paged
optimizer state. Every number says where it comes from: measured here (the H200 calibration of
2026-12-04) or sourced (a public measurement or the library's code), and `qlc estimate` prints which
set it used.

The class of a card comes from its compute capability (NVML reports it for `--gpu auto`) or, for a
catalog card or a name, from the name nvidia-smi shows. A plain size (`--gpu 24GB`) has no class:
it takes the largest context known (the H200's), which errs on the safe side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.memory.constants import GIB, MIB

# PyTorch's cuBLAS workspace (aten/src/ATen/cuda/CublasHandlePool.cpp, parseChosenWorkspaceSize):
# CUBLAS_WORKSPACE_CONFIG ":4096:2:16:8" by default (2 x 4 MiB + 8 x 16 KiB), 32 MiB on Hopper
# (pytorch/pytorch#89027) and on Blackwell (pytorch/pytorch#175344). Allocated through the caching
# allocator: inside the torch peak.
CUBLAS_DEFAULT_BYTES = 2 * 4 * MIB + 8 * 16 * 1024
CUBLAS_HOPPER_BYTES = 32 * MIB
# cuBLASLt's workspace (CUBLASLT_WORKSPACE_SIZE, pytorch/pytorch#120925): 1 MiB, 4 MiB on sm 8.x
# cards of 24 GiB or more, 32 MiB on sm 9.0 and later. Also through the caching allocator.
CUBLASLT_SMALL_BYTES = 1 * MIB
CUBLASLT_AMPERE_24GB_BYTES = 4 * MIB
CUBLASLT_HOPPER_BYTES = 32 * MIB


@dataclass(frozen=True)
class DeviceProfile:
    """The per-GPU-class constants of the device total."""

    name: str  # hopper, ada-ampere, ...
    label: str  # what `qlc estimate` prints
    context_gib: float  # the bare CUDA context, outside PyTorch's pool
    cublas_bytes: int  # cuBLAS workspace, inside PyTorch's pool
    cublaslt_bytes: int  # cuBLASLt workspace, inside PyTorch's pool
    source: str  # where the context figure comes from
    # The card's memory, where known: Unsloth's loss takes another route on a card of 24.5 GiB or
    # less (constants.UNSLOTH_SMALL_CARD_GIB). Not the class's own figure: gpus.Gpu.device sets it
    # for the card at hand.
    card_gib: float | None = None

    @property
    def workspace_bytes(self) -> int:
        return self.cublas_bytes + self.cublaslt_bytes

    def describe(self) -> str:
        ws = self.workspace_bytes / MIB
        return f"{self.label}: CUDA context {self.context_gib:.2f} GB ({self.source}); cuBLAS + cuBLASLt {ws:.0f} MiB"


# Measured here: bench/results/memory-calibration-matrix-h200-2026-12-04*.json, the probe's NVML
# per-process figure right after `torch.zeros(1, device="cuda")` (nvml_probe.context_gib 0.598 GiB;
# driver 580.159, CUDA 13.0, torch 2.11). The matrix's hf processes held 64 MiB (= 32 + 32 MiB of
# workspaces) before their first configuration: baseline_allocated_gib 0.0625.
HOPPER = DeviceProfile(
    "hopper",
    "Hopper (H100, H200)",
    0.598,
    CUBLAS_HOPPER_BYTES,
    CUBLASLT_HOPPER_BYTES,
    "measured on an H200, 2026-12-04",
)
# Sourced: unslothai/unsloth-zoo#1053 measured 426 MiB in nvidia-smi for a bare context on an RTX
# 6000 Ada (sm 8.9, 142 SMs) with torch 2.10+cu130 (the same CUDA major as this stack). A bare
# context on an RTX 3090 with torch 2.7.1+cu128 measured 256 MiB (invoke-ai/InvokeAI#9413): the
# larger, newer-CUDA figure is used for every sm 8.6 / 8.9 card.
ADA_AMPERE = DeviceProfile(
    "ada-ampere",
    "Ada / Ampere consumer and workstation (RTX 30xx, 40xx, A10, L4)",
    426 / 1024,
    CUBLAS_DEFAULT_BYTES,
    CUBLASLT_AMPERE_24GB_BYTES,
    "sourced: 426 MiB on an RTX 6000 Ada, unslothai/unsloth-zoo#1053",
)
# No public figure found for these: the largest context known (the H200's) keeps the verdict safe.
A100 = DeviceProfile(
    "ampere-datacenter",
    "A100",
    HOPPER.context_gib,
    CUBLAS_DEFAULT_BYTES,
    CUBLASLT_AMPERE_24GB_BYTES,
    "not measured: the H200's figure",
)
BLACKWELL = DeviceProfile(
    "blackwell",
    "Blackwell (RTX 50xx, B200)",
    HOPPER.context_gib,
    CUBLAS_HOPPER_BYTES,
    CUBLASLT_HOPPER_BYTES,
    "not measured: the H200's figure",
)
TURING = DeviceProfile(
    "turing",
    "Turing (T4)",
    ADA_AMPERE.context_gib,
    CUBLAS_DEFAULT_BYTES,
    CUBLASLT_SMALL_BYTES,
    "not measured: the RTX 6000 Ada's figure, a card with 3.5x its SMs",
)
UNKNOWN = DeviceProfile(
    "unknown",
    "unknown card (the largest context known)",
    HOPPER.context_gib,
    CUBLAS_HOPPER_BYTES,
    CUBLASLT_HOPPER_BYTES,
    "the H200's measured figure, the largest known",
)
PROFILES = {p.name: p for p in (HOPPER, ADA_AMPERE, A100, BLACKWELL, TURING, UNKNOWN)}

# Names nvidia-smi shows, in the order they are tried (catalog labels and NVML names both match).
_NAMES: tuple[tuple[str, DeviceProfile], ...] = (
    (r"\b(h100|h200|h800|h20|gh200)\b", HOPPER),
    (r"\brtx\s*50\d\d|\bb(100|200)\b|\bgb(200|300)\b|\brtx pro 6000\b", BLACKWELL),
    (r"\ba100\b|\ba800\b|\ba30\b", A100),
    (r"\brtx\s*[34]0\d\d|\ba10g?\b|\bl4\b|\bl40s?\b|\brtx\s*a\d{4}\b|\brtx 6000 ada\b|\ba40\b", ADA_AMPERE),
    (r"\bt4\b|\brtx\s*20\d\d", TURING),
)


def profile_for_capability(major: int, minor: int, total_gib: float | None = None) -> DeviceProfile:
    """The class of a card from its CUDA compute capability (NVML's, for --gpu auto)."""
    if major >= 10:
        return BLACKWELL
    if major == 9:
        return HOPPER
    if major == 8 and minor == 0:
        return A100
    if major == 8:
        small = total_gib is not None and total_gib < 24
        return ADA_AMPERE if not small else _small_ampere()
    if major == 7:
        return TURING
    return UNKNOWN


def _small_ampere() -> DeviceProfile:
    # pytorch/pytorch#120925 keeps cuBLASLt at 1 MiB on sm 8.x cards under 24 GiB.
    return DeviceProfile(
        ADA_AMPERE.name,
        ADA_AMPERE.label,
        ADA_AMPERE.context_gib,
        ADA_AMPERE.cublas_bytes,
        CUBLASLT_SMALL_BYTES,
        ADA_AMPERE.source,
    )


def profile_for_name(name: str, total_gib: float | None = None) -> DeviceProfile:
    """The class of a card from the name nvidia-smi shows ("NVIDIA GeForce RTX 4090")."""
    text = name.lower().replace("geforce", " ").replace("nvidia", " ")
    for pattern, profile in _NAMES:
        if re.search(pattern, text):
            if profile is ADA_AMPERE and total_gib is not None and total_gib < 24:
                return _small_ampere()
            return profile
    return UNKNOWN


def default_profile() -> DeviceProfile:
    """No GPU named: the largest context known (the estimate stays on the safe side)."""
    return UNKNOWN


def context_bytes(profile: DeviceProfile) -> float:
    return profile.context_gib * GIB
