"""Where qlora-console keeps what it can rebuild or fetch again: built models, hub downloads,
prepared data. One folder (QLC_CACHE_DIR, else the user's cache folder), decided here alone.

And how a data source reads as a local path or a hub id (`is_local`): the preset loader resolves
relative paths with it and the data reader opens them, so both sit below either."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("QLC_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("qlora-console"))


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def as_path(source: str) -> Path | None:
    """`source` as a path, or None when no file can have that name (an unknown ~user, a NUL byte,
    a name too long)."""
    try:
        path = Path(source).expanduser()
        path.exists()
    except (OSError, RuntimeError, ValueError):
        return None
    return path


def is_local(source: str) -> bool:
    """A path that exists, or one that is clearly meant as a path (and is then reported missing).

    A hub id is `name` or `owner/name`: no file suffix, no leading `.`, `/` or `~`, at most one `/`.
    """
    path = as_path(source)
    if path is not None and path.exists():
        return True
    return (
        source.startswith((".", "/", "~"))
        or source.endswith(DATA_SUFFIXES)
        or source.count("/") > 1
        or "\\" in source
    )
