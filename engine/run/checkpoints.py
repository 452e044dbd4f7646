"""Checkpoints that are either complete or absent.

The trainer writes each checkpoint into a hidden staging folder, RUN_DIR/checkpoints/.staging-<step>/
checkpoint-<step>/. When every file is there, `commit` hashes them into a manifest
(qlc-manifest.json, written last), flushes everything to disk, and renames the folder to
checkpoints/checkpoint-<step> in one step. A kill, a full disk or a crash at any moment leaves either
the previous set of checkpoints or the new one, plus a staging folder that no reader ever looks at
and the next engine start removes.

Readers:
- `complete(root)`: the checkpoints a resume may use, oldest first. Cheap (a stat per file): a
  manifest, and every file it lists at its recorded size. Used by `qlc runs`, `qlc resume`, sampling.
- `verify(path)`: the full check, every file's SHA-256 against the manifest. The engine runs it
  before resuming and falls back to the newest checkpoint that passes.

Old checkpoints are removed by renaming them to .deleting-<name> first, so a kill during the removal
never leaves a half-deleted checkpoint under a checkpoint name.

A folder without a manifest is never a checkpoint, whatever else it holds: that is the one rule
that keeps a partial save from ever being taken for a complete one.

Pure Python: the console imports this module through engine.run.runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
from pathlib import Path

from engine.durable import fsync_path
from engine.hashing import sha256_file

PREFIX = "checkpoint-"
MANIFEST = "qlc-manifest.json"
STAGING_PREFIX = ".staging-"
DELETING_PREFIX = ".deleting-"
FORMAT = 1


def step_of(path: Path) -> int | None:
    digits = path.name.removeprefix(PREFIX)
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


def staging_root(root: Path, step: int) -> Path:
    return root / f"{STAGING_PREFIX}{step}"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, step: int) -> dict:
    """Hash and flush every file of `folder`, then write the manifest (flushed too)."""
    files = {}
    for path in _files(folder):
        fsync_path(path)
        files[path.relative_to(folder).as_posix()] = {
            "size": path.stat().st_size,
            "sha256": sha256_file(path),
        }
    manifest = {"format": FORMAT, "step": step, "written": time.time(), "files": files}
    tmp = folder / f".{MANIFEST}.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(folder / MANIFEST)
    for sub in {p.parent for p in folder.rglob("*")} | {folder}:
        fsync_path(sub)
    return manifest


def commit(staged: Path, root: Path) -> Path:
    """Make the staged checkpoint folder complete and visible under its final name."""
    step = step_of(staged)
    if step is None:
        raise ValueError(f"{staged}: not a checkpoint folder")
    os.chmod(staged, 0o700)  # like the run directory: the owner's alone
    write_manifest(staged, step)
    final = root / staged.name
    old = None
    if final.exists():  # the same step saved again: keep the old one until the new one is in place
        old = root / f"{DELETING_PREFIX}{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(staged, final)
    fsync_path(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _manifest(path: Path) -> dict | None:
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None
    return data


def problem(path: Path, full: bool = False, step: int | None = None) -> str | None:
    """Why `path` is not a complete checkpoint (of `step`, by default the one its name says), or
    None. `full` also compares every file's hash."""
    if not path.is_dir():
        return "not a folder"
    if not (path / MANIFEST).exists():
        return f"no {MANIFEST} (an incomplete save)"
    manifest = _manifest(path)
    if manifest is None:
        return f"{MANIFEST} is unreadable"
    if manifest.get("step") != (step if step is not None else step_of(path)):
        return f"{MANIFEST} is for step {manifest.get('step')}"
    for name, entry in manifest["files"].items():
        file = path / name
        try:
            size = file.stat().st_size
        except OSError:
            return f"{name} is missing"
        if not isinstance(entry, dict) or size != entry.get("size"):
            return f"{name} has {size} bytes, the manifest says {entry.get('size') if isinstance(entry, dict) else '?'}"
        if full and sha256_file(file) != entry.get("sha256"):
            return f"{name} does not match its SHA-256"
    return None


def complete(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (the cheap check: sizes, not hashes)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None and problem(p) is None]
    return sorted(found, key=lambda p: step_of(p) or 0)


def newest_verified(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint whose files all match their hashes, and the newer ones that did not
    (each with the reason), which a resume skips."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(complete(root)):
        reason = problem(path, full=True)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def remove(path: Path) -> None:
    """Delete a checkpoint without ever leaving a partial one under a checkpoint name."""
    doomed = path.parent / f"{DELETING_PREFIX}{path.name}"
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def rotate(root: Path, keep: int) -> list[Path]:
    """Keep the newest `keep` complete checkpoints; remove older ones. Returns what was removed."""
    found = complete(root)
    doomed = found[: max(len(found) - max(keep, 1), 0)]
    for path in doomed:
        remove(path)
    return doomed


def clean_stale(root: Path) -> list[str]:
    """Remove what an engine killed mid-save or mid-removal left behind. Called by the engine that
    holds the run's lock, before it trains. Returns the names removed."""
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(DELETING_PREFIX):
            original = root / path.name.removeprefix(DELETING_PREFIX)
            # Killed between moving the old copy of a re-saved step aside and putting the new one in
            # place: the old copy is complete, put it back.
            step = step_of(original)
            if step is not None and not original.exists() and problem(path, step=step) is None:
                os.rename(path, original)
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
        elif path.name.startswith(STAGING_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def free_bytes(path: Path) -> int | None:
    with contextlib.suppress(OSError):
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize
    return None


_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "storagefull")


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT anywhere in the exception's chain. torch.save and safetensors wrap the
    OSError in their own errors, whose text is all that is left of it."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(current).lower() for text in _DISK_FULL_TEXT):
            return True
        current = current.__cause__ or current.__context__
    return False
