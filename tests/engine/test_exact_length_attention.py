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
