"""Consoles die and come back; several follow one run. One slow-stepping tiny run: its launching
`qlc train` is hung up on (SIGHUP, as when SSH drops), then 20 `qlc attach` consoles are killed
in turn by SIGHUP or SIGKILL while following it live; it trains on through all of it. Then two
consoles attach, each sees the whole history, both ask for a live sample and both send `stop`:
each sample is answered once, the stop is applied once."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.run import runs
from tests.reliability import trials

pytestmark = pytest.mark.slow

KILLS = 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    runs_dir = tmp_path_factory.mktemp("consoles") / "runs"
    run_dir, trial = trials.launching_console_kill_trial(
        runs_dir, signal.SIGHUP, "train.max_steps=2000", "train.save_steps=1000", fault="slow_step=0.05"
    )
    assert trial["next_step"] > trial["killed_at"]
    yield run_dir
    trials.kill_engine(run_dir)


def test_the_engine_holds_the_token_it_must_never_write(run_dir: Path) -> None:
    environ = Path(f"/proc/{trials.engine_pid(run_dir)}/environ").read_bytes().split(b"\0")
    assert f"HF_TOKEN={trials.SECRET}".encode() in environ


def test_twenty_consoles_killed_mid_run_leave_it_training(run_dir: Path) -> None:
    results = [
        trials.attach_kill_trial(run_dir, signal.SIGHUP if i % 2 == 0 else signal.SIGKILL)
        for i in range(KILLS)
    ]
    assert all(r["next_step"] > r["killed_at"] for r in results)
    assert runs.is_running(run_dir)


def test_two_consoles_see_the_same_events_and_a_command_is_applied_once(run_dir: Path) -> None:
    trials.live_samples_trial(run_dir, consoles=2)
    result = trials.consoles_stop_trial(run_dir, consoles=2)
    assert result["stops_applied"] == 1
    assert trials.secret_leaks(run_dir) == []
