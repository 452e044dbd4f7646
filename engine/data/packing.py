"""Packing: several examples per row of up to seq_len tokens, each token exactly once.

Best-fit decreasing (the longest example goes into the fullest row it still fits), which fills
rows far better than concatenating in file order, and never splits an example across rows: an
example is cut only by the truncation that happened before, and that is counted.
"""

from __future__ import annotations

import bisect

from engine.data.masking import Encoded


def pack(examples: list[Encoded], seq_len: int) -> list[dict[str, list[int]]]:
    """Rows with input_ids, labels and position_ids (restarting at 0 for each example)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted: bisect finds the best fit
    for i in order:
        need = len(examples[i].input_ids)
        if need > seq_len:
            raise ValueError(f"example of {need} tokens is longer than seq_len {seq_len}; fit lengths first")
        j = bisect.bisect_left(free, (need, -1))
        if j < len(free):
            room, b = free.pop(j)
        else:
            room, b = seq_len, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - need > 0:
            bisect.insort(free, (room - need, b))
    rows = []
    for members in bins:
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for i in sorted(members):  # file order within a row: deterministic, easy to inspect
            ex = examples[i]
            row["input_ids"] += ex.input_ids
            row["labels"] += ex.labels
            row["position_ids"] += list(range(len(ex.input_ids)))
        rows.append(row)
    return rows
