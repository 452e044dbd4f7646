"""The SHA-256 of a file, read a megabyte at a time: checkpoint manifests, dataset fingerprints
and export copies all compare files with it."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
