"""The CUDA allocator settings the engine starts with (engine/allocator.py), on plain dicts: the
engine turns expandable segments on, a user's own setting wins, and the memory estimate agrees
with what the engine will use."""

from __future__ import annotations

import os

import pytest

from engine import allocator


@pytest.fixture(autouse=True)
def _supported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decide WSL and Tegra per test, whatever machine runs the suite."""
    monkeypatch.setattr(allocator, "_supported", lambda: True)


def test_the_engine_turns_on_expandable_segments() -> None:
    env: dict[str, str] = {}
    allocator.configure(env)
    assert env == {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    assert allocator.expandable_segments(env)
    assert allocator.describe(env) == "CUDA allocator: expandable_segments:True"


def test_an_older_torch_gets_the_name_it_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.9.1+cu128")
    env: dict[str, str] = {}
    allocator.configure(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert allocator.expandable_segments(env)


@pytest.mark.parametrize("name", ["PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"])
def test_a_users_setting_wins(name: str) -> None:
    env = {name: "max_split_size_mb:256"}
    allocator.configure(env)
    assert env == {name: "max_split_size_mb:256"}
    assert not allocator.expandable_segments(env)
    assert allocator.describe(env) == "CUDA allocator: max_split_size_mb:256"


@pytest.mark.parametrize(
    "setting, expandable",
    [
        ("expandable_segments:True", True),
        ("max_split_size_mb:128, expandable_segments: true", True),
        ("expandable_segments:False", False),
        ("roundup_power2_divisions:4", False),
    ],
)
def test_the_users_setting_is_read(setting: str, expandable: bool) -> None:
    assert allocator.expandable_segments({"PYTORCH_ALLOC_CONF": setting}) is expandable


def test_not_where_they_are_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_supported", lambda: False)
    env: dict[str, str] = {}
    allocator.configure(env)
    assert env == {}
    assert not allocator.expandable_segments(env)
    assert "default" in allocator.describe(env)


def test_wsl_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real check
    monkeypatch.setenv("WSL_DISTRO_NAME", "Ubuntu")
    assert not allocator._supported()


def test_the_engine_configures_it_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """engine/__main__.py sets the allocator up before a run (and torch) starts."""
    import engine.__main__ as entry

    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.setenv(name, "")  # so that teardown restores the variable as it was
        monkeypatch.delenv(name)
    seen: list[str | None] = []
    monkeypatch.setattr(
        entry, "_train", lambda run_dir, resume: seen.append(os.environ.get("PYTORCH_ALLOC_CONF")) or 0
    )
    assert entry.main(["train", "some-run"]) == 0
    assert seen == ["expandable_segments:True"]
