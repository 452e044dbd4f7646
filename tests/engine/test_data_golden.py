"""The prepared data of every fixture, bit for bit: the tokens, the labels (the masks), the packed
rows and the data report's figures, as the pipeline produced them before it was rewritten to stream
through Arrow (recorded in tests/data/golden/prepare.json). A change in any mask, row or figure
fails here; a deliberate change re-records the file:

    python -m tests.engine.test_data_golden   # rewrites tests/data/golden/prepare.json
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.config import DataConfig, RunConfig, TrainConfig
from engine.models.tiny import DATASET
from engine.models.tiny_build import ensure_builtin

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
FORMATS = DATA / "formats"
GOLDEN = DATA / "golden" / "prepare.json"
FAMILIES = ("llama3", "gemma3", "chatml", "mistral")


def _case(
    tokenizer: str = "tiny",
    source: Path | str = DATASET,
    seq_len: int = 128,
    micro_batch: int = 4,
    grad_accum: int = 2,
    **data: Any,
) -> dict[str, Any]:
    return {
        "tokenizer": tokenizer,
        "source": str(Path(source).relative_to(REPO)),
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "grad_accum": grad_accum,
        "data": data,
    }


CASES: dict[str, dict[str, Any]] = {
    "demo": _case(val_fraction=0.05),
    "demo-packed": _case(packing=True, val_fraction=0.05),
    "demo-truncate-40": _case(seq_len=40),
    "demo-drop-40": _case(seq_len=40, too_long="drop"),
    "demo-no-trained-26": _case(seq_len=26, packing=True),
    "demo-all-tokens-packed-256": _case(seq_len=256, responses_only=False, packing=True),
    "demo-split-seed-3": _case(max_examples=100, val_fraction=0.2, shuffle_seed=3, packing=True),
    "demo-system-prompt": _case(max_examples=50, system_prompt="Answer in one sentence."),
    "demo-builtin-llama3": _case(max_examples=50, template="llama3"),
    "demo-mistral-auto": _case(tokenizer="mistral", max_examples=80),
    "qa-columns": _case(
        source=FORMATS / "qa.csv", format="alpaca", columns={"instruction": "question", "output": "answer"}
    ),
    "messages-val-source": _case(
        source=FORMATS / "messages.jsonl", val_source=str(FORMATS / "alpaca.jsonl"), packing=True
    ),
    **{
        f"format-{name}": _case(source=FORMATS / name)
        for name in (
            "alpaca.csv",
            "alpaca.json",
            "alpaca.jsonl",
            "folder",
            "messages.jsonl",
            "messages.parquet",
            "sharegpt.json",
            "text.jsonl",
            "tokens.jsonl",
        )
    },
    **{
        f"{family}-{choice}-{name}": _case(
            tokenizer=family,
            source=FORMATS / name,
            seq_len=512,
            template="auto" if choice == "auto" else family,
            packing=name == "sharegpt.json",
        )
        for family in FAMILIES
        for choice in ("auto", "builtin")
        for name in ("messages.jsonl", "sharegpt.json", "alpaca.jsonl")
    },
}


def config(case: dict[str, Any]) -> RunConfig:
    data = dict(case["data"])
    if "val_source" in data:
        data["val_source"] = (
            str(REPO / data["val_source"])
            if not Path(data["val_source"]).is_absolute()
            else data["val_source"]
        )
    return RunConfig(
        data=DataConfig(source=str(REPO / case["source"]), **data),
        train=TrainConfig(
            seq_len=case["seq_len"], micro_batch=case["micro_batch"], grad_accum=case["grad_accum"], epochs=2
        ),
    )


_TOKENIZERS: dict[str, Any] = {}


def tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    if name not in _TOKENIZERS:
        path = ensure_builtin("builtin:tiny-llama") if name == "tiny" else DATA / "tokenizers" / name
        _TOKENIZERS[name] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[name]


def rows_digest(dataset: Any) -> str | None:
    """SHA-256 over every row's input_ids, labels and (packed) position ids, in row order. A packed
    row stores its examples' lengths (seq_lengths); the position ids restart at 0 for each."""
    if dataset is None:
        return None
    import numpy as np

    from engine.data.collate import positions, row_lengths

    h = hashlib.sha256()
    packed = "seq_lengths" in dataset.column_names or "position_ids" in dataset.column_names
    columns = ["input_ids", "labels", *(["position_ids"] if packed else [])]
    h.update(json.dumps(columns).encode())
    for row in dataset:
        if packed:
            row = {**row, "position_ids": positions(row_lengths(row))}
        for name in columns:
            values = np.asarray(row[name], dtype=np.int64)
            h.update(f"{name}:{len(values)}:".encode())
            h.update(values.tobytes())
    return h.hexdigest()


def _relative(value: Any) -> Any:
    """The report names files by absolute path: record them relative to the repository."""
    if isinstance(value, str):
        return value.replace(str(REPO) + "/", "")
    if isinstance(value, list):
        return [_relative(v) for v in value]
    if isinstance(value, tuple):
        return [_relative(v) for v in value]
    if isinstance(value, dict):
        return {k: _relative(v) for k, v in value.items()}
    return value


def outcome(case: dict[str, Any]) -> dict[str, Any]:
    from engine.data import prepare

    prepared = prepare(config(case), tokenizer(case["tokenizer"]))
    return {
        "report": _relative(prepared.report.to_dict()),
        "train": rows_digest(prepared.train),
        "eval": rows_digest(prepared.eval),
        "rows": len(prepared.train),
        "template": prepared.template.name if prepared.template else None,
        "end_of_turn_ids": list(prepared.end_of_turn_ids),
    }


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


def test_the_golden_file_covers_every_case(golden: dict[str, Any]) -> None:
    assert sorted(golden) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_prepared_data_is_bit_identical_to_the_recorded_one(
    name: str, golden: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QLC_DATA_CACHE", str(tmp_path / "data-cache"))
    got = json.loads(json.dumps(outcome(CASES[name])))
    assert got == golden[name]


if __name__ == "__main__":
    records = {name: outcome(case) for name, case in sorted(CASES.items())}
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(records)} cases to {GOLDEN.relative_to(REPO)}", file=sys.stderr)
