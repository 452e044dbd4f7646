"""What merging a run's adapter into its 16-bit base needs, and where the merge can run.

`qlc export` never merges into the 4-bit weights a run trained on: rounding W + BA back to NF4
would throw most of the update away. It loads the base in bf16 or fp16 instead, on the GPU when
the GPU has room for it, else in host memory. The terms, in GiB:

- weights: every parameter of the base at 2 bytes;
- adapter: the LoRA matrices at 4 bytes (peft upcasts bf16/fp16 adapter weights to fp32 when it
  loads them, `autocast_adapter_dtype=True`), and each `modules_to_save` copy at 2 bytes;
- merge: the largest delta B·A being added (fp32, plus its in-place sum), one module at a time;
- check: the reference logits kept for the verification (model dtype, on the host) and one
  prompt's logits while it runs (counted at 4 bytes: its forward pass and a few compared rows);
- save (host memory, GPU merges only): safetensors 0.8 writes CPU tensors straight from their
  memory, but copies GPU tensors to the host first, one shard (`--max-shard-size`) at a time;
- process: the engine process itself (the Python runtime with torch, transformers and peft), and
  on a GPU the CUDA context.

The merged model is freed before the exported folder is reloaded for the check, so the two are
never resident together. Pure arithmetic: the console imports this without torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from engine.config import RunConfig
from engine.memory.architectures import Architecture, resolve_architecture
from engine.memory.constants import GIB, KERNEL_MODULES_GIB
from engine.memory.devices import default_profile

# Resident memory of an engine process after importing torch (CPU build 2.13), transformers 5.17
# and peft 0.21: 0.38 GiB measured (ru_maxrss) on the 2-core CI machine. Rounded up.
HOST_PROCESS_GIB = 0.4

# The verification's prompts: how many, and their length cap in tokens (engine.export.verify).
CHECK_PROMPTS = 3
CHECK_MAX_TOKENS = 128

BYTES_16BIT = 2
ADAPTER_BYTES = 4  # fp32 after peft's autocast on load

SHARD_DEFAULT = "5GB"  # `--max-shard-size`: the hub's usual shard size
SHARD_DEFAULT_BYTES = 5 * 10**9


@dataclass(frozen=True)
class MergeTerm:
    name: str
    gb: float
    note: str = ""


@dataclass(frozen=True)
class MergeEstimate:
    """The merge's memory need, in GiB: on the GPU (plus host memory beside it) or on the CPU."""

    arch: Architecture
    dtype: str
    terms: tuple[MergeTerm, ...]
    gpu_gb: float  # device memory when the merge runs on the GPU (CUDA context included)
    gpu_host_gb: float  # host memory beside it (process, save buffer, kept logits)
    cpu_gb: float  # host memory when everything runs on the CPU

    def term(self, name: str) -> float:
        return next(t.gb for t in self.terms if t.name == name)

    def summary(self) -> str:
        parts = ", ".join(f"{t.name} {t.gb:.2f}" for t in self.terms if t.gb >= 0.005)
        return (
            f"{self.cpu_gb:.2f} GiB of RAM on the CPU, or {self.gpu_gb:.2f} GiB on a GPU and "
            f"{self.gpu_host_gb:.2f} GiB of RAM ({parts})"
        )


@dataclass(frozen=True)
class MergePlacement:
    """Where the merge runs: "cuda", "cpu", or "" when neither has room (`reason` says why)."""

    device: str
    need_gb: float
    free_gb: float | None
    reason: str

    @property
    def refused(self) -> bool:
        return not self.device


def _lora_params(cfg: RunConfig, arch: Architecture) -> int:
    """LoRA A and B of every targeted linear layer. Names the architecture fuses (q/k/v into
    qkv_proj, gate/up into gate_up_proj) count the fused module once."""
    mods = arch.linear_modules()
    fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj"}
    fused |= {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
    wanted = list(cfg.lora.target_modules)
    names = list(mods) if wanted in (["all-linear"], ["all_linear"]) else wanted
    targets = {n if n in mods else fused.get(n, n) for n in names} & set(mods)
    return arch.layers * sum(cfg.lora.r * (mods[n][0] + mods[n][1]) for n in targets)


def _largest_delta(arch: Architecture) -> int:
    """Elements of the largest linear weight: a bound on one module's B·A delta."""
    return max((i * o for i, o in arch.linear_modules().values()), default=0)


def parse_size(text: str) -> int:
    """A shard size as transformers reads `max_shard_size`: '5GB' is 5e9 bytes, '2GiB' 2**31,
    '500MB', '100KB'. Raises ValueError on anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg])(i?)b\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(text)
    power = "kmg".index(m.group(2).lower()) + 1
    scale = 1024**power if m.group(3) else 1000**power
    return int(float(m.group(1)) * scale)


def outside_torch_gib() -> float:
    """A GPU process's memory outside PyTorch's pool: the CUDA context (the safe default class) and
    the kernels an hf process loads (engine.memory.devices, constants.KERNEL_MODULES_GIB)."""
    return default_profile().context_gib + KERNEL_MODULES_GIB["hf"]


def estimate_merge(
    cfg: RunConfig,
    dtype: str = "bf16",
    shard_bytes: int = SHARD_DEFAULT_BYTES,
    arch: Architecture | None = None,
) -> MergeEstimate:
    """The merge of this run's adapter into its base in `dtype` (bf16 or fp16)."""
    arch = arch or resolve_architecture(cfg)
    counts = arch.param_counts()
    weights = counts["total"] * BYTES_16BIT
    to_save = sum(counts[m] or counts["embed_tokens"] for m in cfg.lora.modules_to_save if m in counts)
    adapter = _lora_params(cfg, arch) * ADAPTER_BYTES + to_save * BYTES_16BIT
    merge = _largest_delta(arch) * (ADAPTER_BYTES + ADAPTER_BYTES)
    tokens = CHECK_PROMPTS * min(cfg.train.seq_len, CHECK_MAX_TOKENS)
    kept_logits = tokens * arch.vocab * BYTES_16BIT
    one_prompt = min(cfg.train.seq_len, CHECK_MAX_TOKENS) * arch.vocab * 4
    save = min(shard_bytes, weights)
    terms = (
        MergeTerm("weights", weights / GIB, f"{counts['total'] / 1e9:.2f}B parameters at 2 bytes"),
        MergeTerm("adapter", adapter / GIB, "LoRA in fp32 (peft's upcast) + modules_to_save copies"),
        MergeTerm("merge", merge / GIB, "the largest B·A delta, fp32, and its sum"),
        MergeTerm("check", (kept_logits + one_prompt) / GIB, f"logits of {tokens} check tokens"),
        MergeTerm("save", save / GIB, "GPU merges: one shard copied to host memory to be written"),
        MergeTerm("process", HOST_PROCESS_GIB, "the engine process (torch, transformers, peft)"),
    )
    model_side = (weights + adapter + merge + one_prompt) / GIB
    return MergeEstimate(
        arch=arch,
        dtype=dtype,
        terms=terms,
        gpu_gb=model_side + outside_torch_gib(),
        gpu_host_gb=HOST_PROCESS_GIB + (save + kept_logits) / GIB,
        cpu_gb=model_side + HOST_PROCESS_GIB + kept_logits / GIB,
    )


# The export's check measures the dtype's own rounding against an fp32 copy of the model (engine/
# export/merge.py) when that copy is at most this large: a CPU forward of a bigger fp32 model takes
# minutes, and there the relative tolerance alone applies.
FP32_REFERENCE_MAX_GIB = 16.0


def fp32_reference_gb(est: MergeEstimate) -> float:
    """Host memory the fp32 reference takes: the base and adapter in fp32 and one prompt's logits,
    loaded on the CPU once the merged model is gone."""
    return 2 * est.term("weights") + est.term("adapter") + est.term("check") + HOST_PROCESS_GIB


def fp32_reference_fits(est: MergeEstimate, host_free_gb: float | None) -> bool:
    need = fp32_reference_gb(est)
    return need <= FP32_REFERENCE_MAX_GIB and host_free_gb is not None and need <= 0.8 * host_free_gb


def host_available_gb() -> float | None:
    """Host memory a new allocation can get now: MemAvailable, else psutil when installed."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available / GIB


def place_merge(
    est: MergeEstimate, gpu_free_gb: float | None, host_free_gb: float | None, want: str = "auto"
) -> MergePlacement:
    """The GPU when it is wanted (or auto) and has room for the merge (and the host for what stays
    there); else the CPU when host memory has room; else refused, saying what each has.

    An unknown amount of host memory (no /proc/meminfo, no psutil) is taken as room: the estimate
    cannot be checked there, and refusing would block every export on such a system."""
    host_ok = host_free_gb is None or host_free_gb >= est.gpu_host_gb
    gpu_ok = gpu_free_gb is not None and gpu_free_gb >= est.gpu_gb
    if want in ("auto", "cuda") and gpu_ok and host_ok:
        return MergePlacement(
            "cuda", est.gpu_gb, gpu_free_gb, f"needs {est.gpu_gb:.2f} GiB, {gpu_free_gb:.2f} GiB free"
        )
    if want == "cuda":
        have = "no CUDA GPU" if gpu_free_gb is None else f"{gpu_free_gb:.2f} GiB free"
        return MergePlacement(
            "", est.gpu_gb, gpu_free_gb, f"the merge needs {est.gpu_gb:.2f} GiB on the GPU ({have})"
        )
    if host_free_gb is None or host_free_gb >= est.cpu_gb:
        free = "unknown" if host_free_gb is None else f"{host_free_gb:.2f} GiB"
        why = "" if gpu_free_gb is None or want == "cpu" else f"; the GPU has {gpu_free_gb:.2f} GiB free"
        return MergePlacement(
            "cpu", est.cpu_gb, host_free_gb, f"needs {est.cpu_gb:.2f} GiB of RAM, {free} available{why}"
        )
    gpu = "" if gpu_free_gb is None else f" or {est.gpu_gb:.2f} GiB on the GPU ({gpu_free_gb:.2f} GiB free)"
    return MergePlacement(
        "",
        est.cpu_gb,
        host_free_gb,
        f"the merge needs {est.cpu_gb:.2f} GiB of RAM ({host_free_gb:.2f} GiB available){gpu}",
    )


def process_peak_rss_gb() -> float | None:
    """This process's peak resident memory (Linux ru_maxrss is in KiB)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if os.uname().sysname == "Darwin" else 1024) / GIB
