"""The pre-flight data report: what a run will train on, in numbers, before any GPU time is spent.

`DataReport` is plain data (the console renders it from JSON; this module imports no torch).
`build_report` makes it from the figures preparation counted (`Figures`); the same numbers
(tokens and steps per epoch) feed the ETA. `python -m engine data CONFIG.yaml` prints it
(engine/data/job.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from engine.config import RunConfig
from engine.data.encoded import IGNORE, Encoded
from engine.data.templates import ChatTemplate

HISTOGRAM_BINS = 10


@dataclass
class HistogramBin:
    lo: int
    hi: int
    """Inclusive bounds, in tokens."""
    count: int


@dataclass
class DataReport:
    source: str = ""
    format: str | None = None
    template: str | None = None
    """The chat template used: llama3 / gemma3 / chatml / mistral, or "tokenizer" (the model's own)."""
    end_of_turn: str | None = None
    seq_len: int = 0
    packing: bool = False
    responses_only: bool = True
    examples: int = 0
    """Training examples after truncation and dropping."""
    eval_examples: int = 0
    rows: int = 0
    """Sequences per epoch: packed rows when packing, else examples."""
    length_p50: int = 0
    length_p95: int = 0
    length_max: int = 0
    """Token lengths after templating, before truncation, over the training examples."""
    histogram: list[HistogramBin] = field(default_factory=list)
    truncated: int = 0
    truncated_tokens: int = 0
    """Tokens cut off by truncation, over all truncated examples."""
    dropped: int = 0
    dropped_reasons: dict[str, int] = field(default_factory=dict)
    """too_long (data.too_long: drop), no_trained_tokens (the answer fell past seq_len)."""
    skipped: int = 0
    """Bad records left out (data.bad_records: skip), training and validation sources together."""
    skipped_first: list[str] = field(default_factory=list)
    """The first few of them: where and what."""
    tokens_per_epoch: int = 0
    trained_tokens_per_epoch: int = 0
    """Tokens with a label (not -100): what the loss is computed on."""
    pack_fill: float | None = None
    """With packing, the share of each row's seq_len holding real tokens."""
    micro_batch: int = 1
    grad_accum: int = 1
    steps_per_epoch: int = 0
    total_steps: int = 0
    example: list[tuple[str, bool]] = field(default_factory=list)
    """The first training example as rendered, in spans of (text, trained)."""
    example_where: str = ""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["histogram"] = [HistogramBin(**b) for b in values.get("histogram", [])]
        values["example"] = [(str(text), bool(trained)) for text, trained in values.get("example", [])]
        return cls(**values)


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile: always a length some example really has."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def histogram(lengths: list[int], bins: int = HISTOGRAM_BINS) -> list[HistogramBin]:
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    width = max(1, math.ceil((hi - lo + 1) / bins))
    counts = [0] * min(bins, math.ceil((hi - lo + 1) / width))
    for n in lengths:
        counts[(n - lo) // width] += 1
    return [HistogramBin(lo + i * width, min(hi, lo + (i + 1) * width - 1), c) for i, c in enumerate(counts)]


def steps(
    rows: int, micro_batch: int, grad_accum: int, epochs: float, max_steps: int | None
) -> tuple[int, int]:
    """Optimizer steps per epoch and in total, counted as transformers' Trainer counts them
    (a last partial batch and a last partial accumulation each still make a step)."""
    batches = math.ceil(rows / micro_batch)
    per_epoch = max(math.ceil(batches / grad_accum), 1)
    total = max_steps if max_steps is not None else math.ceil(epochs * per_epoch)
    return per_epoch, total


def render_spans(tokenizer: Any, enc: Encoded) -> list[tuple[str, bool]]:
    """Consecutive tokens of one kind (trained or not), decoded together."""
    spans: list[tuple[str, bool]] = []
    group: list[int] = []
    current: bool | None = None
    for token_id, label in zip(enc.input_ids, enc.labels, strict=True):
        trained = label != IGNORE
        if current is not None and trained != current:
            spans.append((tokenizer.decode(group, skip_special_tokens=False), current))
            group = []
        group.append(token_id)
        current = trained
    if group:
        spans.append((tokenizer.decode(group, skip_special_tokens=False), bool(current)))
    return spans


@dataclass
class Figures:
    """What preparation counted, for the report: everything but the training schedule."""

    lengths: list[int]
    """Every training example's token length after templating, before truncation, sorted."""
    examples: int
    """Training examples kept (after truncation and dropping)."""
    eval_examples: int
    rows: int
    truncated: int
    truncated_tokens: int
    dropped: dict[str, int]
    tokens: int
    trained_tokens: int
    first: Encoded | None
    """The first kept training example (as truncated)."""
    skipped: int = 0
    skipped_first: list[str] = field(default_factory=list)


def build_report(
    cfg: RunConfig, tokenizer: Any, template: ChatTemplate | None, fmt: str | None, f: Figures
) -> DataReport:
    d, t = cfg.data, cfg.train
    lengths = f.lengths
    report = DataReport(
        source=d.source,
        format=fmt,
        template=template.name if template else None,
        end_of_turn=template.end_of_turn if template else None,
        seq_len=t.seq_len,
        packing=d.packing,
        responses_only=d.responses_only,
        examples=f.examples,
        eval_examples=f.eval_examples,
        rows=f.rows,
        length_p50=percentile(lengths, 50),
        length_p95=percentile(lengths, 95),
        length_max=lengths[-1] if lengths else 0,
        histogram=histogram(lengths),
        truncated=f.truncated,
        truncated_tokens=f.truncated_tokens,
        dropped=sum(f.dropped.values()),
        dropped_reasons=dict(f.dropped),
        skipped=f.skipped,
        skipped_first=list(f.skipped_first),
        tokens_per_epoch=f.tokens,
        # The first token of an example is never a target (nothing precedes it).
        trained_tokens_per_epoch=f.trained_tokens,
        pack_fill=round(f.tokens / (f.rows * t.seq_len), 4) if d.packing and f.rows else None,
        example=render_spans(tokenizer, f.first) if f.first else [],
        example_where=f.first.where if f.first else "",
    )
    report.warnings = _warnings(cfg, tokenizer, template, report)
    return with_schedule(report, cfg)


def with_schedule(report: DataReport, cfg: RunConfig) -> DataReport:
    """The report's training-schedule figures (batch, steps) for `cfg`: they are not part of the
    prepared data, so a cached report takes the current run's."""
    t = cfg.train
    per_epoch, total = steps(report.rows, t.micro_batch, t.grad_accum, t.epochs, t.max_steps)
    report.micro_batch, report.grad_accum = t.micro_batch, t.grad_accum
    report.steps_per_epoch, report.total_steps = per_epoch, total
    return report


def bad_records(n: int) -> str:
    """ "1 bad record", "1,204 bad records": every place that counts what data.bad_records skipped."""
    return "1 bad record" if n == 1 else f"{n:,} bad records"


def skipped_line(r: DataReport) -> str:
    """What data.bad_records: skip left out, the first few named: the report's warning, and the run's."""
    more = "; …" if r.skipped > len(r.skipped_first) else ""
    was = "was" if r.skipped == 1 else "were"
    return (
        f"{bad_records(r.skipped)} {was} skipped (data.bad_records: skip): {'; '.join(r.skipped_first)}{more}"
    )


def _examples(n: int) -> str:
    return "1 example is" if n == 1 else f"{n} examples are"


def _warnings(cfg: RunConfig, tokenizer: Any, template: ChatTemplate | None, r: DataReport) -> list[str]:
    out = []
    if template is not None and template.family is None:
        out.append(
            "the tokenizer's chat template is not a family this console knows; turns end at its eos token"
        )
    eot = template.end_of_turn if template else None
    if eot is not None:
        token_id = tokenizer.convert_tokens_to_ids(eot)
        if not isinstance(token_id, int) or token_id == getattr(tokenizer, "unk_token_id", None):
            out.append(f"end-of-turn {eot} is not one token of this tokenizer: sampling may not stop at it")
    if r.truncated:
        out.append(
            f"{_examples(r.truncated)} longer than seq_len {r.seq_len}: truncated, {r.truncated_tokens} tokens lost"
        )
    if r.dropped_reasons.get("too_long"):
        out.append(
            f"{_examples(r.dropped_reasons['too_long'])} longer than seq_len {r.seq_len}: dropped (data.too_long: drop)"
        )
    if r.dropped_reasons.get("no_trained_tokens"):
        n = r.dropped_reasons["no_trained_tokens"]
        out.append(
            f"{n} {'example' if n == 1 else 'examples'} lost every trained token to truncation: dropped"
        )
    if r.skipped:
        out.append(skipped_line(r))
    if cfg.data.val_fraction > 0 and r.eval_examples == 0:
        out.append("data.val_fraction is set but no example was held out (too few examples)")
    return out
