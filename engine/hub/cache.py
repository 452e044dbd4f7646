"""What the local hub cache already holds, found without a network call.

The cache is huggingface_hub's (HF_HOME/hub, or HF_HUB_CACHE): `refs/<branch>` names a commit,
`snapshots/<commit>/` links each file to its blob. What it cannot tell is whether a snapshot is
complete: a download may have stopped half-way, and a repo's file list is on the hub. So after each
complete download the engine writes a manifest, every file name and size of the repo at that
commit, under the engine's cache folder. A snapshot whose manifest is there and whose chosen files
are all present is used without asking the hub anything: a warm start makes no network call.

Offline (HF_HUB_OFFLINE), a snapshot without a manifest (filled by another tool) is used as it is:
the files it holds are all there is to choose from.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.paths import cache_root

COMMIT = re.compile(r"^[0-9a-f]{40}$")
Select = Callable[[list[str], Callable[[str], bytes]], list[str]]
"""Chooses the files to fetch from every file name of a repo, reading small ones (an index, a
README) through the callable it is given."""


@dataclass(frozen=True)
class Snapshot:
    repo: str
    repo_type: str
    commit: str
    path: Path  # the snapshot folder: loaders read it as a local folder
    files: list[str]  # the chosen files, all present
    sizes: dict[str, int] = field(default_factory=dict)  # every file of the repo at this commit

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.get(f, 0) for f in self.files)


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (its constant is read once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def storage(repo: str, repo_type: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type=repo_type)


def cached_commit(repo: str, repo_type: str, revision: str | None) -> str | None:
    if revision and COMMIT.match(revision):
        return revision
    try:
        commit = (storage(repo, repo_type) / "refs" / (revision or "main")).read_text().strip()
    except (OSError, ValueError):
        return None
    return commit if COMMIT.match(commit) else None


def write_ref(repo: str, repo_type: str, revision: str | None, commit: str) -> None:
    """refs/<branch> -> commit, as huggingface_hub writes it (so transformers and `hf` see it too)."""
    if revision and COMMIT.match(revision):
        return
    ref = storage(repo, repo_type) / "refs" / (revision or "main")
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    tmp.replace(ref)


def _manifest(repo: str, repo_type: str, commit: str) -> Path:
    return cache_root() / "hub" / storage(repo, repo_type).name / f"{commit}.json"


def write_manifest(repo: str, repo_type: str, commit: str, sizes: dict[str, int]) -> None:
    path = _manifest(repo, repo_type, commit)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"repo": repo, "repo_type": repo_type, "commit": commit, "files": sizes}))
    tmp.replace(path)


def _read_manifest(repo: str, repo_type: str, commit: str) -> dict[str, int] | None:
    try:
        data = json.loads(_manifest(repo, repo_type, commit).read_text())
        return {str(k): int(v) for k, v in data["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def find(repo: str, repo_type: str, revision: str | None, select: Select, offline: bool) -> Snapshot | None:
    """The cached snapshot of `repo` at `revision` holding every file `select` chooses, or None."""
    commit = cached_commit(repo, repo_type, revision)
    if commit is None:
        return None
    folder = storage(repo, repo_type) / "snapshots" / commit
    sizes = _read_manifest(repo, repo_type, commit)
    if sizes is None:
        if not offline or not folder.is_dir():
            return None
        sizes = {
            str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()
        }

    def read(name: str) -> bytes:
        return (folder / name).read_bytes()  # FileNotFoundError: not complete

    try:
        files = select(sorted(sizes), read)
    except FileNotFoundError:
        return None
    if not all((folder / f).is_file() for f in files):  # is_file follows the link to its blob
        return None
    return Snapshot(repo, repo_type, commit, folder, files, sizes)
