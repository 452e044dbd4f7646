"""fsync of a file or a folder by path: what a checkpoint and a data-cache entry flush before they
are renamed into place, so that a crash never leaves a published entry with missing bytes."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush `path` (a file, or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
