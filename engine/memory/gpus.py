"""GPUs: what an estimate is checked against. A catalog card (presets/gpus.yaml), a plain size, or
the GPU present on this machine (its free memory through nvidia-ml-py; torch is never imported).

All sizes are GiB (2**30 bytes), printed as "GB" the way nvidia-smi and the vendors print them.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.errors import UserError
from engine.memory.constants import GIB
from engine.memory.devices import DeviceProfile, profile_for_capability, profile_for_name

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Gpu:
    name: str  # the catalog key, "24GB" for a plain size, "auto" for this machine's GPU
    label: str  # what nvidia-smi calls it
    total_gb: float  # the card's memory, GiB
    budget_gb: float  # what a run may use, GiB: the total, or the free memory of a present GPU
    source: str = "catalog"  # catalog, size or nvml
    # The class of the card (CUDA context, workspaces): NVML's compute capability for a present GPU;
    # None: from the name (a catalog card), or the safe default for a plain size.
    profile: DeviceProfile | None = None
    tensor_tflops: float | None = None  # dense 16-bit tensor peak, TFLOP/s (catalog cards that state it)

    @property
    def device(self) -> DeviceProfile:
        """The device-level constants the estimate uses on this GPU (engine.memory.devices)."""
        if self.profile is not None:
            return self.profile
        return profile_for_name(self.label if self.source != "size" else "", self.total_gb)

    def __str__(self) -> str:
        if self.source == "nvml":
            return f"{self.label} ({self.budget_gb:.1f} of {self.total_gb:.1f} GiB free)"
        if self.source == "size":
            return f"{self.total_gb:g} GiB GPU"
        return f"{self.label} ({self.total_gb:.1f} GiB)"


def _catalog_path() -> Path | None:
    here = Path(__file__).resolve().parent.parent
    for path in (here.parent / "presets" / "gpus.yaml", here / "_presets" / "gpus.yaml"):
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=1)
def gpu_catalog() -> dict[str, Gpu]:
    """The catalog cards by name, read once per process."""
    path = _catalog_path()
    if path is None:
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    out: dict[str, Gpu] = {}
    for name, entry in (data.get("gpus") or {}).items():
        total = float(entry["total_mib"]) / 1024
        peak = float(entry["tensor_tflops"]) if entry.get("tensor_tflops") else None
        out[str(name)] = Gpu(
            str(name), str(entry.get("label", name)), total, total, "catalog", tensor_tflops=peak
        )
    return out


@functools.lru_cache(maxsize=1)
def _aliases() -> dict[str, str]:
    """Every accepted spelling, normalised, -> catalog name."""
    path = _catalog_path()
    data = yaml.safe_load(path.read_text(encoding="utf-8")) if path else {}
    out: dict[str, str] = {}
    for name, entry in ((data or {}).get("gpus") or {}).items():
        for spelling in [name, entry.get("label", ""), *(entry.get("aliases") or [])]:
            if spelling:
                out[_normalise(str(spelling))] = str(name)
    return out


def peak_tflops(gpu: Gpu) -> float | None:
    """The card's dense 16-bit tensor peak: the catalog's, also for a detected GPU the catalog
    knows by name (None for a plain size or an unlisted card: no utilisation is shown)."""
    if gpu.tensor_tflops:
        return gpu.tensor_tflops
    if gpu.source != "nvml":
        return None
    name = _aliases().get(_normalise(gpu.label))
    found = gpu_catalog().get(name) if name else None
    return found.tensor_tflops if found else None


def _normalise(text: str) -> str:
    """'NVIDIA GeForce RTX 4090' and 'rtx-4090' -> 'rtx4090'."""
    t = text.lower()
    for word in ("nvidia", "geforce", "tesla"):
        t = t.replace(word, "")
    return re.sub(r"[\s_\-]+", "", t)


def _size(spec: str) -> Gpu | None:
    m = SIZE.match(spec)
    if not m:
        return None
    value, unit = float(m.group(1)), (m.group(2) or "gb").lower()
    gib = value / 1024 if unit in ("mib", "mb", "m") else value
    if not 0 < gib <= 4096:
        raise UserError(f"--gpu {spec!r}: a GPU size must be between 1 MB and 4096 GB")
    label = f"{gib:g}GB"
    return Gpu(label, f"{gib:g} GiB GPU", gib, gib, "size")


def detect_gpu(index: int = 0) -> Gpu:
    """The GPU on this machine, with its free memory now (NVML: no CUDA context is created)."""
    hint = "pass --gpu NAME or SIZE, e.g. --gpu rtx4090 or --gpu 24GB"
    try:
        import pynvml
    except ImportError:
        raise UserError(
            "--gpu auto: nvidia-ml-py is not installed to find this machine's GPU", hint
        ) from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        raise UserError("--gpu auto: no NVIDIA GPU found on this machine (no driver)", hint) from None
    try:
        if pynvml.nvmlDeviceGetCount() <= index:
            raise UserError("--gpu auto: no NVIDIA GPU found on this machine", hint)
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else str(name)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        profile = _capability_profile(pynvml, handle, mem.total / GIB)
    except pynvml.NVMLError as exc:
        raise UserError(f"--gpu auto: cannot read the GPU's memory ({exc})", hint) from None
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    return Gpu("auto", name, mem.total / GIB, mem.free / GIB, "nvml", profile)


def _capability_profile(pynvml: object, handle: object, total_gib: float) -> DeviceProfile | None:
    """The card's class from its compute capability; None (the name decides) where NVML has none."""
    try:
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)  # type: ignore[attr-defined]
    except Exception:
        return None
    return profile_for_capability(int(major), int(minor), total_gib)


def resolve_gpu(spec: str) -> Gpu:
    """'rtx4090', 'RTX 4090', '4090', '24GB', '24', '80GiB', or 'auto' (this machine's GPU)."""
    text = str(spec).strip()
    if not text:
        raise UserError("--gpu: empty", "name a GPU (rtx4090) or a size (24GB)")
    if text.lower() == "auto":
        return detect_gpu()
    # A bare number names a card when the catalog has one by that number (4090), else a size (24).
    key = _aliases().get(_normalise(text))
    if key is not None:
        return gpu_catalog()[key]
    size = _size(text)
    if size is not None:
        return size
    names = sorted(gpu_catalog())
    close = difflib.get_close_matches(_normalise(text), names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(f"unknown GPU {text!r}", f"{hint}known: {', '.join(names)}; or a size like 24GB")
