"""Build the built-in demo model (engine.models.tiny) on first use, and cache it: a byte-level BPE
tokenizer trained on the demo dataset, and a Llama with random weights. Engine processes only
(tokenizers, transformers, torch)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from engine.data.templates import LLAMA3
from engine.models.tiny import (
    BUILTIN_PREFIX,
    SPECIAL_TOKENS,
    TINY_LLAMA,
    builtin_config,
    dataset_path,
    fingerprint,
)
from engine.paths import cache_root


def _training_texts() -> list[str]:
    texts = []
    with dataset_path().open(encoding="utf-8") as f:
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
    target = cache_root() / "models" / f"{name}-{fingerprint()}"
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
