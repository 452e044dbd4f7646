"""Shared pieces of the GPU benchmarks: full-size architectures with random weights, a tokenizer
that covers their vocabulary, pre-tokenized random data, a device-memory poller, and versions.

Memory use and speed do not depend on weight values, so a full-size architecture with random
weights, saved and loaded through the engine's own path, measures what a real checkpoint would.
Every function also works on a CPU with the `tiny` architecture, so a script can be dry-run here
before it spends GPU time.
"""

from __future__ import annotations

import contextlib
import json
import platform
import random
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


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in (
        "torch",
        "transformers",
        "peft",
        "trl",
        "bitsandbytes",
        "accelerate",
        "datasets",
        "liger-kernel",
        "unsloth",
    ):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def build_tokenizer(arch: str, out: Path) -> None:
    """A WordLevel vocabulary covering every id of the architecture, with Llama 3's special tokens
    and chat template: enough to train on pre-tokenized data and to decode samples."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from engine.data.templates import LLAMA3

    n = ARCHS[arch]["vocab_size"]
    specials = LLAMA3_SPECIALS if n >= 128256 else {}
    inverse = {i: s for s, i in specials.items()}
    vocab = {inverse.get(i, f"t{i}"): i for i in range(n)}
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


def build_model(arch: str, out: Path) -> float:
    """Random bf16 weights of the architecture, saved like a hub checkpoint. Returns seconds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.perf_counter()
    spec = dict(ARCHS[arch])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out, max_shard_size="5GB")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    build_tokenizer(arch, out)
    return time.perf_counter() - t0


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
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"input_ids": [rng.randrange(10, vocab) for _ in range(seq_len)]}) + "\n")


class DevicePeak:
    """Polls the whole device's used memory through NVML (CUDA context, PyTorch's reserved pool and
    managed memory of paged optimizers together: what nvidia-smi shows). No-op without a GPU."""

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
