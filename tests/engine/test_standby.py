"""Warm engines (engine/run/standby.py, engine/train/warm.py): a standby with the hf stack imported
takes the next `qlc train` from the same environment, trains it in its own process while the
launched one relays, and a run with hardware.keep_warm leaves a new one behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from engine.run import runs, standby
from tests.conftest import REPO, qlc


def test_the_key_ignores_what_a_new_login_changes_and_nothing_a_library_reads() -> None:
    env = {"HOME": "/home/u", "CUDA_VISIBLE_DEVICES": "0", "PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    same = {**env, "SSH_CONNECTION": "1.2.3.4 5 6.7.8.9 22", "TERM": "xterm", "TMUX": "/tmp/t", "PWD": "/x"}
    assert standby.env_key(env) == standby.env_key(same)
    for name, value in (("CUDA_VISIBLE_DEVICES", "1"), ("PYTORCH_ALLOC_CONF", ""), ("QLC_FAULT", "x")):
        assert standby.env_key({**env, name: value}) != standby.env_key(env), name
    assert standby.env_key(env, executable="/other/python") != standby.env_key(env)


def test_the_socket_folder_must_be_the_users_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = standby.socket_dir()
    assert folder.stat().st_mode & 0o777 == 0o700 and standby.registry_dir().parent == folder
    folder.chmod(0o755)  # anyone could reach a socket there: no standby listens in it
    with pytest.raises(PermissionError, match="private"):
        standby.socket_dir()


def test_a_standby_takes_only_what_the_launch_changes_of_its_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(standby, "launch_env", {"HOME": "/h", "TERM": "xterm", "SSH_TTY": "/dev/pts/1"})
    # The standby's process: its start environment, plus what Unsloth's import set for itself.
    environ = {"HOME": "/h", "TERM": "xterm", "SSH_TTY": "/dev/pts/1", "UNSLOTH_IS_PRESENT": "1"}
    launch = {"HOME": "/h", "TERM": "tmux-256color", "SSH_CONNECTION": "a b c d"}
    standby.adopt_environment(launch, environ)
    assert environ == {
        "HOME": "/h",
        "TERM": "tmux-256color",
        "SSH_CONNECTION": "a b c d",
        "UNSLOTH_IS_PRESENT": "1",
    }
    assert standby.launch_env == launch  # the next standby starts from the launch's


def test_an_entry_whose_pid_was_reused_is_no_standby(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a reboot or a kill, an entry's pid may belong to another process (another user's, or
    one of ours): the registry drops it, and nothing is signalled."""
    from engine.run.proc import started_at

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("QLC_CACHE_DIR", str(tmp_path / "cache"))
    fields = {"backend": "hf", "key": "k", "socket": str(tmp_path / "x.sock"), "started": time.time()}
    for pid, pid_started in ((1, started_at(1) - 60), (os.getpid(), started_at() - 3600), (2**22 + 7, 0.0)):
        standby.Standby(pid=pid, pid_started=pid_started, **fields).write()  # type: ignore[arg-type]
    assert standby.listed() == [] and standby.stop_all() == []
    assert list(standby.registry_dir().glob("*.json")) == []


def test_a_standby_declines_a_run_it_did_not_import_the_stack_for(
    runs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.config import load_preset
    from engine.train.warm import decline_reason

    run_dir = runs.create_run(runs_dir, load_preset("tiny-demo", ["hardware.device=cpu"]))
    request = {"argv": ["train", str(run_dir)], "cwd": "/"}
    assert decline_reason(request, "hf") == ""  # the CPU trains with hf
    assert decline_reason(request, "unsloth") == "the run trains with hf, this engine imported unsloth"
    assert decline_reason({"argv": ["sample", str(run_dir)]}, "hf") == "not a training launch"
    (run_dir / runs.CONFIG).write_text("model: [")
    assert decline_reason(request, "hf").startswith("its config does not resolve here")


def _wait_for(predicate, timeout: float = 90.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_warm_engine_trains_the_next_launch_and_relays_its_stop(
    runs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cache folder of this test's own (a cold start elsewhere in the suite stops every standby
    # of its cache folder), sharing the built tiny model and prepared data.
    shared = Path(os.environ.get("QLC_CACHE_DIR") or REPO / ".ci-cache" / "qlc")
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("models", "data"):
        if (shared / name).exists():
            (cache / name).symlink_to(shared / name)
    monkeypatch.setenv("QLC_CACHE_DIR", str(cache))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the sockets' folder (engine.run.standby.socket_dir)
    monkeypatch.setattr(tempfile, "tempdir", None)
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}  # as tests.conftest.qlc runs qlc
    try:
        _hand_over_and_stop(runs_dir, cache, env)
    finally:
        standby.stop_all()


def _hand_over_and_stop(runs_dir: Path, cache: Path, env: dict[str, str]) -> None:
    # The standby a run leaves, started here with the environment `qlc` gives its engine.
    spawn = "from engine.run import launcher, standby; print(standby.spawn('hf', 1, launcher._env()))"
    subprocess.run([sys.executable, "-c", spawn], env=env, cwd=REPO, check=True, capture_output=True)
    _wait_for(lambda: any(e.ready for e in standby.listed()), what="the standby to import the hf stack")
    (waiting,) = standby.listed()

    started = qlc(
        "train",
        "tiny-demo",
        "--detach",
        "--set",
        "train.max_steps=400",
        "--set",
        "hardware.keep_warm=1",
        "--set",
        "hardware.backend=hf",
    )
    assert started.returncode == 0, started.stderr
    relay = int(started.stdout.split("(pid ")[1].split(")")[0])
    (run_dir,) = runs_dir.iterdir()
    _wait_for(lambda: runs.is_running(run_dir) and (run_dir / runs.LOCK).read_text(), what="the run")
    # The run's engine is the standby: its lock holds the standby's pid, not the launched one's.
    assert runs.lock_pid(run_dir) == waiting.pid != relay
    assert all(e.pid != waiting.pid for e in standby.listed())
    _wait_for(lambda: runs.summarize(run_dir).step >= 1, what="a first step")

    os.kill(relay, signal.SIGTERM)  # as a console's stop would: the relay passes it on
    _wait_for(lambda: not runs.is_running(run_dir), what="the run to stop")
    summary = runs.summarize(run_dir)
    assert summary.status == "stopped" and runs.checkpoints(run_dir)
    log = (run_dir / runs.ENGINE_LOG).read_text()
    assert f"handed to warm engine {waiting.pid}" in log
    events = [type(e).__name__ for e in runs.read_events(run_dir)[0]]
    assert "Hello" in events and "Finished" in events

    # hardware.keep_warm=1: the run left the next standby, with the launch's environment.
    _wait_for(lambda: any(e.pid != waiting.pid for e in standby.listed()), what="the next standby")
    (kept,) = standby.listed()
    assert kept.key == waiting.key and kept.backend == "hf"
    listing = qlc("warm", env={"QLC_CACHE_DIR": str(cache)})
    assert str(kept.pid) in listing.stdout and "hf" in listing.stdout
    stopped = qlc("warm", "--stop", env={"QLC_CACHE_DIR": str(cache)})
    assert stopped.returncode == 0 and "stopped 1 warm engine" in stopped.stdout
    assert standby.listed() == []


def test_a_cold_start_stops_every_idle_standby(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle standby of another environment holds GPU memory that the cold run's budget does not
    count: the launch that finds none to take it ends them all before it imports anything."""
    import argparse

    from engine.__main__ import _hand_over
    from engine.run.proc import started_at

    monkeypatch.setenv("QLC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        other = standby.Standby(
            pid=idle.pid, backend="hf", key="another-environment", socket=str(tmp_path / "x.sock"),
            started=time.time(), pid_started=started_at(idle.pid), ready=time.time(), idle_until=time.time() + 60,
        )  # fmt: skip
        other.write()
        assert standby.listed() == [other]
        args = argparse.Namespace(mode="train", run_dir=tmp_path / "no-such-run")
        assert _hand_over(args) is None  # nobody took it: the caller starts cold
        assert idle.wait(timeout=10) == -signal.SIGTERM
        assert standby.listed() == []
    finally:
        idle.kill()
