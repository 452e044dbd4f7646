"""GPUs: what an estimate is checked against. A catalog card (presets/gpus.yaml), a plain size, or
the GPU present on this machine (its free memory through nvidia-ml-py; torch is never imported).

All sizes are GiB (2**30 bytes), printed as "GB" the way nvidia-smi and the vendors print them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.errors import UserError
from engine.memory.constants import GIB
from engine.memory.devices import DeviceProfile, profile_for_capability, profile_for_name

SIZE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m|tib|tb|t)?\s*$", re.IGNORECASE)


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
        profile = self.profile or profile_for_name(self.label if self.source != "size" else "", self.total_gb)
        return dataclasses.replace(profile, card_gib=self.total_gb)

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
def _spellings() -> tuple[tuple[str, str], ...]:
    """Every accepted spelling as the catalog writes it ("a100-80", "rtx 4090") with its catalog
    name: "did you mean" reads the model number from these, where a separator still ends it."""
    path = _catalog_path()
    data = yaml.safe_load(path.read_text(encoding="utf-8")) if path else {}
    out: list[tuple[str, str]] = []
    for name, entry in ((data or {}).get("gpus") or {}).items():
        for spelling in [name, entry.get("label", ""), *(entry.get("aliases") or [])]:
            if spelling:
                out.append((str(spelling), str(name)))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _aliases() -> dict[str, str]:
    """Every accepted spelling, normalised, -> catalog name."""
    return {_normalise(spelling): name for spelling, name in _spellings()}


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
    # (TB only to say it is out of range: `--gpu 999TB` was "unknown GPU", as if a card's name.)
    gib = (
        value / 1024 if unit in ("mib", "mb", "m") else value * 1024 if unit in ("tib", "tb", "t") else value
    )
    if not 0 < gib <= 4096:
        raise UserError(f"GPU size {spec.strip()!r}: must be between 1 MB and 4096 GB")
    label = f"{gib:g}GB"
    return Gpu(label, f"{gib:g} GiB GPU", gib, gib, "size")


def _largest_size_gb() -> float:
    """The largest bare number read as a size in GB: twice the catalog's largest card (281 for
    an H200's 140.4 GiB), room for cards the catalog lacks. Above it a bare number is a model
    number (1080, 3080, 6000), which read as gigabytes "fit" anything. The two mistakes differ in
    cost: a refused size costs retyping it with its unit (288GB), a card read as a size gives a
    wrong verdict, believed."""
    largest = max((g.total_gb for g in gpu_catalog().values()), default=141.0)
    return 2 * largest


# A name's family letters, model number and the rest, read before separators are dropped (in
# "a100-80" the number is 100, not 10080): "RTX 4090 Ti" -> ("rtx", "4090", "ti"), "h10o" ->
# ("h", "100", ""): an "o" after a digit is read as a mistyped zero.
_PARTS = re.compile(r"^[\s_\-]*([a-z]*)[\s_\-]*(\d[\do]*)?(.*)$", re.DOTALL)
_SEPARATORS = re.compile(r"[\s_\-]+")
# A suffix that names another card of the same number: a 4060 Ti is not a 4060, an L40S not an L40.
_VARIANT = re.compile(r"^(ti|super|s)(?![a-z])")


def _parts(text: str) -> tuple[str, str, str]:
    """`text` as (family, model number, rest), vendor words dropped."""
    t = text.lower()
    for word in ("nvidia", "geforce", "tesla"):
        t = t.replace(word, "")
    m = _PARTS.match(t)
    if m is None:  # pragma: no cover - every string matches (each group may be empty)
        return _normalise(text), "", ""
    return m.group(1), (m.group(2) or "").replace("o", "0"), _SEPARATORS.sub("", m.group(3))


def _same_number(typed: str, known: str) -> bool:
    """Whether `typed` is the model number `known` with a slip of the fingers: a digit dropped
    (409) or two neighbours swapped (4900). A digit changed is another card (3080 is not 4080),
    and so is one digit more (an A1000 is not an A100) or any change to a short number (an L40 is
    not an L4)."""
    if typed == known:
        return True
    if len(typed) < 3:
        return False
    if len(typed) == len(known):
        diff = [i for i, (a, b) in enumerate(zip(typed, known, strict=True)) if a != b]
        return len(diff) == 2 and diff[1] == diff[0] + 1 and typed[diff[0]] == known[diff[1]]
    if len(known) == len(typed) + 1:
        return any(known[:i] + known[i + 1 :] == typed for i in range(len(known)))
    return False


def _typo_of(typed: str, known: str) -> bool:
    """Whether `typed` can be a typo of the catalog spelling `known`: difflib alone offered the
    RTX 4080 for an RTX 3080, the H100 for a V100 and the L4 for an L40S."""
    t_family, t_number, t_rest = _parts(typed)
    k_family, k_number, k_rest = _parts(known)
    if not t_number or not k_number or not _same_number(t_number, k_number):
        return False
    # One letter is the whole family (V100, H100, A100, L4, T4): a different one is another
    # generation. A longer family (rtx) survives a slip (rxt, gtx).
    if t_family != k_family and min(len(t_family), len(k_family)) < 2:
        return False
    variant = _VARIANT.match(t_rest)
    return variant is None or k_rest.startswith(variant.group(1))


def _suggestion(text: str) -> str | None:
    """The catalog card `text` is a typo of, or None: a wrong suggestion (another generation,
    another model of the same line) is worse than none, since its memory figure is believed."""
    typed = _normalise(text)
    scored = [
        (difflib.SequenceMatcher(None, typed, _normalise(spelling)).ratio(), name)
        for spelling, name in _spellings()
        if _typo_of(text, spelling)
    ]
    best = max(scored, default=(0.0, ""))
    return best[1] if best[0] >= 0.6 else None


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
    """'rtx4090', 'RTX 4090', '4090', '24GB', '24', '80GiB', or 'auto' (this machine's GPU).

    Messages name the value, not where it came from: callers prefix `--gpu` or `hardware.gpu`."""
    text = str(spec).strip()
    if not text:
        raise UserError("no GPU given", "name a GPU (rtx4090) or a size (24GB)")
    if text.lower() == "auto":
        return detect_gpu()
    key = _aliases().get(_normalise(text))
    if key is not None:
        return gpu_catalog()[key]
    memory = "give the card's memory instead, e.g. 10GB"
    # A bare number the catalog has no card by is a size only where a GPU could have that much
    # memory (24, 80): a larger one is a card's model number (3080), and reading it as gigabytes
    # answered FITS for anything.
    largest = _largest_size_gb()
    if re.fullmatch(r"\d+(?:\.\d+)?", text) and float(text) > largest:
        close = _suggestion(text)
        raise UserError(
            f"unknown GPU {text!r}: the catalog has no such card, and {text} is too large to read "
            f"as GB (a bare number is a size up to {largest:.0f} GB)",
            f"did you mean {close!r}? or {memory}" if close else memory,
        )
    size = _size(text)
    if size is not None:
        return size
    close = _suggestion(text)
    if close is not None:
        raise UserError(f"unknown GPU {text!r}", f"did you mean {close!r}? or {memory}")
    if _parts(text)[1]:
        # A model number: a real card the catalog lacks. Its list would only say "not yours" at
        # twice the length; the way on is the card's memory.
        raise UserError(f"unknown GPU {text!r}: the catalog has no such card", memory)
    raise UserError(
        f"unknown GPU {text!r}", f"known: {', '.join(sorted(gpu_catalog()))}; or a size like 24GB"
    )
