"""The causal LM loss a batch gives a model, summed over its targets, and their number."""

from __future__ import annotations

from typing import Any

import torch

from engine.data.encoded import IGNORE


def summed_shifted_loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss summed over the batch's targets, the number of targets): what the Trainer divides
    by (num_items_in_batch). `packed_seq_lengths` is Unsloth's and stays out of the model's inputs;
    transformers reads a packed row's examples apart from its positions, with the cache off."""
    inputs = {k: v for k, v in batch.items() if k != "packed_seq_lengths"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss, (labels[:, 1:] != IGNORE).sum()
