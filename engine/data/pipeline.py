"""`prepare`: a run's dataset, from its config and its tokenizer, to datasets a Trainer consumes.

Runs in the engine process (imports datasets). Order of work: read and validate -> limit to
max_examples -> split off validation -> template, tokenize, mask -> fit seq_len (truncate or drop,
counted) -> pack or pad -> report.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.config import RunConfig
from engine.data.check import check_config, read_examples
from engine.data.collate import PadCollator, pad_token_id
from engine.data.errors import DataError
from engine.data.formats import Example
from engine.data.masking import IGNORE, Encoded, encode
from engine.data.packing import pack
from engine.data.report import DataReport, build_report
from engine.data.templates import ChatTemplate, end_of_turn_ids, resolve_template

Progress = Callable[[str, int, int], None]


@dataclass
class PreparedData:
    train: Any
    """datasets.Dataset: input_ids, labels (and position_ids when packed)."""
    eval: Any | None
    collator: PadCollator
    report: DataReport
    template: ChatTemplate | None
    """The chat template the data was rendered with; sampling must use the same one."""
    end_of_turn_ids: list[int] = field(default_factory=list)
    """Token ids that end an assistant turn: what generation stops on."""


@dataclass
class LengthStats:
    truncated: int = 0
    truncated_tokens: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


def split_validation(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A seeded, order-independent choice of validation examples; both parts keep file order."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in chosen]
    held = [ex for i, ex in enumerate(examples) if i in chosen]
    return train, held


def fit_length(encoded: list[Encoded], seq_len: int, too_long: str) -> tuple[list[Encoded], LengthStats]:
    stats = LengthStats()
    kept = []
    for enc in encoded:
        if len(enc.input_ids) > seq_len:
            if too_long == "drop":
                stats.dropped["too_long"] = stats.dropped.get("too_long", 0) + 1
                continue
            stats.truncated += 1
            stats.truncated_tokens += len(enc.input_ids) - seq_len
            enc = Encoded(enc.where, enc.input_ids[:seq_len], enc.labels[:seq_len])
        if all(label == IGNORE for label in enc.labels[1:]):
            # Nothing left to learn (the answer was cut off): a batch of these makes the loss 0/0.
            # The first token is never a target: the loss predicts each token from those before.
            stats.dropped["no_trained_tokens"] = stats.dropped.get("no_trained_tokens", 0) + 1
            continue
        kept.append(enc)
    return kept, stats


def _rows(encoded: list[Encoded], seq_len: int, packing: bool) -> list[dict[str, list[int]]]:
    if packing:
        return pack(encoded, seq_len)
    return [{"input_ids": enc.input_ids, "labels": enc.labels} for enc in encoded]


def _dataset(rows: list[dict[str, list[int]]], packing: bool) -> Any:
    import datasets

    columns = ["input_ids", "labels", *(["position_ids"] if packing else [])]
    return datasets.Dataset.from_dict({c: [row[c] for row in rows] for c in columns})


def prepare(cfg: RunConfig, tokenizer: Any, progress: Progress | None = None) -> PreparedData:
    d, seq_len = cfg.data, cfg.train.seq_len
    check_config(d)
    tell = progress or (lambda message, current, total: None)

    tell("reading", 0, 0)
    examples, fmt = read_examples(d.source, d)
    if d.max_examples is not None:
        examples = examples[: d.max_examples]
    if d.val_source:
        held, _ = read_examples(d.val_source, d, split="validation" if d.val_source == d.source else None)
        train_examples = examples
    else:
        train_examples, held = split_validation(examples, d.val_fraction, d.shuffle_seed)

    needs_template = any(ex.kind == "chat" for ex in examples + held)
    template = resolve_template(tokenizer, d.template) if needs_template else None

    def tokenizing(done: int, total: int) -> None:
        tell("tokenizing", done, total)

    encoded = encode(tokenizer, template, train_examples, d.responses_only, tokenizing)
    encoded_eval = encode(tokenizer, template, held, d.responses_only)
    kept, stats = fit_length(encoded, seq_len, d.too_long)
    kept_eval, _ = fit_length(encoded_eval, seq_len, d.too_long)
    if not kept:
        reasons = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in stats.dropped.items())
        raise DataError(
            f"{d.source}: no training example left after fitting to seq_len {seq_len} ({reasons})",
            "raise train.seq_len or set data.too_long: truncate",
        )

    tell("packing" if d.packing else "batching", 0, 0)
    rows = _rows(kept, seq_len, d.packing)
    eval_rows = _rows(kept_eval, seq_len, d.packing) if kept_eval else []
    report = build_report(
        cfg, tokenizer, template, fmt, encoded=encoded, kept=kept, rows=len(rows), eval_examples=len(kept_eval),
        truncated=stats.truncated, truncated_tokens=stats.truncated_tokens, dropped=stats.dropped,
    )  # fmt: skip
    return PreparedData(
        train=_dataset(rows, d.packing),
        eval=_dataset(eval_rows, d.packing) if eval_rows else None,
        collator=PadCollator(pad_token_id(tokenizer), packed=d.packing),
        report=report,
        template=template,
        end_of_turn_ids=end_of_turn_ids(tokenizer, template.family or "tokenizer")
        if template
        else end_of_turn_ids(tokenizer, "auto"),
    )
