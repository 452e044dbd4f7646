"""Fixtures for the console's tests: run directories with a recorded history, a fake engine in place
of `python -m engine`, no GPU, and the app built by the same factory `qlc` uses."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fake_engine
from pilot_helpers import CRASHED_RUN, FINISHED_RUN, no_gpu, recorded_events

from engine import protocol
from tui.app import QlcApp, make_app


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    root.mkdir()
    return root


@pytest.fixture
def finished_run(runs_root: Path) -> Path:
    return fake_engine.make_run_dir(runs_root, FINISHED_RUN, recorded_events())


@pytest.fixture
def crashed_run(runs_root: Path) -> Path:
    """A run whose engine died mid-training (no `finished` event), with checkpoints to resume from."""
    events = [
        e for e in fake_engine.synthetic_run(80, run_id=CRASHED_RUN) if not isinstance(e, protocol.Finished)
    ]
    return fake_engine.make_run_dir(runs_root, CRASHED_RUN, events)


AppFactory = Callable[..., QlcApp]


@pytest.fixture
def app_factory(runs_root: Path) -> AppFactory:
    """make_app with the fake engine (fast: 40 steps at 200 steps/s unless told otherwise)."""

    def build(
        steps: int = 40, rate: float = 200.0, events: Path | None = None, fail_at: int | None = None, **kw
    ) -> QlcApp:
        kw.setdefault("auto_attach", False)
        return make_app(
            runs_root,
            launcher=fake_engine.launcher(steps=steps, rate=rate, events=events, fail_at=fail_at),
            sample_launcher=fake_engine.launch_sample,
            gpu_probe=no_gpu,
            **kw,
        )

    return build
