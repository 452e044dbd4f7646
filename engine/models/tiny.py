"""The offline demo model: a small Llama-architecture network with random weights and a byte-level
BPE tokenizer trained locally on the shipped demo dataset, built on first use and cached.

`builtin:tiny-llama` in a preset resolves here. Nothing is downloaded: the config, the tokenizer
and the weights are all made on this machine, deterministically (fixed seeds), so every machine
builds the same model. This module holds what the model is (pure Python: the memory model and the
console read it); tiny_build.py builds it (tokenizers, transformers, torch).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engine.data.templates import LLAMA3

BUILTIN_PREFIX = "builtin:"
DATASET = Path(__file__).resolve().parents[2] / "presets" / "data" / "tiny-instruct.jsonl"

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
]

# The architecture, as a Llama config.json would state it. vocab_size is fixed so the config is
# known before the tokenizer is trained (the memory model reads it without building anything).
TINY_LLAMA: dict = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 1024,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}

BUILTINS = {"tiny-llama": TINY_LLAMA}


def fingerprint() -> str:
    """Changes whenever anything that goes into the build changes, so a stale cache is rebuilt."""
    h = hashlib.sha256()
    h.update(json.dumps(TINY_LLAMA, sort_keys=True).encode())
    h.update(LLAMA3.encode())
    h.update("\n".join(SPECIAL_TOKENS).encode())
    h.update(dataset_path().read_bytes())
    return h.hexdigest()[:12]


def dataset_path() -> Path:
    # Installed without the repository, the dataset travels inside the package (engine/_presets).
    if DATASET.is_file():
        return DATASET
    return Path(__file__).resolve().parents[1] / "_presets" / "data" / "tiny-instruct.jsonl"


def is_builtin(name_or_path: str) -> bool:
    return name_or_path.startswith(BUILTIN_PREFIX)


def builtin_config(name_or_path: str) -> dict:
    name = name_or_path.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTINS:
        from engine.errors import UserError

        raise UserError(
            f"model.name_or_path: unknown built-in model {name_or_path!r}", "use builtin:tiny-llama"
        )
    return dict(BUILTINS[name])
