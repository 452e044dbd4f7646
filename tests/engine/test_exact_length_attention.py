"""Unsloth's cuDNN length padding is turned off only where every sequence of a run has one length.

`one_segment_length` runs on data the real pipeline prepared. Unsloth imports only on a GPU, so its
attention module is stood in for by a module holding the one setting the backend changes
(`_CUDNN_LENGTH_BUCKET`, as unsloth.utils.attention_dispatch holds it in 2026.10.9); the effect
on speed is measured on the GPU (bench/gpu_speed_session.sh attention-bucket)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.config import DataConfig, RunConfig, TrainConfig
from engine.data import prepare
from engine.data.pipeline import one_segment_length
from engine.models.tiny import DATASET
from engine.models.tiny_build import ensure_builtin
from engine.train.backends import unsloth as backend
from tests.engine.shifted_loss import summed_shifted_loss


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(ensure_builtin("builtin:tiny-llama"))


def _cfg(source: Path, **data) -> RunConfig:
    return RunConfig(
        data=DataConfig(source=str(source), **data), train=TrainConfig(seq_len=64, micro_batch=2)
    )


def test_rows_of_one_length_have_that_length(tok, tmp_path: Path) -> None:
    rows = tmp_path / "tokens.jsonl"
    rows.write_text("".join(json.dumps({"input_ids": list(range(10, 74))}) + "\n" for _ in range(40)))
    p = prepare(_cfg(rows, format="tokens", val_fraction=0.1), tok)
    assert len(p.train) == 36 and len(p.eval) == 4
    assert one_segment_length(p.train, p.eval) == 64


def test_chat_examples_and_packed_rows_have_many(tok) -> None:
    padded = prepare(_cfg(DATASET, max_examples=100), tok)
    assert one_segment_length(padded.train, padded.eval) is None
    # Packed rows are all seq_len long, but attention runs over each example inside them.
    packed = prepare(_cfg(DATASET, max_examples=100, packing=True), tok)
    assert one_segment_length(packed.train) is None


@pytest.fixture
def dispatch(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("unsloth.utils.attention_dispatch")
    module._CUDNN_LENGTH_BUCKET = 128  # type: ignore[attr-defined]
    utils = types.ModuleType("unsloth.utils")
    utils.attention_dispatch = module  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "unsloth", types.ModuleType("unsloth"))
    monkeypatch.setitem(sys.modules, "unsloth.utils", utils)
    monkeypatch.setitem(sys.modules, "unsloth.utils.attention_dispatch", module)
    monkeypatch.setattr(backend, "_SHIPPED_BUCKET", None)
    return module


def test_one_length_turns_the_padding_off_and_none_puts_it_back(dispatch: types.ModuleType) -> None:
    note = backend.exact_length_attention(4096)
    assert note is not None and "4096 tokens" in note and "multiple of 128 rows" in note
    assert dispatch._CUDNN_LENGTH_BUCKET == 0
    assert backend.exact_length_attention(4096) is None  # off already: nothing to say
    assert backend.exact_length_attention(None) is None
    assert dispatch._CUDNN_LENGTH_BUCKET == 128  # as Unsloth shipped it, for a run of many lengths


def test_many_lengths_keep_the_padding(dispatch: types.ModuleType) -> None:
    assert backend.exact_length_attention(None) is None
    assert dispatch._CUDNN_LENGTH_BUCKET == 128


def test_a_bucket_the_user_set_is_kept(dispatch: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNSLOTH_SDPA_CUDNN_BUCKET", "128")  # as bench/gpu_speed_session.sh sets it
    assert backend.exact_length_attention(4096) is None
    assert dispatch._CUDNN_LENGTH_BUCKET == 128


def test_the_environment_turned_it_off(dispatch: types.ModuleType) -> None:
    dispatch._CUDNN_LENGTH_BUCKET = 0  # UNSLOTH_SDPA_CUDNN_BUCKET=0
    assert backend.exact_length_attention(2048) is None
    assert backend.exact_length_attention(None) is None
    assert dispatch._CUDNN_LENGTH_BUCKET == 0  # the user's choice stays


def test_an_unsloth_without_the_setting_is_left_alone(dispatch: types.ModuleType) -> None:
    del dispatch._CUDNN_LENGTH_BUCKET
    assert backend.exact_length_attention(4096) is None
    assert not hasattr(dispatch, "_CUDNN_LENGTH_BUCKET")


def test_a_set_without_an_arrow_table_says_nothing() -> None:
    class Stream:
        column_names = ("input_ids",)

    assert one_segment_length(Stream()) is None


def _even_prepared(tok, tmp_path: Path):
    """Pre-tokenized rows of one length (64), each its own example, as a speed run feeds them."""
    rows = tmp_path / "tokens.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"input_ids": [(7 * i + j) % 200 + 10 for j in range(64)]}) + "\n" for i in range(12)
        )
    )
    p = prepare(_cfg(rows, format="tokens", val_fraction=0), tok)
    p.collator.padding_free = True
    return p


def test_rows_of_one_length_go_as_rows_with_the_one_row_loss(tok, tmp_path: Path) -> None:
    """The same tokens, targets and positions as the one padding-free row, shaped n x length, and
    the same summed loss and number of targets: attention never crossed an example either way."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.data.encoded import IGNORE

    p = _even_prepared(tok, tmp_path)
    rows = [p.train[i] for i in range(3)]
    one = p.collator(rows)
    p.collator.even_rows = True
    even = p.collator(rows)
    assert set(even) == {"input_ids", "labels", "position_ids"}  # no lengths: nothing to slice
    assert even["input_ids"].shape == (3, 64)
    for key in ("input_ids", "labels", "position_ids"):
        assert even[key].flatten().tolist() == one[key].flatten().tolist()
    assert (even["labels"][:, 0] == IGNORE).all()

    model = AutoModelForCausalLM.from_pretrained(ensure_builtin("builtin:tiny-llama"), dtype=torch.float32)
    model.eval()

    (loss_one, count_one), (loss_even, count_even) = (summed_shifted_loss(model, b) for b in (one, even))
    assert count_even == count_one == 3 * 63
    torch.testing.assert_close(loss_even, loss_one, atol=1e-3, rtol=1e-4)

    # A micro-batch of two lengths (a short last row, say) stays one row.
    mixed = p.collator(
        [rows[0], {**rows[1], "input_ids": rows[1]["input_ids"][:40], "labels": rows[1]["labels"][:40]}]
    )
    assert mixed["input_ids"].shape == (1, 104) and "packed_seq_lengths" in mixed


class _Config:
    def __init__(self, model_type: str, vision: bool = False) -> None:
        self.model_type = model_type
        self.vision_config = {} if vision else None


class _Peft:
    def __init__(self, targets: set[str]) -> None:
        self.target_modules = targets


class _Model:
    """What even_rows reads of a peft-wrapped model: its config and its adapters' targets."""

    def __init__(self, model_type: str, vision: bool = False, targets: set[str] | None = None) -> None:
        self.config = _Config(model_type, vision)
        self.peft_config = {"default": _Peft(targets or {"q_proj", "v_proj", "gate_proj", "down_proj"})}


def test_even_rows_only_on_unsloths_fast_path_with_one_length(tok, tmp_path: Path) -> None:
    p = _even_prepared(tok, tmp_path)
    note = backend.even_rows(p.collator, _Model("llama"), 64)
    assert note is not None and "64 tokens" in note and p.collator.even_rows
    attention_only = _Model("llama", targets={"q_proj", "k_proj", "v_proj", "o_proj"})
    for model, length in (
        (_Model("gemma3_text"), 64),
        (_Model("gemma3", vision=True), 64),
        (_Model("llama"), None),
        (attention_only, 64),  # the MLP's plain 4-bit layers: the one row, as the memory model knows it
    ):
        p.collator.even_rows = False
        assert backend.even_rows(p.collator, model, length) is None and not p.collator.even_rows
    p.collator.padding_free = False  # an Unsloth without packing support: padded rows already
    assert backend.even_rows(p.collator, _Model("qwen2"), 64) is None and not p.collator.even_rows


def test_a_run_that_checkpoints_keeps_the_one_row(tok, tmp_path: Path, dispatch: types.ModuleType) -> None:
    """Even rows only where no layer is checkpointed: with checkpointing they raised the measured
    peaks (UnslothBackend.fit_to_data); the attention padding goes off either way."""
    from engine.memory.checkpointing import CheckpointPlan

    for checkpointed, expected in ((0, True), (4, False)):
        p = _even_prepared(tok, tmp_path)
        dispatch._CUDNN_LENGTH_BUCKET = 128
        backend._SHIPPED_BUCKET = None
        notes = backend.BACKEND.fit_to_data(p, _Model("llama"), CheckpointPlan(8, checkpointed, "test"))
        assert p.collator.even_rows is expected
        assert dispatch._CUDNN_LENGTH_BUCKET == 0
        assert any(n.startswith("rows:") for n in notes) is expected
