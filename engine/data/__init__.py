"""Datasets -> the exact tokens a model learns from (sources, formats, templates, masking, packing).

    check_source(cfg) -> SourceSummary      pure Python: the console's pre-flight check
    prepare(cfg, tokenizer, progress) -> PreparedData
                                             engine process: datasets (memory-mapped from the
                                             on-disk cache), collator and DataReport
    DataError                                one line naming file, line/row and problem; exit 2

Importing this package stays cheap (no torch, transformers or datasets): `prepare` and the
engine-side names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.data.check import SourceSummary, check_source
from engine.data.errors import DataError
from engine.data.report import DataReport, bad_records

if TYPE_CHECKING:
    from engine.data.pipeline import PreparedData, prepare

__all__ = [
    "DataError",
    "DataReport",
    "PreparedData",
    "SourceSummary",
    "bad_records",
    "check_source",
    "prepare",
]


def __getattr__(name: str) -> Any:
    if name in ("prepare", "PreparedData"):
        from engine.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'engine.data' has no attribute {name!r}")
