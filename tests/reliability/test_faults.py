"""One tiny run taken through every engine fault, in order: SIGKILL at random moments and inside a
save, out of memory, a NaN loss, a full disk, its dataset changed and then gone. After each, the
run must resume from its newest complete checkpoint; at the end it completes, and every resumed
session reproduced the losses of the session before it for the steps both trained: no saved work
was lost. `bench/faults.py` repeats each fault 20 times; here each runs once or twice.

The tests share the run (module scope) and run in file order; each also works alone."""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.run import runs
from tests.conftest import REPO
from tests.reliability import trials

pytestmark = pytest.mark.slow

STEPS = 40
DATA = REPO / "presets" / "data" / "tiny-instruct.jsonl"


class Chain:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data" / "tiny-instruct.jsonl"
        self.data.parent.mkdir()
        shutil.copy(DATA, self.data)  # the dataset trial edits and deletes it
        self.rng = random.Random(20261123)
        self.run_dir, self.first = trials.first_kill_trial(
            root / "runs", self.rng, f"train.max_steps={STEPS}", f"data.source={self.data}"
        )


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    chain = Chain(tmp_path_factory.mktemp("chain"))
    yield chain
    trials.kill_engine(chain.run_dir)


def test_sigkill_at_random_moments_and_inside_a_save(chain: Chain) -> None:
    assert chain.first["complete_after"], chain.first
    in_save = trials.kill_trial(chain.run_dir, chain.rng, in_save=True)
    trials.check_resumed_from_newest(chain.run_dir, in_save)
    # The fault struck inside the save, after the adapter files: a partial folder was left, and
    # no reader took it for a checkpoint (checkpoint_state checked that).
    assert in_save["partial_save_left"] and not in_save["finished_before_the_kill"], in_save
    anytime = trials.kill_trial(chain.run_dir, chain.rng, in_save=False)
    trials.check_resumed_from_newest(chain.run_dir, anytime)


def test_out_of_memory_fails_the_run_with_advice_and_its_last_checkpoint(chain: Chain) -> None:
    # The engine that starts next removes what the killed save left behind, and says so.
    result = trials.oom_trial(chain.run_dir)
    session = trials.sessions(chain.run_dir)[-1]
    assert result["advice"] >= 1 and "out of memory" in result["error"]
    assert session.hello.mode == "resume" and trials.checkpoint_state(chain.run_dir)["partial"] == []


def test_a_nan_loss_stops_the_run_at_its_step_and_keeps_the_good_checkpoint(chain: Chain) -> None:
    result = trials.nan_trial(chain.run_dir)
    assert f"step {result['at_step']}" in result["error"]


def test_a_nan_loss_no_log_has_seen_yet_is_stopped_by_the_save_that_would_keep_it(tmp_path: Path) -> None:
    """Logging every 2 steps and saving every 3: a NaN at step 3 reaches the save before any log
    shows it. The trainer's guard refuses that save; the run has no checkpoint, and says why."""
    run_dir = trials.start(
        tmp_path / "runs",
        "train.max_steps=6",
        "train.logging_steps=2",
        "train.save_steps=3",
        fault="nan_at_step=3",
    )
    trials.wait_for(
        run_dir,
        lambda: bool(trials.sessions(run_dir)) and trials.sessions(run_dir)[-1].finished is not None,
        what="the run to finish",
    )
    trials.wait_stopped(run_dir)
    (session,) = trials.sessions(run_dir)
    (error,) = session.errors
    assert error.kind == "nan_loss" and error.step == 3 and "at step 3;" in error.message, error
    assert (
        session.finished and session.finished.status == "failed" and session.finished.last_checkpoint is None
    )
    assert session.saved == [] and trials.checkpoint_state(run_dir) == {"complete": [], "partial": []}


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(chain: Chain) -> None:
    result = trials.disk_full_trial(chain.run_dir)
    assert "disk full while saving checkpoint-" in result["error"]


@pytest.mark.parametrize("how", ["edit", "delete"])
def test_a_changed_or_missing_dataset_is_refused_on_resume(chain: Chain, how: str) -> None:
    # The engine's own check (a console that skipped it) is exercised once here, every time in
    # bench/faults.py.
    trials.dataset_trial(chain.run_dir, chain.data, how, engine_check=how == "edit")


def test_the_run_then_completes_and_every_resume_reproduced_its_losses(chain: Chain) -> None:
    expected = runs.find_checkpoint(chain.run_dir).name
    trials.finish(chain.run_dir, fault="audit_loads")
    # Resuming unpickles the optimizer, scheduler and RNG states, each with weights_only=True
    # (the adapter itself comes from safetensors).
    loads = trials.audited_loads(chain.run_dir)
    assert sorted(loads) == [
        "optimizer.pt weights_only=True",
        "rng_state.pth weights_only=True",
        "scheduler.pt weights_only=True",
    ], loads
    sessions = trials.sessions(chain.run_dir)
    assert sessions[-1].hello.resumed_from == expected
    assert sessions[-1].finished and sessions[-1].finished.step == STEPS
    assert set().union(*(s.steps for s in sessions)) == set(range(1, STEPS + 1))
    # At least the two steps the disk-full session trained before its failed save; random kills
    # add more.
    assert trials.check_resume_reproduces(chain.run_dir) >= 2
    assert (chain.run_dir / runs.ADAPTER / "adapter_model.safetensors").is_file()


def test_no_secret_is_written_anywhere_in_the_run(chain: Chain) -> None:
    """Every engine of this run had HF_TOKEN in its environment (test_consoles checks that it
    reaches the engine process): config, events, engine.log and checkpoints never hold it."""
    assert trials.secret_leaks(chain.root) == []
