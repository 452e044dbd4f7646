"""One encoded example as plain lists (pure Python: the report and the console use it)."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100
"""The label of a token that is not trained (transformers' ignore_index)."""


@dataclass
class Encoded:
    where: str
    input_ids: list[int]
    labels: list[int]
