"""Packed micro-batches keep their examples apart under FlashAttention 2 (and SDPA, eager) on a GPU.

    python bench/gpu_attention_check.py [--impl flash_attention_2 sdpa eager] [--out FILE.json]
    python bench/gpu_attention_check.py --device cpu --impl sdpa eager     # a dry run without a GPU

A tiny Llama (engine/tiny.py's architecture, random weights, bf16) reads packed rows collated
exactly as training collates them (engine.data.collate.PadCollator, packed, micro-batch 2; and the
one-row padding-free batch). Then example A's tokens are changed and every other example's logits
must stay the same. The same is measured without FA2's varlen arguments (cu_seq_lens_q/k,
max_length_q/k) to show what they prevent: transformers' FA2 path recognises packing from
position_ids only when the batch is one row.

Prints one JSON object. Exit 0: no leak in any batch the engine builds; 1: a leak (or the control,
unpacked rows under a full attention mask, shows none: the check would be blind); 2: no CUDA or
no FlashAttention 2 (flash_attn not installed) for an implementation asked for.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LEAK = 1e-2  # largest |logit change| of an untouched example still counted as no leak (bf16)
ROWS = [[300, 500, 200], [700, 250, 40]]  # example lengths per packed row (row 1 is the widest)


DEVICE = "cuda"


def build_model(impl: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.models.tiny import TINY_LLAMA

    config = LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k not in ("architectures", "model_type")})
    config.max_position_embeddings = 2048
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Random weights are too small to make attention matter: scale them up so a leak shows.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    model = model.to(device=DEVICE, dtype=torch.bfloat16)
    model.set_attn_implementation(impl)
    return model.eval()


def rows(seed: int, vocab: int, changed: bool = False) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for r, lengths in enumerate(ROWS):
        ids = torch.randint(5, vocab, (sum(lengths),), generator=g)
        if changed and r == 0:  # example A: the first of row 0
            ids[: lengths[0]] = torch.randint(
                5, vocab, (lengths[0],), generator=torch.Generator().manual_seed(99)
            )
        out.append({"input_ids": ids.tolist(), "labels": ids.tolist(), "seq_lengths": lengths})
    return out


def logits(model, batch: dict):
    import torch

    with torch.no_grad():
        moved = {k: v.to(DEVICE) if hasattr(v, "to") else v for k, v in batch.items() if k != "labels"}
        moved.pop("packed_seq_lengths", None)
        return model(**moved, use_cache=False).logits.float().cpu()


def check(model, vocab: int) -> dict:
    from engine.data.collate import PadCollator

    collator = PadCollator(pad_token_id=0, packed=True)
    a = ROWS[0][0]
    result: dict = {}

    # 1. The engine's packed micro-batch of two rows (with the varlen arguments).
    before, after = collator(rows(0, vocab)), collator(rows(0, vocab, changed=True))
    x, y = logits(model, before), logits(model, after)
    others = max(float((x[0, a:] - y[0, a:]).abs().max()), float((x[1] - y[1]).abs().max()))
    result["packed_batch_of_2"] = {
        "changed_example_max_abs_diff": float((x[0, :a] - y[0, :a]).abs().max()),
        "other_examples_max_abs_diff": others,
        "leak": others > LEAK,
    }
    # 2. The same rows without FA2's varlen arguments (what the collator sent before).
    strip = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    x2 = logits(model, {k: v for k, v in before.items() if k not in strip})
    y2 = logits(model, {k: v for k, v in after.items() if k not in strip})
    others2 = max(float((x2[0, a:] - y2[0, a:]).abs().max()), float((x2[1] - y2[1]).abs().max()))
    result["packed_batch_of_2_position_ids_only"] = {
        "other_examples_max_abs_diff": others2,
        "leak": others2 > LEAK,
    }
    # A control: the rows as plain sequences (full attention mask, no packing information) must
    # show a leak, or the check could not see one.
    plain = {"input_ids": before["input_ids"], "attention_mask": before["input_ids"] * 0 + 1}
    plain_after = {"input_ids": after["input_ids"], "attention_mask": plain["attention_mask"]}
    control = float((logits(model, plain)[0, a:] - logits(model, plain_after)[0, a:]).abs().max())
    result["control_unpacked_full_attention"] = {
        "other_examples_max_abs_diff": control,
        "leak": control > LEAK,
    }
    # 3. The one-row padding-free batch (the Unsloth backend's layout).
    collator.padding_free = True
    x3, y3 = logits(model, collator(rows(0, vocab))), logits(model, collator(rows(0, vocab, changed=True)))
    others3 = float((x3[0, a:] - y3[0, a:]).abs().max())
    result["padding_free_row"] = {"other_examples_max_abs_diff": others3, "leak": others3 > LEAK}
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", nargs="+", default=["flash_attention_2", "sdpa", "eager"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="cuda", help="cuda (the check), or cpu for a dry run")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    import torch
    import transformers

    report: dict = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" and torch.cuda.is_available() else DEVICE,
        "rows": ROWS,
        "leak_threshold": LEAK,
        "implementations": {},
    }
    try:
        import flash_attn

        report["flash_attn"] = flash_attn.__version__
    except ImportError:
        report["flash_attn"] = None
    leaked = unavailable = blind = False
    if DEVICE == "cuda" and not torch.cuda.is_available():
        report["error"] = "no CUDA GPU"
        unavailable = True
    else:
        for impl in args.impl:
            try:
                model = build_model(impl)
            except (ImportError, ValueError) as exc:
                report["implementations"][impl] = {
                    "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                }
                unavailable = True
                continue
            result = check(model, model.config.vocab_size)
            report["implementations"][impl] = result
            leaked = leaked or result["packed_batch_of_2"]["leak"] or result["padding_free_row"]["leak"]
            blind = blind or not result["control_unpacked_full_attention"]["leak"]
            del model
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    status = 1 if leaked or blind else 2 if unavailable else 0
    if blind:
        report["error"] = "the control showed no leak: this check cannot detect one here"
    report["ok"] = status == 0
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
