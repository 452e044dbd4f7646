"""Packing: several examples per row of up to seq_len tokens, each token exactly once.

Best-fit decreasing (the longest example goes into the fullest row it still fits), which fills
rows far better than concatenating in file order, and never splits an example across rows: an
example is cut only by the truncation that happened before, and that is counted.

`bins` decides on lengths alone (the tokens stay on disk until the rows are written); `pack` builds
the rows of a few in-memory examples with it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from engine.data.encoded import Encoded


def bins(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Example indices per row, each row in file order. Ties in length keep file order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: bisect finds the best fit
    for i in order:
        need = lengths[i]
        if need > seq_len:
            raise ValueError(f"example of {need} tokens is longer than seq_len {seq_len}; fit lengths first")
        j = bisect.bisect_left(free, (need, -1))
        if j < len(free):
            room, b = free.pop(j)
        else:
            room, b = seq_len, len(rows)
            rows.append([])
        rows[b].append(i)
        if room - need > 0:
            bisect.insort(free, (room - need, b))
    for members in rows:
        members.sort()  # file order within a row: deterministic, easy to inspect
    return rows


def pack(examples: list[Encoded], seq_len: int) -> list[dict[str, list[int]]]:
    """Rows with input_ids, labels and position_ids (restarting at 0 for each example)."""
    rows = []
    for members in bins([len(ex.input_ids) for ex in examples], seq_len):
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for i in members:
            ex = examples[i]
            row["input_ids"] += ex.input_ids
            row["labels"] += ex.labels
            row["position_ids"] += list(range(len(ex.input_ids)))
        rows.append(row)
    return rows
