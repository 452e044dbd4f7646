"""The dataset a run trains on, fingerprinted when it starts and checked before it resumes.

A resume restores the data position (which rows come next) from the checkpoint. If the file
changed, or is gone, that position points into other data: the run would silently train on
something else, or die deep inside data preparation. So the engine records RUN_DIR/dataset.json
(every local data file's size, modification time and SHA-256) before it first reads the data, and
`qlc resume`, the console and the engine itself compare against it before resuming, and explain
what changed. The consoles hash a file only when its size or time changed (a resume must not wait
on hashing gigabytes); the engine always hashes, before it loads anything.

Hub datasets are recorded by id, split, subset and the commit the run pinned (engine/run/pins.py):
a resume reads that commit, so there is nothing to compare.
Runs created before fingerprints existed have no record and are not checked.

Pure Python: the console imports this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from engine.config import RunConfig
from engine.data.sources import is_local, local_files
from engine.errors import UserError
from engine.hashing import sha256_file

RECORD = "dataset.json"


class DataChanged(UserError):
    """The run's dataset differs from the one it started with."""

    kind = "data_changed"


def _describe(source: str, cfg: RunConfig, hashed: bool = True) -> dict[str, Any]:
    if not is_local(source):
        revision = cfg.data.revision if source == cfg.data.source else cfg.data.val_revision
        return {
            "kind": "hub",
            "id": source,
            "split": cfg.data.split,
            "subset": cfg.data.subset,
            "revision": revision,
        }
    files = {}
    for path in local_files(source):
        st = path.stat()
        files[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if hashed:
            files[str(path)]["sha256"] = sha256_file(path)
    return {"kind": "local", "path": source, "files": files}


def fingerprint(cfg: RunConfig) -> dict[str, Any]:
    d = cfg.data
    return {
        "source": _describe(d.source, cfg),
        "val_source": _describe(d.val_source, cfg) if d.val_source else None,
    }


def record(run_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    """Write RUN_DIR/dataset.json (temporary file, then rename)."""
    data = fingerprint(cfg)
    tmp = run_dir / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.chmod(tmp, 0o600)
    tmp.rename(run_dir / RECORD)
    return data


def _differences(
    name: str, then: dict[str, Any] | None, now_source: str | None, cfg: RunConfig, full: bool
) -> str | None:
    if then is None or then.get("kind") != "local":
        return None
    then_files: dict[str, dict] = then.get("files", {})
    missing = [f for f in then_files if not Path(f).is_file()]
    if missing:
        what = missing[0] + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        return f"{name} {what} is gone since the run started"
    try:
        now = _describe(now_source or then["path"], cfg, hashed=False)
    except UserError as exc:
        return f"{name} {then['path']} cannot be read any more: {exc.message}"
    now_files: dict[str, dict] = now["files"]
    for path, entry in then_files.items():
        current = now_files.get(path)
        if current is None:
            continue
        if current["size"] != entry["size"]:
            return f"{name} {path} changed since the run started ({entry['size']} bytes then, {current['size']} now)"
        if not full and current["mtime_ns"] == entry.get("mtime_ns"):
            continue  # untouched since: no need to read it
        if sha256_file(Path(path)) != entry["sha256"]:
            return f"{name} {path} changed since the run started (same size, different content)"
    added = sorted(set(now_files) - set(then_files))
    if added:
        return f"{name} {then['path']} has new files since the run started ({added[0]}…)"
    return None


def check(run_dir: Path, cfg: RunConfig, full: bool = False) -> None:
    """Raise DataChanged, one line, if the run's data is not what it started with. `full` hashes
    every file; otherwise only those whose modification time changed."""
    try:
        then = json.loads((run_dir / RECORD).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        raise UserError(f"{run_dir / RECORD}: unreadable", "the run directory is damaged") from None
    for name, key, source in (
        ("data.source", "source", cfg.data.source),
        ("data.val_source", "val_source", cfg.data.val_source),
    ):
        problem = _differences(name, then.get(key), source, cfg, full)
        if problem:
            raise DataChanged(
                problem,
                "resuming would continue at a data position that no longer exists: restore the file, "
                "or start a new run with `qlc train`",
            )
