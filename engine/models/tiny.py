"""The offline demo model: a small Llama-architecture network with random weights and a byte-level
BPE tokenizer trained locally on the shipped demo dataset, built on first use and cached.

`builtin:tiny-llama` in a preset resolves here. Nothing is downloaded: the config, the tokenizer
and the weights are all made on this machine, deterministically (fixed seeds), so every machine
builds the same model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
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


def _fingerprint() -> str:
    """Changes whenever anything that goes into the build changes, so a stale cache is rebuilt."""
    h = hashlib.sha256()
    h.update(json.dumps(TINY_LLAMA, sort_keys=True).encode())
    h.update(LLAMA3.encode())
    h.update("\n".join(SPECIAL_TOKENS).encode())
    h.update(_dataset_path().read_bytes())
    return h.hexdigest()[:12]


def _dataset_path() -> Path:
    # Installed without the repository, the dataset travels inside the package (engine/_presets).
    if DATASET.is_file():
        return DATASET
    return Path(__file__).resolve().parents[1] / "_presets" / "data" / "tiny-instruct.jsonl"


def cache_root() -> Path:
    env = os.environ.get("QLC_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("qlora-console"))


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


def _training_texts() -> list[str]:
    texts = []
    with _dataset_path().open(encoding="utf-8") as f:
        for line in f:
            for message in json.loads(line)["messages"]:
                texts.append(message["content"])
    return texts


def _build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_LLAMA["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=TINY_LLAMA["max_position_embeddings"],
    )
    fast.chat_template = LLAMA3
    fast.save_pretrained(out)


def _build_model(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(out)
    cfg = LlamaConfig(
        **{k: v for k, v in TINY_LLAMA.items() if k not in ("architectures", "model_type")},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.convert_tokens_to_ids("<|eot_id|>"),
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        # Llama 3 style: a turn ends at <|eot_id|>; <|end_of_text|> ends a document.
        eos_token_id=[tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")],
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(out)


def ensure_builtin(name_or_path: str) -> Path:
    """The directory of a built-in model, building it once (atomically) if it is not cached."""
    name = name_or_path.removeprefix(BUILTIN_PREFIX)
    builtin_config(name_or_path)  # validates the name
    target = cache_root() / "models" / f"{name}-{_fingerprint()}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _build_tokenizer(tmp)
        _build_model(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process built it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
