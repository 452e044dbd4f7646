"""Rows -> a batch of tensors for the Trainer: padded rows, or one padding-free row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.data.masking import IGNORE


@dataclass
class PadCollator:
    """Right-pads a list of rows (input_ids, labels[, position_ids]) to the longest one.

    Padding takes `pad_token_id` and label -100. Packed rows carry position_ids that restart at 0
    for each example and NO attention_mask: transformers builds a block-diagonal causal mask from
    position_ids only when attention_mask is None (masking_utils.find_packed_sequence_indices;
    flash-attention's varlen path does the same), so attention stays within each example. The
    padding of a packed row gets its own positions 0..k, making it one more separate sequence.

    `padding_free` puts the whole micro-batch in ONE row instead, each example after the other
    with its own positions, and no padding at all, as a bare Unsloth script batches on its own.
    The row also carries `packed_seq_lengths` (int32, one length per example): Unsloth's
    attention takes the examples' boundaries from it alone (unsloth/utils/packing.py
    get_packed_info_from_kwargs), and without it would attend across examples. transformers'
    own attention finds the same boundaries from position_ids.

    Wherever a row holds several examples, the first token of each is no target: the shifted
    loss would otherwise train the last token of one example to predict the next example.
    """

    pad_token_id: int
    packed: bool = False
    pad_to_multiple_of: int | None = None
    padding_free: bool = False

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if self.padding_free:
            return self._one_row(rows)
        width = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        position_ids = torch.zeros((n, width), dtype=torch.long)
        for i, row in enumerate(rows):
            length = len(row["input_ids"])
            input_ids[i, :length] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            labels[i, :length] = torch.as_tensor(row["labels"], dtype=torch.long)
            attention_mask[i, :length] = 1
            if self.packed:
                position_ids[i, :length] = torch.as_tensor(row["position_ids"], dtype=torch.long)
                position_ids[i, length:] = torch.arange(width - length)
        if self.packed:
            labels[position_ids == 0] = IGNORE
            return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if bool(attention_mask.all()):
            # No padding in this batch: an all-ones mask says nothing, and some kernels take a
            # slower masked path for it (Unsloth's compiled blocks). Plain positions say the same
            # (TRL's loss wants one of the two; one sequence per row is not a packed row).
            position_ids[:] = torch.arange(width)
            return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    def _one_row(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for row in rows:
            ids += row["input_ids"]
            labels += row["labels"]
            positions += row["position_ids"] if self.packed else range(len(row["input_ids"]))
        position_ids = torch.as_tensor([positions], dtype=torch.long)
        label_ids = torch.as_tensor([labels], dtype=torch.long)
        label_ids[position_ids == 0] = IGNORE
        return {
            "input_ids": torch.as_tensor([ids], dtype=torch.long),
            "labels": label_ids,
            "position_ids": position_ids,
            "packed_seq_lengths": torch.as_tensor(sequence_lengths(positions), dtype=torch.int32),
        }


def sequence_lengths(positions: list[int]) -> list[int]:
    """The lengths of the examples in a row whose positions restart at 0 for each."""
    starts = [i for i, p in enumerate(positions) if p == 0] or [0]
    if starts[0] != 0:  # a row that does not start an example still holds one from 0
        starts.insert(0, 0)
    return [b - a for a, b in zip(starts, [*starts[1:], len(positions)], strict=True)]


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad token, else its end of sequence (padding is masked out either way)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if isinstance(token_id, int):
            return token_id
    return 0  # pragma: no cover
