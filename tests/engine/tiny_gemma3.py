"""A tiny Gemma 3 multimodal checkpoint, built on this machine like engine/models/tiny_build.py
builds the demo Llama: `Gemma3ForConditionalGeneration` with a SigLIP vision tower and a text
decoder of a few layers each, random weights (fixed seed), and the Gemma 3 test tokenizer
(tests/data/tokenizers/gemma3: Gemma's special tokens and its chat template). Nothing is
downloaded. The shapes are the published 4B config's, scaled down."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tokenizers" / "gemma3"

TEXT = {
    "model_type": "gemma3_text",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "sliding_window": 32,
    "query_pre_attn_scalar": 32,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh",
    "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
}
VISION = {
    "model_type": "siglip_vision_model",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 56,
    "patch_size": 14,
    "vision_use_head": False,
}
TOKENS_PER_IMAGE = 4  # a 4x4 patch grid pooled to 2x2


def config(vocab_size: int, pad: int, bos: int, eos: int) -> Any:
    from transformers import Gemma3Config

    return Gemma3Config(
        text_config={**TEXT, "vocab_size": vocab_size, "pad_token_id": pad, "bos_token_id": bos},
        vision_config=dict(VISION),
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        image_token_index=vocab_size,  # out of the text vocabulary, as Gemma 3's own (262144)
        boi_token_index=bos,
        eoi_token_index=eos,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )


def build(out: Path) -> Path:
    """Write the checkpoint to `out` (atomically; a finished folder is reused)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, Gemma3ForConditionalGeneration, GenerationConfig

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-gemma3-", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(TOKENIZER)
        end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
        cfg = config(len(tok), tok.pad_token_id, tok.bos_token_id, end_of_turn)
        torch.manual_seed(0)
        model = Gemma3ForConditionalGeneration(cfg).to(torch.bfloat16)
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id,
            eos_token_id=[end_of_turn, tok.eos_token_id],
            pad_token_id=tok.pad_token_id,
        )
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
