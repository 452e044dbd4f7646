"""What an engine process inherits from the launcher: compiled-kernel caches that persist between
runs, under the user cache folder, unless the user has set their own."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.run import launcher


def test_compiled_kernels_persist_under_the_cache_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QLC_CACHE_DIR", str(tmp_path))
    for key in ("UNSLOTH_COMPILE_LOCATION", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/of/my/own")
    env = launcher._env()
    assert env["UNSLOTH_COMPILE_LOCATION"] == str(tmp_path / "compiled" / "unsloth")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compiled" / "inductor")
    assert env["TRITON_CACHE_DIR"] == "/somewhere/of/my/own"  # the user's wins
    assert (tmp_path / "compiled" / "unsloth").is_dir()


def test_openmp_threads_sleep_sooner_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two engines on the CPU spun against each other (9.5 s a tiny-demo step each, 0.13 alone)."""
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert launcher._env()["GOMP_SPINCOUNT"] == str(launcher.GOMP_SPINCOUNT)
    monkeypatch.setenv("GOMP_SPINCOUNT", "42")
    assert launcher._env()["GOMP_SPINCOUNT"] == "42"  # the user's wins
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a policy of their own: no spin count from us
    assert "GOMP_SPINCOUNT" not in launcher._env()
