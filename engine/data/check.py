"""Reading a data source end to end: the pre-flight check the console runs before a run exists,
and the stream of validated examples a run trains on. Pure Python for local files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from engine.config import DataConfig, RunConfig
from engine.data.errors import BadRecords, DataError
from engine.data.formats import Example, Normalizer, local_examples
from engine.data.sources import is_local, local_files, read_local
from engine.data.templates import TEMPLATE_NAMES

# Names a `data.columns` mapping may rename, over all formats.
COLUMN_NAMES = (
    "instruction", "input", "output", "system", "messages", "conversations", "role", "content",
    "from", "value", "text", "input_ids", "labels",
)  # fmt: skip


@dataclass
class SourceSummary:
    """What a data source holds, as far as it can be known without a tokenizer."""

    source: str
    location: str
    """"local" or "hub"."""
    files: list[str] = field(default_factory=list)
    format: str | None = None
    examples: int = 0
    assistant_turns: int = 0
    eval_source_examples: int | None = None
    """Examples in data.val_source, when it is a local file."""
    skipped: int = 0
    """Bad records left out (data.bad_records: skip), in data.source and data.val_source."""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_config(d: DataConfig) -> None:
    if d.template not in TEMPLATE_NAMES:
        raise DataError(
            f"data.template: unknown template {d.template!r}", f"use one of {', '.join(TEMPLATE_NAMES)}"
        )
    unknown = sorted(set(d.columns) - set(COLUMN_NAMES))
    if unknown:
        raise DataError(
            f"data.columns: {', '.join(map(repr, unknown))} is not a format's field name",
            f"keys are the format's names ({', '.join(COLUMN_NAMES)}); values are your dataset's",
        )


def read_examples(source: str, d: DataConfig, split: str | None = None) -> tuple[list[Example], str | None]:
    """Validated examples of a local path or a hub id (the hub only from the engine process), and
    the format they were read as."""
    if is_local(source):
        records = read_local(source)
    else:
        from engine.data.hub import read_hub

        revision = d.revision if source == d.source else d.val_revision  # pinned commits in a run
        records = read_hub(source, d.subset, split or d.split, revision)
    normalize = Normalizer(d.format, d.columns, d.system_prompt)
    return [normalize(record) for record in records], normalize.format


def _count(source: str, d: DataConfig, bad: BadRecords) -> tuple[int, int, str | None]:
    examples = turns = 0
    skipped_before = bad.count
    normalize = Normalizer(d.format, d.columns, d.system_prompt)
    for _, example in local_examples(source, normalize, bad):
        examples += 1
        turns += sum(m["role"] == "assistant" for m in example.messages or [])
    bad.verdict(source, examples, skipped_before)
    return examples, turns, normalize.format


def check_source(cfg: RunConfig) -> SourceSummary:
    """Read and validate every row of a local source (and val_source); raise DataError on the first problem."""
    d = cfg.data
    check_config(d)
    if not is_local(d.source):
        return SourceSummary(
            d.source,
            "hub",
            note=f"hub dataset {d.source} (split {d.split}): rows are checked when the run loads them",
        )
    files = [str(p) for p in local_files(d.source)]
    bad = BadRecords(d.bad_records)
    examples, turns, fmt = _count(d.source, d, bad)
    summary = SourceSummary(d.source, "local", files, fmt, examples, turns)
    if d.val_source and is_local(d.val_source):
        summary.eval_source_examples = _count(d.val_source, d, bad)[0]
    summary.skipped = bad.count
    if d.max_examples is not None and examples > d.max_examples:
        summary.note = f"using the first {d.max_examples} of {examples} examples (data.max_examples)"
    return summary
