"""Where qlora-console keeps what it can rebuild or fetch again: built models, hub downloads,
prepared data. One folder (QLC_CACHE_DIR, else the user's cache folder), decided here alone."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("QLC_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("qlora-console"))
