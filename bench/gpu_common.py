"""Shared pieces of the GPU benchmarks: full-size architectures with random weights, a tokenizer
that covers their vocabulary, pre-tokenized random data, a device-memory poller, and versions.

Memory use and speed do not depend on weight values, so a full-size architecture with random
weights, saved and loaded through the engine's own path, measures what a real checkpoint would.
Every function also works on a CPU with the `tiny` architecture, so a script can be dry-run here
before it spends GPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

LLAMA3_SPECIALS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|finetune_right_pad_id|>": 128004,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eot_id|>": 128009,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Hugging Face configs as published (config.json of each model), text stack only.
ARCHS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_ROPE,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
    },
    "llama-3.2-1b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0},
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
    },
    "gemma-3-12b": {
        "model_type": "gemma3_text",
        "vocab_size": 262208,
        "hidden_size": 3840,
        "intermediate_size": 15360,
        "num_hidden_layers": 48,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "max_position_embeddings": 131072,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window": 1024,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
        "pad_token_id": 0,
    },
    "tiny": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128009],
    },
}


def arch_names() -> list[str]:
    """Every architecture a bench can build: the published configs above and the model catalog."""
    from engine.memory.architectures import catalog

    return sorted(set(ARCHS) | set(catalog()))


# transformers config keys per catalog family that the catalog does not carry (config.json values).
FAMILY_EXTRAS: dict[str, dict[str, Any]] = {
    "llama": {"rope_theta": 500000.0, "rms_norm_eps": 1e-5},
    "mistral": {"rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "sliding_window": None},
    "qwen2": {"rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "use_sliding_window": False},
    "qwen3": {"rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
    "phi3": {"rope_theta": 250000.0, "rms_norm_eps": 1e-5},
    "gemma3_text": {
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
    },
}


def hf_config(arch: str) -> dict[str, Any]:
    """The transformers config (model_type and keys) of an architecture: the published one in
    ARCHS, else derived from its catalog entry (presets/models), so a bench builds exactly the
    shapes the memory model estimates."""
    if arch in ARCHS:
        return dict(ARCHS[arch])
    from engine.memory.architectures import catalog

    entries = catalog()
    if arch not in entries:
        raise SystemExit(f"unknown architecture {arch!r}: one of {', '.join(arch_names())}")
    return _config_from_architecture(entries[arch])


def _config_from_architecture(a: Any) -> dict[str, Any]:
    if a.family not in FAMILY_EXTRAS:
        raise SystemExit(f"{a.name}: family {a.family} has no bench config layout")
    specials = special_token_ids(a.vocab)
    cfg: dict[str, Any] = {
        "model_type": a.family,
        "vocab_size": a.vocab,
        "hidden_size": a.hidden,
        "intermediate_size": a.ffn,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "max_position_embeddings": a.max_positions,
        "tie_word_embeddings": a.tied_embeddings,
        "bos_token_id": specials["<|begin_of_text|>"],
        "eos_token_id": specials["<|eot_id|>"],
        "pad_token_id": specials["<|finetune_right_pad_id|>"],
        **FAMILY_EXTRAS[a.family],
    }
    if a.family == "gemma3_text":
        cfg.update(
            sliding_window=a.sliding_window,
            sliding_window_pattern=a.sliding_pattern or 6,
            query_pre_attn_scalar=a.head_dim,
        )
    return cfg


def few_layers_config(arch: str, layers: int, vocab: int = 1024) -> dict[str, Any]:
    """The architecture at its real widths (hidden, heads, MLP) with only `layers` decoder layers
    and a small vocabulary: what one layer saves or costs, measured in seconds on any machine."""
    cfg = hf_config(arch)
    specials = special_token_ids(vocab)
    cfg.update(
        num_hidden_layers=layers,
        vocab_size=vocab,
        bos_token_id=specials["<|begin_of_text|>"],
        eos_token_id=specials["<|eot_id|>"],
        pad_token_id=specials["<|finetune_right_pad_id|>"],
    )
    cfg.pop("rope_scaling", None)
    if cfg.get("layer_types"):
        cfg["layer_types"] = cfg["layer_types"][:layers]
    return cfg


def shrunk_config(arch: str) -> dict[str, Any]:
    """A tiny model of the same family and layout (tied or not, q/k/v biases, fused projections,
    sliding windows) for CPU dry runs: every code path of a family, in seconds."""
    cfg = hf_config(arch)
    sliding = cfg.get("sliding_window")
    vocab = 1024
    specials = special_token_ids(vocab)
    cfg.update(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6 if cfg["model_type"] == "gemma3_text" else 4,
        num_attention_heads=4,
        num_key_value_heads=1 if cfg["num_key_value_heads"] * 4 <= cfg["num_attention_heads"] else 2,
        head_dim=16,
        max_position_embeddings=4096,
        bos_token_id=specials["<|begin_of_text|>"],
        eos_token_id=specials["<|eot_id|>"],
        pad_token_id=specials["<|finetune_right_pad_id|>"],
    )
    cfg.pop("rope_scaling", None)
    if sliding:
        cfg["sliding_window"] = 32
    if cfg["model_type"] == "gemma3_text":
        cfg["query_pre_attn_scalar"] = 16
    return cfg


def versions() -> dict[str, str]:
    from engine.versions import TRAINING_STACK, installed

    return {"python": platform.python_version(), **installed((*TRAINING_STACK, "nvidia-ml-py"))}


def gpu_name() -> str:
    """GPU 0's name from NVML ("cpu" without one). NVML, not torch: asking torch would create a
    CUDA context in the caller, whose memory a device figure would then count."""
    info = gpu_info()
    return info["name"] if info else "cpu"


def gpu_info() -> dict[str, Any] | None:
    """GPU 0's name, total memory and driver version from NVML, or None without one."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        return {
            "name": name.decode() if isinstance(name, bytes) else str(name),
            "total_gib": pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30,
            "driver": driver.decode() if isinstance(driver, bytes) else str(driver),
        }
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def special_token_ids(vocab: int) -> dict[str, int]:
    """Llama 3's special tokens at their own ids when the vocabulary reaches them, else in its
    last slots: every id a tokenizer hands out stays inside the embedding matrix."""
    if vocab >= 128256:
        return dict(LLAMA3_SPECIALS)
    return {name: vocab - len(LLAMA3_SPECIALS) + i for i, name in enumerate(LLAMA3_SPECIALS)}


def build_tokenizer(vocab_size: int, out: Path) -> None:
    """A WordLevel vocabulary covering every id of the architecture, with Llama 3's special tokens
    and chat template: enough to train on pre-tokenized data and to decode samples."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from engine.data.templates import LLAMA3

    specials = special_token_ids(vocab_size)
    inverse = {i: s for s, i in specials.items()}
    vocab = {inverse.get(i, f"t{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        unk_token="t0",
    )
    fast.add_special_tokens(
        {"additional_special_tokens": [s for s in specials if s not in fast.all_special_tokens]}
    )
    fast.chat_template = LLAMA3
    fast.save_pretrained(out)


def build_model(
    arch: str, out: Path, config: dict[str, Any] | None = None, device: str | None = None
) -> float:
    """Random bf16 weights of the architecture, saved like a hub checkpoint. Returns seconds.

    Runs in whichever process calls it: a measuring process should call `build_model_in_child`
    instead, so that the CUDA context and cached blocks of the build are not its own."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.perf_counter()
    spec = dict(config or hf_config(arch))
    config_obj = AutoConfig.for_model(spec.pop("model_type"), **spec)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config_obj)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out, max_shard_size="5GB")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    build_tokenizer(int(config_obj.vocab_size), out)
    return time.perf_counter() - t0


def build_model_in_child(arch: str, out: Path, dry_run: bool = False, timeout: float = 900) -> float:
    """build_model in a child process, which exits (and frees its GPU memory) before the caller
    measures anything. Returns seconds, the child's start and imports included."""
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "bench.gpu_common",
        "build",
        arch,
        str(out),
        *(["--dry-run"] if dry_run else []),
    ]
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"building {arch} failed: {(proc.stderr or proc.stdout)[-2000:]}")
    return time.perf_counter() - t0


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def token_run_overrides(
    model_dir: Path, data_file: Path, seq: int, micro_batch: int, grad_accum: int, steps: int
) -> list[str]:
    """`--set` overrides for a run of `qlc train` on rows of exactly `seq` pre-tokenized tokens
    (write_tokens): the model and data, the step counts, shared/anchors.md's r=32 alpha=64, and
    no periodic saves or evaluations to disturb the timings."""
    return [
        f"model.name_or_path={model_dir}",
        f"data.source={data_file}",
        "data.format=tokens",
        "data.packing=false",
        "data.val_fraction=0",
        f"train.seq_len={seq}",
        f"train.micro_batch={micro_batch}",
        f"train.grad_accum={grad_accum}",
        f"train.max_steps={steps}",
        "train.save_steps=100000",
        "train.logging_steps=1",
        "train.eval_steps=0",
        "lora.r=32",
        "lora.alpha=64",
    ]


def report_header(arch: str, recipe: dict[str, Any]) -> dict[str, Any]:
    """What every results file starts with: when, on which GPU, with which libraries, what."""
    return {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": gpu_name(),
        "versions": versions(),
        "arch": arch,
        "recipe": recipe,
    }


def write_tokens(path: Path, rows: int, seq_len: int, vocab: int = 128000, seed: int = 0) -> None:
    """Rows of `seq_len` random token ids below `vocab` (and below the special tokens, which sit
    at its top when the vocabulary is small), written atomically: concurrent readers never see a
    half-written file."""
    rng = random.Random(seed)
    top = min(vocab, 128000, min(special_token_ids(vocab).values()))
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with tmp.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"input_ids": [rng.randrange(10, top) for _ in range(seq_len)]}) + "\n")
    tmp.replace(path)


class DevicePeak:
    """Polls the whole device's used memory through NVML (CUDA context, PyTorch's reserved pool and
    managed memory of paged optimizers together: what nvidia-smi shows). No-op without a GPU.

    Device-wide: it counts every process on the GPU, the caller's own CUDA context included.
    bench/gpu_memory.py counts only a run's own processes."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
            self.baseline_bytes = pynvml.nvmlDeviceGetMemoryInfo(self._handle).used
        except Exception:
            self._nvml = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
            self.peak_bytes = max(self.peak_bytes, used)
            time.sleep(self.interval)

    def start(self) -> DevicePeak:
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def reset(self) -> None:
        self.peak_bytes = 0

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    @property
    def peak_gib(self) -> float | None:
        return self.peak_bytes / 2**30 if self._nvml is not None else None

    @property
    def peak_above_baseline_gib(self) -> float | None:
        return (self.peak_bytes - self.baseline_bytes) / 2**30 if self._nvml is not None else None


def main() -> int:
    """`python -m bench.gpu_common build ARCH OUT [--dry-run]`: the child of build_model_in_child."""
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("arch")
    b.add_argument("out", type=Path)
    b.add_argument("--dry-run", action="store_true", help="a shrunk model of the same family, on the CPU")
    args = ap.parse_args()
    config = shrunk_config(args.arch) if args.dry_run else hf_config(args.arch)
    seconds = build_model(args.arch, args.out, config, device="cpu" if args.dry_run else None)
    print(json.dumps({"arch": args.arch, "seconds": seconds, "bytes": folder_bytes(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
