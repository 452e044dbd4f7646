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
