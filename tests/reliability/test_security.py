"""Only the owner controls a run: run directories 0700, the control FIFO and every file the
engine writes 0600, proven with a second user where the machine allows it (root with useradd and
setpriv, as on CI), by modes otherwise. Nothing the engine loads is unpickled beyond
weights_only=True (the audit is in test_faults); trust_remote_code is off unless confirmed."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.config import load_preset
from engine.run import launcher, runs
from engine.run.events import FileSink
from tests.conftest import REPO


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A run directory as `qlc train` makes it, with the files the engine adds, under a runs folder
    anyone may enter (so that only the run's own modes keep another user out). Outside pytest's
    temporary folder, which is itself private to its owner and would prove nothing."""
    base = Path(tempfile.mkdtemp(prefix="qlc-security-"))
    try:
        os.chmod(base, 0o755)
        root = base / "runs"
        root.mkdir(mode=0o755)
        os.chmod(root, 0o755)
        (root / "readme.txt").write_text("anyone may read this\n")
        os.chmod(root / "readme.txt", 0o644)
        path = runs.create_run(root, load_preset("tiny-demo"))
        sink = FileSink(path / runs.EVENTS)
        sink.write(b'{"type":"log","message":"private"}\n')
        sink.close()
        launcher.open_log(path).close()
        yield path
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_run_files_are_the_owners_alone(run_dir: Path) -> None:
    assert _mode(run_dir) == 0o700
    assert _mode(run_dir / runs.CHECKPOINTS) == 0o700
    assert stat.S_ISFIFO((run_dir / runs.CONTROL).lstat().st_mode) and _mode(run_dir / runs.CONTROL) == 0o600
    for name in (runs.CONFIG, runs.EVENTS, runs.ENGINE_LOG):
        assert _mode(run_dir / name) == 0o600, name


def _second_user_possible() -> bool:
    return os.geteuid() == 0 and all(shutil.which(tool) for tool in ("useradd", "userdel", "setpriv"))


@pytest.fixture
def other_user() -> Iterator[tuple[int, int]]:
    if not _second_user_possible():
        pytest.skip("needs root with useradd and setpriv (the modes are checked above)")
    name = f"qlcprobe{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True, capture_output=True)
    try:
        import pwd

        entry = pwd.getpwnam(name)
        yield entry.pw_uid, entry.pw_gid
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def _as(user: tuple[int, int], *command: str) -> subprocess.CompletedProcess[str]:
    uid, gid = user
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "timeout", "5", *command],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_another_user_can_neither_read_events_nor_send_commands(
    run_dir: Path, other_user: tuple[int, int]
) -> None:
    # The control: that user reaches the runs folder and reads what is meant for anyone.
    assert _as(other_user, "cat", str(run_dir.parent / "readme.txt")).stdout == "anyone may read this\n"
    events, fifo = run_dir / runs.EVENTS, run_dir / runs.CONTROL
    stop = f'printf \'{{"type":"stop"}}\\n\' > {fifo}'
    # The run directory (0700) stops them at the door...
    for attempt in (_as(other_user, "cat", str(events)), _as(other_user, "sh", "-c", stop)):
        assert attempt.returncode != 0 and "Permission denied" in attempt.stderr, attempt
    # ...and were it opened for traversal by mistake, the files' own modes (0600) still would.
    os.chmod(run_dir, 0o711)
    try:
        for attempt in (_as(other_user, "cat", str(events)), _as(other_user, "sh", "-c", stop)):
            assert attempt.returncode != 0 and "Permission denied" in attempt.stderr, attempt
        assert _as(other_user, "ls", str(run_dir)).returncode != 0
    finally:
        os.chmod(run_dir, 0o700)


def test_nothing_in_the_project_unpickles_beyond_weights_only() -> None:
    """Our own code loads adapters through safetensors only, and any torch.load of ours says
    weights_only=True on its line; transformers' resume loads optimizer.pt, scheduler.pt and
    rng_state.pth with weights_only=True (audited in test_faults through QLC_FAULT=audit_loads)."""
    offenders = []
    pattern = re.compile(r"\bpickle\.loads?\(|weights_only\s*=\s*False|\bimport pickle\b")
    for folder in ("engine", "tui"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "faults.py":  # the audit that wraps torch.load
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                unsafe_load = "torch.load(" in line and "weights_only=True" not in line
                if unsafe_load or pattern.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def test_trust_remote_code_is_off_in_every_preset() -> None:
    from engine.config import list_presets

    for path in list_presets():
        assert load_preset(str(path)).model.trust_remote_code is False, path.name
