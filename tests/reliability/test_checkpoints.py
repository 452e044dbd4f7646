"""engine.run.checkpoints on real folders: a checkpoint is listed only when complete, a damaged one is
found by verification and skipped, removal and rotation never leave a partial checkpoint under a
checkpoint name, and what a killed engine left is cleaned up. Also the $QLC_FAULT grammar."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.errors import UserError
from engine.run import checkpoints, runs
from engine.train import faults


def _staged(root: Path, step: int, payload: bytes = b"weights") -> Path:
    """A checkpoint as the trainer leaves it in its staging folder, before the commit."""
    folder = checkpoints.staging_root(root, step) / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(payload * 100)
    (folder / "optimizer.pt").write_bytes(b"state" * 50)
    (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    return folder


def _committed(root: Path, step: int, payload: bytes = b"weights") -> Path:
    staged = _staged(root, step, payload)
    final = checkpoints.commit(staged, root)
    staged.parent.rmdir()
    return final


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoints"
    path.mkdir()
    return path


def test_a_staged_checkpoint_is_invisible_until_committed(root: Path) -> None:
    staged = _staged(root, 4)
    assert checkpoints.complete(root) == []  # trainer_state.json is there, but under .staging-4
    final = checkpoints.commit(staged, root)
    assert final == root / "checkpoint-4" and checkpoints.complete(root) == [final]
    assert oct(final.stat().st_mode & 0o777) == "0o700"
    manifest = (final / checkpoints.MANIFEST).read_text()
    assert '"adapter_model.safetensors"' in manifest and '"step": 4' in manifest


@pytest.mark.parametrize(
    "damage, cheap_finds_it",
    [
        (lambda p: (p / checkpoints.MANIFEST).unlink(), True),  # the save never finished
        (lambda p: (p / "optimizer.pt").unlink(), True),
        (lambda p: os.truncate(p / "adapter_model.safetensors", 10), True),
        (lambda p: (p / checkpoints.MANIFEST).write_text("{not json"), True),
        # Same size, other bytes: only the full verification sees it.
        (lambda p: (p / "optimizer.pt").write_bytes(b"STATE" * 50), False),
    ],
    ids=["no-manifest", "missing-file", "truncated", "bad-manifest", "bit-rot"],
)
def test_a_damaged_checkpoint_is_never_taken_and_resume_falls_back(
    root: Path, damage, cheap_finds_it
) -> None:
    older, newer = _committed(root, 2), _committed(root, 4)
    damage(newer)
    assert (newer not in checkpoints.complete(root)) == cheap_finds_it
    chosen, skipped = checkpoints.newest_verified(root)
    assert chosen == older
    assert [p for p, _ in skipped] == ([] if cheap_finds_it else [newer])


def test_a_folder_without_a_manifest_is_never_a_checkpoint(root: Path) -> None:
    """Whatever it holds: trainer_state.json, the old completeness marker, proves nothing about
    the files written before it once the manifest that lists them is gone."""
    odd = root / "checkpoint-6"
    odd.mkdir()
    (odd / "trainer_state.json").write_text("{}")
    assert checkpoints.complete(root) == [] and checkpoints.newest_verified(root) == (None, [])


def test_rotation_keeps_the_newest_and_leaves_no_partial_names(root: Path) -> None:
    for step in (2, 4, 6, 8, 10):
        _committed(root, step)
    removed = checkpoints.rotate(root, keep=3)
    assert [p.name for p in removed] == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-10", "checkpoint-6", "checkpoint-8"]


def test_saving_the_same_step_again_replaces_it_whole(root: Path) -> None:
    _committed(root, 4, b"first")
    final = _committed(root, 4, b"second")
    assert (final / "adapter_model.safetensors").read_bytes() == b"second" * 100
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-4"]


def test_what_a_killed_engine_left_is_cleaned_up(root: Path) -> None:
    kept = _committed(root, 2)
    _staged(root, 4)  # killed mid-save
    doomed = _committed(root, 6)
    os.rename(doomed, root / ".deleting-checkpoint-0")  # killed mid-removal of an old one
    replaced = _committed(root, 8)
    # Killed after moving the old copy of a re-saved step aside, before the new one was renamed in.
    os.rename(replaced, root / ".deleting-checkpoint-8")
    removed = checkpoints.clean_stale(root)
    assert sorted(removed) == [".deleting-checkpoint-0", ".staging-4"]
    assert [p.name for p in checkpoints.complete(root)] == [kept.name, "checkpoint-8"]


def test_runs_lists_only_complete_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    root = run_dir / runs.CHECKPOINTS
    root.mkdir(parents=True)
    _committed(root, 2)
    _staged(root, 4)
    assert [p.name for p in runs.checkpoints(run_dir)] == ["checkpoint-2"]
    assert runs.find_checkpoint(run_dir).name == "checkpoint-2"
    with pytest.raises(UserError, match="no checkpoint at step 4"):
        runs.find_checkpoint(run_dir, 4)


def test_disk_full_is_recognised_through_library_wrappers() -> None:
    assert checkpoints.is_disk_full(OSError(28, "No space left on device"))
    wrapped = RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    assert checkpoints.is_disk_full(wrapped)
    try:
        try:
            raise OSError(122, "Disk quota exceeded")
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from inner
    except RuntimeError as outer:
        assert checkpoints.is_disk_full(outer)
    assert not checkpoints.is_disk_full(OSError(13, "Permission denied"))


def test_the_fault_grammar() -> None:
    assert not faults.parse("").armed
    plan = faults.parse("kill_in_save, oom_at_step=7,slow_step=0.5,audit_loads")
    assert (plan.kill_in_save, plan.oom_at_step, plan.slow_step, plan.audit_loads) == (1, 7, 0.5, True)
    assert plan.describe() == "kill_in_save=1,oom_at_step=7,slow_step=0.5,audit_loads"
    for bad, message in [
        ("kill_in_saev", "unknown fault 'kill_in_saev'"),
        ("oom_at_step", "has a bad value"),
        ("nan_at_step=0", "must count from 1"),
        ("audit_loads=1", "has a bad value"),
    ]:
        with pytest.raises(UserError, match=message):
            faults.parse(bad)


def test_faults_are_inert_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(faults.ENV, raising=False)
    injector = faults.FaultInjector.from_env()
    assert not injector.plan.armed
    injector.before_step(1)
    injector.in_save("/nonexistent")
    assert injector.poison_loss(1.5, 1) == 1.5
