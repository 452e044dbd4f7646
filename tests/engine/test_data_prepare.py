"""prepare(): seq_len handling (truncate / drop, always counted), packing (every token exactly once,
positions restarting per example, attention kept within each example), validation split, the
collator, and the report with its engine entry point."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.config import DataConfig, RunConfig, TrainConfig
from engine.data import DataError, DataReport, prepare
from engine.data.collate import sequence_lengths
from engine.data.masking import IGNORE, Encoded
from engine.data.packing import pack
from engine.data.report import histogram, percentile, steps
from engine.models.tiny import DATASET
from engine.models.tiny_build import ensure_builtin
from tests.engine.shifted_loss import summed_shifted_loss

REPO = Path(__file__).resolve().parent.parent.parent
FORMATS = REPO / "tests" / "data" / "formats"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(ensure_builtin("builtin:tiny-llama"))


def run_cfg(
    source: Path = DATASET, seq_len: int = 128, micro_batch: int = 4, grad_accum: int = 2, **data
) -> RunConfig:
    return RunConfig(
        data=DataConfig(source=str(source), **data),
        train=TrainConfig(seq_len=seq_len, micro_batch=micro_batch, grad_accum=grad_accum, epochs=2),
    )


def test_the_demo_prepares_with_padding_and_a_report(tok) -> None:
    p = prepare(run_cfg(val_fraction=0.05), tok)
    r = p.report
    assert (r.examples, r.eval_examples, r.rows) == (570, 30, 570)
    assert p.train.column_names == ["input_ids", "labels"] and len(p.train) == 570 and len(p.eval) == 30
    assert r.format == "messages" and r.template == "tokenizer" and r.end_of_turn == "<|eot_id|>"
    assert r.tokens_per_epoch == sum(len(ids) for ids in p.train["input_ids"])
    # The first token of an example is never a target.
    trained = sum(label != IGNORE for labels in p.train["labels"] for label in labels[1:])
    assert r.trained_tokens_per_epoch == trained
    assert (r.steps_per_epoch, r.total_steps) == (72, 144)  # ceil(570 / 4) = 143 batches -> 72 steps
    assert r.example[-1] == ("2 plus 18 is 20.<|eot_id|>", True)
    assert "".join(text for text, _ in r.example).startswith("<|begin_of_text|><|start_header_id|>user")
    assert p.end_of_turn_ids == [tok.convert_tokens_to_ids("<|eot_id|>")]
    assert DataReport.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_collator_right_pads_with_pad_id_and_ignored_labels(tok) -> None:
    p = prepare(run_cfg(max_examples=8), tok)
    rows = [p.train[i] for i in range(4)]
    batch = p.collator(rows)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    width = max(len(r["input_ids"]) for r in rows)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert batch["labels"][i, :n].tolist() == row["labels"]
        assert batch["input_ids"][i, n:].tolist() == [tok.pad_token_id] * (width - n)
        assert batch["labels"][i, n:].tolist() == [IGNORE] * (width - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)


def test_truncation_is_counted(tok) -> None:
    full = prepare(run_cfg(), tok).report
    r = prepare(run_cfg(seq_len=40), tok).report
    over = [n for n in _lengths(tok) if n > 40]
    assert r.truncated > 0 and r.truncated + r.dropped_reasons.get("no_trained_tokens", 0) == len(over)
    if not r.dropped:
        assert r.truncated_tokens == sum(n - 40 for n in over)
    assert r.examples + r.dropped == 600
    assert r.length_max == full.length_max  # the distribution is measured before truncation
    assert any("truncated" in w for w in r.warnings)


def test_drop_mode_is_counted(tok) -> None:
    r = prepare(run_cfg(seq_len=40, too_long="drop"), tok).report
    over = [n for n in _lengths(tok) if n > 40]
    assert r.dropped_reasons == {"too_long": len(over)} and r.truncated == 0
    assert r.examples == 600 - len(over)


def test_examples_that_lose_every_answer_token_are_dropped_and_counted(tok) -> None:
    r = prepare(run_cfg(seq_len=26), tok).report
    assert r.dropped_reasons.get("no_trained_tokens", 0) > 0
    # Each example is in one column: kept (some of them truncated) or dropped.
    over = [n for n in _lengths(tok) if n > 26]
    assert r.truncated + r.dropped == len(over) and r.examples + r.dropped == 600
    with pytest.raises(
        DataError, match=re.escape("no training example left after fitting to seq_len 12")
    ) as e:
        prepare(run_cfg(seq_len=12), tok)
    # Truncating already: only a longer seq_len helps, and the hint says how long the examples are.
    shortest = min(_lengths(tok))
    assert e.value.hint == (
        "raise train.seq_len: cut to 12 tokens, no example keeps a token of its answer; "
        f"the shortest example is {shortest} tokens"
    )
    with pytest.raises(DataError) as e:
        prepare(run_cfg(seq_len=12, too_long="drop"), tok)
    assert e.value.hint == "raise train.seq_len or set data.too_long: truncate"


def test_packing_keeps_every_token_once_and_restarts_positions(tok) -> None:
    padded = prepare(run_cfg(max_examples=200), tok)
    packed = prepare(run_cfg(max_examples=200, packing=True), tok)
    rows = [packed.train[i] for i in range(len(packed.train))]
    assert packed.train.column_names == ["input_ids", "labels", "seq_lengths"]
    assert all(len(r["input_ids"]) <= 128 == sum(r["seq_lengths"]) + 128 - len(r["input_ids"]) for r in rows)
    # Cut each row at its examples' lengths: the pieces are exactly the unpacked examples.
    pieces = []
    for r in rows:
        starts = [0, *itertools.accumulate(r["seq_lengths"])]
        for a, b in itertools.pairwise(starts):
            pieces.append((tuple(r["input_ids"][a:b]), tuple(r["labels"][a:b])))
    originals = [(tuple(r["input_ids"]), tuple(r["labels"])) for r in padded.train]
    assert Counter(pieces) == Counter(originals)
    assert packed.report.tokens_per_epoch == padded.report.tokens_per_epoch
    assert packed.report.rows == len(rows) < padded.report.rows
    assert packed.report.pack_fill == round(packed.report.tokens_per_epoch / (len(rows) * 128), 4)


def test_pack_fills_best_fit_and_never_exceeds_seq_len() -> None:
    examples = [Encoded(str(n), list(range(n)), list(range(n))) for n in (6, 5, 4, 3, 2, 1, 7)]
    rows = pack(examples, seq_len=7)
    assert sorted(len(r["input_ids"]) for r in rows) == [7, 7, 7, 7]
    with pytest.raises(ValueError):
        pack([Encoded("x", [1] * 9, [1] * 9)], seq_len=8)


def test_packed_attention_stays_within_each_example(tok) -> None:
    """The collated packed batch (position_ids, no attention_mask) gives each example the same
    logits as running it alone: no attention crosses an example boundary."""
    p = prepare(run_cfg(max_examples=12, packing=True), tok)
    model = AutoModelForCausalLM.from_pretrained(ensure_builtin("builtin:tiny-llama"), dtype=torch.float32)
    model.eval()
    batch = p.collator([p.train[0]])
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed_logits = model(**batch, use_cache=False).logits[0]
        positions = batch["position_ids"][0].tolist()
        starts = [i for i, pos in enumerate(positions) if pos == 0] + [len(positions)]
        assert len(starts) > 2
        for a, b in itertools.pairwise(starts):
            alone = model(input_ids=batch["input_ids"][:, a:b]).logits[0]
            torch.testing.assert_close(packed_logits[a:b], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("packing", [False, True])
def test_padding_free_batch_is_one_row_with_the_padded_batch_loss(tok, packing: bool) -> None:
    """The Unsloth backend's one-row batch (engine.train.backends.padding_free) holds every token of the
    micro-batch once, masks the first token of each example as a target, and gives the model the
    same summed loss as the padded batch: attention never crosses an example."""
    p = prepare(run_cfg(max_examples=24, packing=packing), tok)
    rows = [p.train[i] for i in range(3)]
    padded = p.collator(rows)
    p.collator.padding_free = True
    one = p.collator(rows)
    assert set(one) == {"input_ids", "labels", "position_ids", "packed_seq_lengths"}
    assert one["input_ids"].shape[0] == 1
    assert one["input_ids"][0].tolist() == list(itertools.chain(*(r["input_ids"] for r in rows)))
    assert (one["labels"][one["position_ids"] == 0] == IGNORE).all()
    # The examples' lengths, which Unsloth's attention reads the boundaries from: one per example
    # (a packed row holds several), positions restarting at each.
    lengths = one.pop("packed_seq_lengths")
    assert lengths.dtype == torch.int32 and int(lengths.sum()) == one["input_ids"].shape[1]
    examples = sum(len(r["seq_lengths"]) for r in rows) if packing else 3
    assert len(lengths) == examples
    expected = torch.cat([torch.arange(n) for n in lengths.tolist()])
    assert one["position_ids"][0].tolist() == expected.tolist()

    model = AutoModelForCausalLM.from_pretrained(ensure_builtin("builtin:tiny-llama"), dtype=torch.float32)
    model.eval()

    (loss_padded, count_padded), (loss_one, count_one) = (
        summed_shifted_loss(model, b) for b in (padded, one)
    )
    assert count_one == count_padded > 0
    torch.testing.assert_close(loss_one, loss_padded, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize(
    ("positions", "lengths"),
    [([0, 1, 2], [3]), ([0, 1, 0, 1, 2, 0], [2, 3, 1]), ([0], [1]), ([3, 4, 0, 1], [2, 2])],
)
def test_sequence_lengths_split_where_positions_restart(positions: list[int], lengths: list[int]) -> None:
    assert sequence_lengths(positions) == lengths


def test_validation_split_is_seeded_and_disjoint(tok) -> None:
    def split(seed: int) -> tuple[list, list]:
        p = prepare(run_cfg(max_examples=100, val_fraction=0.2, shuffle_seed=seed), tok)
        return list(map(tuple, p.train["input_ids"])), list(map(tuple, p.eval["input_ids"]))

    train, held = split(1)
    assert (len(train), len(held)) == (80, 20)
    assert split(1) == (train, held)
    assert split(2)[1] != held
    assert Counter(train) + Counter(held) == Counter(
        map(tuple, prepare(run_cfg(max_examples=100), tok).train["input_ids"])
    )


def test_validation_examples_are_capped_and_the_rest_train(tok) -> None:
    def split(limit: int | None) -> tuple[list, list]:
        p = prepare(run_cfg(max_examples=100, val_fraction=0.2, val_max_examples=limit), tok)
        return list(map(tuple, p.train["input_ids"])), list(map(tuple, p.eval["input_ids"]))

    train, held = split(None)
    capped_train, capped = split(7)
    assert (len(capped_train), len(capped)) == (93, 7)
    assert set(capped) <= set(held)  # the first 7 of the same seeded choice: the rest go back to training
    assert Counter(capped_train) + Counter(capped) == Counter(train) + Counter(held)
    # A separate validation set is capped the same way.
    p = prepare(
        run_cfg(
            source=FORMATS / "messages.jsonl", val_source=str(FORMATS / "alpaca.jsonl"), val_max_examples=2
        ),
        tok,
    )
    assert (p.report.examples, p.report.eval_examples) == (3, 2)


def test_val_source_is_the_eval_set(tok) -> None:
    p = prepare(run_cfg(source=FORMATS / "messages.jsonl", val_source=str(FORMATS / "alpaca.jsonl")), tok)
    assert (p.report.examples, p.report.eval_examples) == (3, 3)


@pytest.mark.parametrize(
    ("source", "fmt", "examples"),
    [
        ("alpaca.csv", "alpaca", 3),
        ("sharegpt.json", "sharegpt", 2),
        ("text.jsonl", "text", 3),
        ("tokens.jsonl", "tokens", 2),
        ("folder", "messages", 3),
        ("messages.parquet", "messages", 3),
    ],
)
def test_every_format_prepares(tok, source: str, fmt: str, examples: int) -> None:
    r = prepare(run_cfg(source=FORMATS / source), tok).report
    assert (r.format, r.examples) == (fmt, examples)
    assert r.template == ("tokenizer" if fmt not in ("text", "tokens") else None)


def test_report_numbers() -> None:
    assert [percentile(list(range(1, 101)), q) for q in (50, 95, 100)] == [50, 95, 100]
    bins = histogram([3, 5, 5, 9, 30])
    assert sum(b.count for b in bins) == 5 and bins[0].lo == 3 and bins[-1].hi == 30
    assert steps(rows=570, micro_batch=4, grad_accum=2, epochs=2, max_steps=None) == (72, 144)
    assert steps(rows=570, micro_batch=4, grad_accum=2, epochs=0.5, max_steps=None) == (72, 36)
    assert steps(rows=3, micro_batch=8, grad_accum=4, epochs=1, max_steps=50) == (1, 50)


class Lines:
    """A sink that keeps what the data job writes to its stdout."""

    def __init__(self) -> None:
        self.lines: list[dict] = []

    def write(self, line: bytes) -> None:
        self.lines.append(json.loads(line))

    def close(self) -> None:
        pass


def test_the_data_job_prints_progress_then_the_report_or_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.train.data_job import main as data_main

    monkeypatch.setenv("QLC_DATA_CACHE", str(tmp_path / "cache"))
    good = tmp_path / "good.yaml"
    good.write_text(run_cfg(max_examples=20).to_yaml())
    sink = Lines()
    assert data_main(good, sink) == 0
    *events, report = sink.lines
    assert "type" not in report and report["examples"] == 20
    assert events and all(e["type"] == "stage" and e["stage"] == "preparing_data" for e in events)
    tokenizing = [e for e in events if e["message"].startswith("tokenizing")]
    assert tokenizing[-1]["current"] == tokenizing[-1]["total"] == 20 and tokenizing[-1]["unit"] == "examples"
    assert "prepared and cached" in capsys.readouterr().err
    # A second run reuses the rows the first one prepared.
    again = Lines()
    assert data_main(good, again) == 0
    assert again.lines[-1] == report
    assert any("reusing" in e["message"] for e in again.lines[:-1])
    assert "reused from the cache" in capsys.readouterr().err

    bad = tmp_path / "bad.yaml"
    bad.write_text(run_cfg(source=REPO / "tests" / "data" / "bad" / "not_alternating.jsonl").to_yaml())
    failed = Lines()
    assert data_main(bad, failed) == 2
    assert all(line.get("type") == "stage" for line in failed.lines)
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "not_alternating.jsonl: line 2:" in captured.err


def _lengths(tok) -> list[int]:
    return [len(ids) for ids in prepare(run_cfg(seq_len=4096), tok).train["input_ids"]]


def test_hub_ids_load_through_datasets(tok, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's side of a hub dataset: rows named by their hub row, the revision passed on.
    (The transfer itself is tests/engine/test_hub.py's, against a real HTTP hub stand-in.)"""
    import datasets

    from engine.hub import dataset as hub_dataset

    calls = []

    def fetched(source, subset, split, revision):
        calls.append((source, subset, split, revision))
        if source == "org/missing":
            raise FileNotFoundError("Couldn't find 'org/missing' on the Hub.\nMore lines.")
        return datasets.Dataset.from_list(
            [{"instruction": "Say hi.", "output": "Hi."}, {"instruction": "Say bye.", "output": "Bye."}]
        )

    monkeypatch.setattr(hub_dataset, "load", fetched)
    cfg = run_cfg(source="org/alpaca-like")  # type: ignore[arg-type]
    cfg.data.subset, cfg.data.split, cfg.data.revision = "en", "train[:2]", "abc123"
    r = prepare(cfg, tok).report
    assert calls == [("org/alpaca-like", "en", "train[:2]", "abc123")]
    assert (r.format, r.examples, r.example_where) == (
        "alpaca",
        2,
        "hub dataset org/alpaca-like (train[:2]): row 1",
    )
    with pytest.raises(
        DataError,
        match=r"^hub dataset org/missing: cannot load split 'train' \(FileNotFoundError: Couldn't find 'org/missing' on the Hub. More lines.\)",
    ):
        prepare(run_cfg(source="org/missing"), tok)  # type: ignore[arg-type]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_micro_batch_of_two_keeps_examples_apart(tok, attention: str) -> None:
    """Two packed rows in one micro-batch: changing example A's tokens changes no other
    example's logits, on this attention implementation (FlashAttention 2 on a GPU:
    bench/gpu_attention_check.py). The batch also carries FA2's varlen arguments, consistent
    with the rows."""
    p = prepare(run_cfg(max_examples=60, packing=True, seq_len=128), tok)
    rows = [p.train[i] for i in range(2)]
    assert all(len(r["seq_lengths"]) >= 2 for r in rows)
    model = AutoModelForCausalLM.from_pretrained(
        ensure_builtin("builtin:tiny-llama"), dtype=torch.float32, attn_implementation=attention
    )
    model.eval()

    def logits(rows: list[dict]) -> tuple[torch.Tensor, dict]:
        batch = p.collator(rows)
        with torch.no_grad():
            return model(**batch, use_cache=False).logits, batch

    before, batch = logits(rows)
    assert before.shape[0] == 2 and "attention_mask" not in batch
    width = batch["input_ids"].shape[1]
    segments = [
        *rows[0]["seq_lengths"],
        *([width - len(rows[0]["input_ids"])] if width > len(rows[0]["input_ids"]) else []),
    ]
    segments += [
        *rows[1]["seq_lengths"],
        *([width - len(rows[1]["input_ids"])] if width > len(rows[1]["input_ids"]) else []),
    ]
    assert batch["cu_seq_lens_q"].tolist() == [0, *itertools.accumulate(segments)]
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["max_length_q"] == max(segments)

    # Example A is row 0's first example: give it other tokens (same length).
    a = rows[0]["seq_lengths"][0]
    changed = dict(rows[0])
    changed["input_ids"] = [(i * 7 + 3) % len(tok) for i in rows[0]["input_ids"][:a]] + rows[0]["input_ids"][
        a:
    ]
    after, _ = logits([changed, rows[1]])
    assert not torch.allclose(after[0, :a], before[0, :a])  # A itself did change
    torch.testing.assert_close(after[0, a:], before[0, a:], atol=1e-5, rtol=1e-5)  # B, C, ... did not
    torch.testing.assert_close(after[1], before[1], atol=1e-5, rtol=1e-5)  # nor the other row

    # The check can see a leak: the same rows given as plain sequences (a full attention mask,
    # no packing information) let B attend to A.
    plain = {k: batch[k] for k in ("input_ids",)}
    plain["attention_mask"] = torch.ones_like(batch["input_ids"])
    changed_plain = {
        "input_ids": p.collator([changed, rows[1]])["input_ids"],
        "attention_mask": plain["attention_mask"],
    }
    with torch.no_grad():
        leak = (model(**changed_plain).logits[0, a:] - model(**plain).logits[0, a:]).abs().max()
    assert leak > 1e-3


def test_qlc_data_and_training_share_the_prepared_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tokenizer loaded plainly and the engine's (which sets a pad token and padding side) land on
    the same cache entry: the rows do not depend on padding."""
    from transformers import AutoTokenizer

    from engine.config import load_preset
    from engine.models.loading import load_tokenizer, resolve_model_path

    monkeypatch.setenv("QLC_DATA_CACHE", str(tmp_path / "cache"))
    cfg = load_preset("tiny-demo")
    first = prepare(cfg, AutoTokenizer.from_pretrained(resolve_model_path(cfg)))
    again = prepare(cfg, load_tokenizer(cfg))
    assert (first.from_cache, again.from_cache) == (False, True)
    assert again.cache_path == first.cache_path and again.report == first.report
    # Any setting that changes the rows is another entry.
    cfg.data.packing = True
    assert not prepare(cfg, load_tokenizer(cfg)).from_cache


def test_worker_processes_prepare_the_same_rows_and_report_errors_as_one_line(
    tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large sources are encoded in spawned worker processes: the rows, the masks and the report
    are the same as encoding in this process, and a bad row deep in the file is the same one-line
    error, hint included."""
    monkeypatch.setenv("QLC_DATA_CACHE", str(tmp_path / "one"))
    alone = prepare(run_cfg(packing=True, val_fraction=0.1), tok, workers=0)
    monkeypatch.setenv("QLC_DATA_CACHE", str(tmp_path / "two"))
    pooled = prepare(run_cfg(packing=True, val_fraction=0.1), tok, workers=2)
    assert pooled.report == alone.report and not pooled.from_cache
    for split in ("train", "eval"):
        a, b = getattr(alone, split), getattr(pooled, split)
        assert [dict(r) for r in a] == [dict(r) for r in b]

    # A token id beyond the vocabulary is found while encoding, in a worker.
    lines = [json.dumps({"input_ids": [1, 5 + i % 50, 6, 2]}) for i in range(600)]
    lines[400] = json.dumps({"input_ids": [1, 5, 99999]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as caught:
        prepare(run_cfg(source=bad, format="auto"), tok, workers=2)
    assert (
        caught.value.message
        == f"{bad}: line 401: input_ids holds token id 99999, beyond this tokenizer's 860 tokens"
    )
    with pytest.raises(DataError) as in_process:
        prepare(run_cfg(source=bad, format="auto"), tok, workers=0)
    assert (caught.value.message, caught.value.hint) == (in_process.value.message, in_process.value.hint)
    assert not list((tmp_path / "two").glob(".tmp-*"))  # the failed build left nothing behind


def test_one_example_is_one_example() -> None:
    from engine.data.report import DataReport, _warnings

    r = DataReport(seq_len=64, truncated=1, truncated_tokens=295, dropped_reasons={"no_trained_tokens": 1})
    assert _warnings(run_cfg(), None, None, r) == [
        "1 example is longer than seq_len 64: truncated, 295 tokens lost",
        "1 example lost every trained token to truncation: dropped",
    ]


def _with_bad_records(tmp_path: Path) -> tuple[Path, int]:
    """The demo's conversations with four bad lines among them: broken JSON, a list instead of an
    object, user after user, and no assistant turn."""
    lines = DATASET.read_text().splitlines()
    bad = [
        '{"messages": [{"role": "user", "content": "hi"}',
        "[1, 2, 3]",
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
    ]
    for n, line in zip((10, 200, 201, 450), bad, strict=True):
        lines.insert(n, line)
    path = tmp_path / "scraped.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, len(lines) - len(bad)


def test_bad_records_stop_a_run_by_default_and_say_how_to_skip_them(tok, tmp_path: Path) -> None:
    source, _ = _with_bad_records(tmp_path)
    with pytest.raises(DataError) as caught:
        prepare(run_cfg(source=source), tok)
    assert caught.value.message.startswith(f"{source}: line 11: malformed JSON")
    assert caught.value.hint.endswith(
        "or set data.bad_records: skip to leave such records out (counted in the data report)"
    )


def test_skipped_bad_records_are_counted_named_and_the_rest_trains(
    tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.bad_records: skip leaves out what cannot be read or does not fit the format, in this
    process and in tokenizing workers alike; the rows are those of the good records alone."""
    monkeypatch.setenv("QLC_DATA_CACHE", str(tmp_path / "cache"))
    source, good = _with_bad_records(tmp_path)
    clean = tmp_path / "clean.jsonl"
    clean.write_text(DATASET.read_text())
    reference = prepare(run_cfg(source=clean), tok, workers=0)
    for workers in (0, 2):
        monkeypatch.setenv("QLC_DATA_CACHE", str(tmp_path / f"cache-{workers}"))
        p = prepare(run_cfg(source=source, bad_records="skip"), tok, workers=workers)
        r = p.report
        assert r.skipped == 4 and r.examples == good == reference.report.examples
        assert [dict(row) for row in p.train] == [dict(row) for row in reference.train]
        assert r.skipped_first[0].startswith(f"{source}: line 11: malformed JSON")
        assert (
            r.skipped_first[1]
            == f"{source}: line 201: expected an object with named fields, got list [1, 2, 3]"
        )
        assert "user after user" in r.skipped_first[2] and len(r.skipped_first) == 3
        assert r.warnings[-1] == (
            f"4 bad records were skipped (data.bad_records: skip): {'; '.join(r.skipped_first)}; …"
        )
        assert DataReport.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_a_source_of_nothing_but_bad_records_is_one_line(tok, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": \n[1]\n')
    with pytest.raises(DataError, match=r"none of its 2 records could be read \(data.bad_records: skip"):
        prepare(run_cfg(source=broken, bad_records="skip"), tok)
    no_answers = tmp_path / "questions.jsonl"
    no_answers.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in "abc")
    )
    with pytest.raises(DataError) as caught:
        prepare(run_cfg(source=no_answers, bad_records="skip"), tok)
    assert caught.value.message.startswith(f"{no_answers}: every record was bad (3 skipped); the first: ")


def test_stop_keeps_the_cache_key_data_had_before_the_setting(tok, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs prepared before data.bad_records existed find their prepared rows again; skip does not."""
    from dataclasses import asdict

    from engine.data import cache, pipeline

    class Keyed(Exception):
        pass

    seen: list[dict] = []

    def key_of(parts: dict) -> str:
        seen.append(parts)
        raise Keyed

    monkeypatch.setattr(cache, "key_of", key_of)
    for bad_records in ("stop", "skip"):
        with pytest.raises(Keyed):
            pipeline.prepare(run_cfg(bad_records=bad_records), tok, workers=0)
    stop, skip = (parts["data"] for parts in seen)
    assert set(stop) == set(asdict(run_cfg().data)) - {"bad_records"}
    assert skip == {**stop, "bad_records": "skip"}


def test_max_examples_counts_good_records_when_bad_ones_are_skipped(tok, tmp_path: Path) -> None:
    source, _ = _with_bad_records(tmp_path)  # a bad line at line 11, among the first 20
    r = prepare(run_cfg(source=source, bad_records="skip", max_examples=20), tok).report
    assert (r.examples, r.skipped) == (20, 1)


def test_what_is_wrong_as_a_whole_is_never_skipped(tok, tmp_path: Path) -> None:
    """Skipping is for a few bad records, not for data that does not fit as a whole: a folder of
    mixed formats, a stray first record that made `auto` pick the wrong format, or a validation
    source with no good record stop as they do without it (and say nothing about skipping)."""
    good = DATASET.read_text().splitlines()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text("\n".join(good[:100]) + "\n")
    (mixed / "b.jsonl").write_text(
        "".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(3))
    )
    for bad_records in ("skip", "stop"):
        with pytest.raises(DataError, match="mixed formats") as caught:
            prepare(run_cfg(source=mixed, bad_records=bad_records), tok)
        assert "bad_records" not in caught.value.hint
    stray = tmp_path / "stray.jsonl"
    stray.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n" + "\n".join(good[:50]) + "\n")
    with pytest.raises(DataError) as caught:
        prepare(run_cfg(source=stray, bad_records="skip"), tok)
    assert "looks like messages, while the first record read (line 1) was alpaca" in caught.value.message
    assert caught.value.hint.startswith("fix or remove that record, or set data.format: messages")
    # Followed, the hint works: the stray record is one bad record of the pinned format.
    r = prepare(run_cfg(source=stray, bad_records="skip", format="messages", val_fraction=0), tok).report
    assert (r.examples, r.skipped) == (50, 1) and "looks like alpaca, not messages" in r.skipped_first[0]
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    with pytest.raises(DataError) as caught:
        prepare(run_cfg(bad_records="skip", val_source=str(questions)), tok)
    assert caught.value.message.startswith(f"{questions}: every record was bad (1 skipped)")
    half = tmp_path / "half.jsonl"
    half.write_text("\n".join([*good[:3], *["{broken"] * 3]) + "\n")
    with pytest.raises(DataError, match=r"more records were bad \(3\) than good \(3\)"):
        prepare(run_cfg(source=half, bad_records="skip"), tok)


def test_array_elements_that_are_not_records_are_skipped(tok, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in DATASET.read_text().splitlines()[:40]]
    source = tmp_path / "array.json"
    source.write_text(json.dumps([*rows[:10], "not a record", *rows[10:]]))
    r = prepare(run_cfg(source=source, bad_records="skip", val_fraction=0), tok).report
    assert (r.examples, r.skipped) == (40, 1)
    assert r.skipped_first == [
        f"{source}: record 11: expected an object with named fields, got str 'not a record'"
    ]


def test_no_record_past_max_examples_is_read(tok, tmp_path: Path) -> None:
    source = tmp_path / "tail.jsonl"
    source.write_text("\n".join([*DATASET.read_text().splitlines()[:20], "{broken"]) + "\n")
    assert prepare(run_cfg(source=source, max_examples=20, val_fraction=0), tok).report.examples == 20
