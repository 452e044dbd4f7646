"""The prepared-data cache: tokenized, masked, packed rows on disk, keyed by everything that decides
them, shared by a first run, its resume, a second run and `qlc data`.

An entry is a folder CACHE/<key>/ holding train.arrow (and eval.arrow), Arrow IPC streams that
`datasets` memory-maps, and meta.json (the data report's figures, the files' sizes). The key
hashes the data's content (every local file's SHA-256; a hub dataset's fingerprint), the data.*
settings, train.seq_len, the tokenizer (its tokenizer.json, special tokens and vocabulary size),
the chat template's text, and the source of this package: change any and the data is prepared
again.

Written atomically: an entry is built in a temporary folder next to the cache, its files are
fsynced, and only then is the folder renamed into place. A crash mid-write leaves a temporary
folder (removed by a later build once its process is gone), never an entry; an entry whose files do
not match its meta.json is rebuilt. A lock file per key makes a second process preparing the same
data (another rank, `qlc data` during `qlc train`) wait and reuse the first one's entry.

CACHE is QLC_DATA_CACHE, else $QLC_CACHE_DIR/data (the user cache folder by default).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.durable import fsync_path

VERSION = 2  # 2: assistant messages with weight 0 are not trained
META = "meta.json"
TRAIN = "train.arrow"
EVAL = "eval.arrow"


def cache_dir() -> Path:
    env = os.environ.get("QLC_DATA_CACHE")
    if env:
        return Path(env)
    from engine.paths import cache_root

    return cache_root() / "data"


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """The data package's own source: a change to how data is prepared invalidates the cache."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


_FILE_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content (remembered for this process while its size and time hold)."""
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        _FILE_DIGESTS[memo] = h.hexdigest()
    return _FILE_DIGESTS[memo]


def key_of(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:40]


@dataclass
class Entry:
    path: Path
    meta: dict[str, Any]

    @property
    def train(self) -> Path:
        return self.path / TRAIN

    @property
    def eval(self) -> Path | None:
        return self.path / EVAL if (self.path / EVAL).is_file() else None


@contextlib.contextmanager
def locked(key: str) -> Iterator[None]:
    """Hold KEY's lock: one process prepares a key's data at a time; the others then reuse it."""
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{key}.lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def is_locked(key: str) -> bool:
    """Whether another process holds KEY's lock right now (it is preparing the same data)."""
    path = cache_dir() / "locks" / f"{key}.lock"
    if not path.exists():
        return False
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return False


def load(key: str) -> Entry | None:
    """The complete entry for KEY, or None. An entry that does not check out is removed."""
    path = cache_dir() / key
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        return None
    files = meta.get("files", {})
    ok = meta.get("version") == VERSION and meta.get("key") == key and TRAIN in files
    for name, size in files.items():
        f = path / name
        ok = ok and f.is_file() and f.stat().st_size == size
    if not ok:
        shutil.rmtree(path, ignore_errors=True)
        return None
    with contextlib.suppress(OSError):
        os.utime(path / META)  # when it was last used
    return Entry(path, meta)


def new_folder(key: str) -> Path:
    """A fresh temporary folder to build KEY's entry in (on the cache's own file system, so that
    the final rename is atomic). Leftovers of builds whose process is gone are removed first."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(".tmp-*"):
        pid = old.name.split("-")[2] if old.name.count("-") >= 3 else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = root / f".tmp-{key[:16]}-{os.getpid()}-{time.monotonic_ns()}"
    folder.mkdir()
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(folder: Path, key: str, meta: dict[str, Any]) -> Entry:
    """Make FOLDER (its data files written and closed) KEY's entry: meta.json last, everything
    fsynced, then one rename."""
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.suffix == ".arrow"}
    meta = {**meta, "version": VERSION, "key": key, "files": files, "created": time.time()}
    for name in files:
        fsync_path(folder / name)
    (folder / META).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    fsync_path(folder / META)
    fsync_path(folder)
    target = cache_dir() / key
    if target.exists():  # a stale or damaged entry (load removed what it could not trust)
        shutil.rmtree(target, ignore_errors=True)
    folder.rename(target)
    fsync_path(cache_dir())
    return Entry(target, meta)
