"""Rows -> a batch of tensors for the Trainer: padded rows, or one padding-free row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.data.encoded import IGNORE


def row_lengths(row: dict[str, Any]) -> list[int]:
    """The lengths of the examples a packed row holds (`seq_lengths`, as the prepared data
    stores them; or read from `position_ids` restarting at 0 for each example)."""
    if "seq_lengths" in row:
        return [int(n) for n in row["seq_lengths"]]
    return sequence_lengths(list(row["position_ids"]))


def positions(lengths: list[int]) -> list[int]:
    """Position ids restarting at 0 for each example."""
    return _positions(lengths)[0].tolist()


def _long(values: Any) -> Any:
    """A (nested) list of ints as an int64 tensor. Through numpy: on a micro-batch of 4 x 4,096
    tokens it reads the lists about 3x faster than torch.as_tensor, and the batch is built on the
    host while the device waits (between one step's optimizer and the next step's forward)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(values, dtype=np.int64))


def _positions(lengths: list[int]) -> Any:
    """Position ids restarting at 0 for each example, as an int64 tensor of one row."""
    import numpy as np
    import torch

    ranges = [np.arange(n, dtype=np.int64) for n in lengths]
    return torch.from_numpy(np.concatenate(ranges) if ranges else np.zeros(0, dtype=np.int64))[None]


@dataclass
class PadCollator:
    """Right-pads a list of rows (input_ids, labels[, seq_lengths]) to the longest one.

    Padding takes `pad_token_id` and label -100. Packed rows carry position_ids that restart at 0
    for each example and NO attention_mask: transformers builds a block-diagonal causal mask from
    position_ids when attention_mask is None (masking_utils.find_packed_sequence_indices, for
    SDPA and eager, at any batch size), so attention stays within each example. The padding of a
    packed row gets its own positions 0..k, making it one more separate sequence.

    FlashAttention 2 reads examples apart from position_ids only when the batch is one row
    (modeling_flash_attention_utils._is_packed_sequence): a packed batch of two rows would attend
    across examples. So a packed batch also carries FA2's own varlen arguments, `cu_seq_lens_q/k`
    (int32 cumulative lengths over the flattened batch, padding segments included) and
    `max_length_q/k`, which transformers' FA2 path takes as given whatever the batch size; the
    other attention implementations ignore them.

    `padding_free` puts the whole micro-batch in ONE row instead, each example after the other
    with its own positions, and no padding at all, as a bare Unsloth script batches on its own.
    The row also carries `packed_seq_lengths` (int32, one length per example): Unsloth's
    attention takes the examples' boundaries from it alone (unsloth/utils/packing.py
    get_packed_info_from_kwargs), and without it would attend across examples. transformers'
    own attention finds the same boundaries from position_ids.

    Wherever a row holds several examples, the first token of each is no target: the shifted
    loss would otherwise train the last token of one example to predict the next example.

    `even_rows` (with `padding_free`) sends a micro-batch whose examples all have one length, none
    packed, as an ordinary n x length batch instead: the same tokens, targets and positions, and
    no padding either. Unsloth's fast attention then makes one batched call, where a one-row
    micro-batch is sliced into per-example views whose backward copies every Q, K and V gradient
    (`_sdpa_packed_segments`; the backend sets it, engine.train.backends.unsloth.even_rows).
    """

    pad_token_id: int
    packed: bool = False
    pad_to_multiple_of: int | None = None
    padding_free: bool = False
    even_rows: bool = False

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if self.padding_free:
            if self.even_rows and not self.packed and len({len(row["input_ids"]) for row in rows}) == 1:
                return self._even_rows(rows)
            return self._one_row(rows)
        width = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        position_ids = torch.zeros((n, width), dtype=torch.long)
        segments: list[int] = []
        for i, row in enumerate(rows):
            length = len(row["input_ids"])
            input_ids[i, :length] = _long(row["input_ids"])
            labels[i, :length] = _long(row["labels"])
            attention_mask[i, :length] = 1
            if self.packed:
                lengths = row_lengths(row)
                position_ids[i, :length] = _positions(lengths)[0]
                position_ids[i, length:] = torch.arange(width - length)
                segments += lengths + ([width - length] if width > length else [])
        if self.packed:
            labels[position_ids == 0] = IGNORE
            return {
                "input_ids": input_ids,
                "labels": labels,
                "position_ids": position_ids,
                **flash_varlen_kwargs(segments),
            }
        if bool(attention_mask.all()):
            # No padding in this batch: an all-ones mask says nothing, and some kernels take a
            # slower masked path for it (Unsloth's compiled blocks). Plain positions say the same
            # (TRL's loss wants one of the two; one sequence per row is not a packed row).
            position_ids[:] = torch.arange(width)
            return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    def _even_rows(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Rows of one length as they are: no packed_seq_lengths, so Unsloth reads no boundaries
        (each row is one example; a single row's positions hold one start, which its inference of
        boundaries from position_ids leaves alone). The first token of each row is no target, as
        in the one-row form, so the loss counts the same targets."""
        import torch

        input_ids = _long([row["input_ids"] for row in rows])
        labels = _long([row["labels"] for row in rows])
        labels[:, 0] = IGNORE
        position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids).contiguous()
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}

    def _one_row(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids: list[int] = []
        labels: list[int] = []
        lengths: list[int] = []
        for row in rows:
            ids += row["input_ids"]
            labels += row["labels"]
            lengths += row_lengths(row) if self.packed else [len(row["input_ids"])]
        position_ids = _positions(lengths)
        label_ids = _long([labels])
        label_ids[position_ids == 0] = IGNORE
        return {
            "input_ids": _long([ids]),
            "labels": label_ids,
            "position_ids": position_ids,
            "packed_seq_lengths": torch.as_tensor(lengths, dtype=torch.int32),
        }


def flash_varlen_kwargs(segments: list[int]) -> dict[str, Any]:
    """FlashAttention 2's varlen arguments for sequences of these lengths laid end to end."""
    import torch

    cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.as_tensor(segments, dtype=torch.int32), 0)
    longest = max(segments) if segments else 0
    return {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu.clone(),
        "max_length_q": longest,
        "max_length_k": longest,
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
