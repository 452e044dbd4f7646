"""Shared fixtures. Runs go to a per-test folder; the tiny model is built once per cache folder
(QLC_CACHE_DIR, set by .ci/run to stay inside the clone)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
QLC = [sys.executable, "-m", "tui.cli"]

# Memory estimates follow the CUDA allocator an engine started from this environment would use
# (engine/allocator.py): the engine's own default, whatever the developer's shell has set.
for _name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
    os.environ.pop(_name, None)

# One intra-op thread per engine: the suite runs two test workers on two cores, and torch's
# OpenMP threads spin on a core another process holds (the tiny model gains nothing from a second
# thread; 2 threads cost 20% more CPU per run). Set before any test imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "runs"
    monkeypatch.setenv("QLC_RUNS_DIR", str(d))
    return d


def qlc(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300, **kw
) -> subprocess.CompletedProcess[str]:
    """Run the real `qlc` in a subprocess, as a user would."""
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [*QLC, *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO, **kw
    )


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a bench script (`-m bench.x ...` or `bench/x.py ...`) as the GPU session does, from the
    repository root."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def as_if_crashed(run_dir: Path, after_checkpoint: int | None = None) -> None:
    """Make a completed run look like one that died after a checkpoint (a completed run is not
    resumed): its `finished` events gone, and the checkpoints after `after_checkpoint` with them."""
    import shutil

    from engine.run import runs

    if after_checkpoint is not None:
        for checkpoint in runs.checkpoints(run_dir):
            if int(checkpoint.name.rsplit("-", 1)[1]) > after_checkpoint:
                shutil.rmtree(checkpoint)
    events = run_dir / runs.EVENTS
    lines = events.read_text().splitlines(keepends=True)
    events.write_text("".join(line for line in lines if '"type":"finished"' not in line.replace(" ", "")))
