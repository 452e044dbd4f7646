"""Download a hub repo's chosen files into the local hub cache, with byte progress, resumably.

    1. The revision resolves to a commit, with every file's size (one API call).
    2. The files to fetch are chosen (engine/hub/files.py); the total is known before any transfer.
    3. Each file not yet cached is downloaded with huggingface_hub's `http_get` into
       `blobs/<etag>.incomplete`, a name stable across processes, then renamed to its blob; the
       snapshot link is made by `hf_hub_download`, which finds the blob and transfers nothing.

Why not `snapshot_download`: huggingface_hub (1.x) downloads into a temporary file unique to each
process and deletes it on failure, so an interrupted 5 GB shard starts again from its first byte
(huggingface_hub#4196); its Xet transfers do the same. Here a transfer interrupted by the network,
a kill or a reboot resumes where its file stops, with an HTTP Range request, in this process (the
client retries a dropped connection) or the next one. A resumed file is checked against its
SHA-256 (the LFS etag) before it is used.

A warm cache (engine/hub/cache.py) is used without a network call, unless `refresh` (`qlc pull`).
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from engine import protocol
from engine.errors import UserError
from engine.hub import cache
from engine.hub.cache import Select, Snapshot
from engine.hub.errors import explain, unreachable
from engine.hub.progress import ByteProgress, Cancelled, bar_class

SHA256 = re.compile(r"^[0-9a-f]{64}$")
WORKERS = 4  # files downloaded at once: one stream per file, as huggingface_hub does (it uses 8)
# huggingface_hub writes (and counts) a download in chunks of DOWNLOAD_CHUNK_SIZE, 10 MiB: at 2 MB/s
# a progress report every 5 s, and up to 10 MiB received but never written when a connection drops.
CHUNK_BYTES = 1 << 20


def fetch(
    repo: str,
    repo_type: str,
    revision: str | None,
    select: Select,
    *,
    where: str,
    emit: Callable[[protocol.Event], None] | None = None,
    refresh: bool = False,
    workers: int = WORKERS,
) -> Snapshot:
    """The snapshot of `repo` at `revision` holding the files `select` chooses, downloading what is
    missing. Hub refusals and network failures raise a one-line UserError naming `where`."""
    offline = cache.offline()
    if offline or not refresh:
        found = cache.find(repo, repo_type, revision, select, offline)
        if found is not None:
            return found
        if offline:
            raise UserError(
                f"{where}: {repo} is not in the local hub cache"
                + (f" at revision {revision}" if revision else "")
                + ", and HF_HUB_OFFLINE is set",
                "download it once with the network on (`qlc pull`), or name a local folder",
            )
    emit = emit or (lambda ev: None)
    try:
        return _download(repo, repo_type, revision, select, emit, workers)
    except UserError:
        raise
    except Exception as exc:
        # No network, but a cache filled before the engine kept manifests (or by another tool):
        # a run uses it, as huggingface_hub itself would. A pull was asked to reach the hub.
        cached = (
            None if refresh or not unreachable(exc) else cache.find(repo, repo_type, revision, select, True)
        )
        if cached is not None:
            emit(
                protocol.Log(
                    level="warning",
                    message=f"cannot reach the hub ({exc.__class__.__name__}): using the cached {repo} "
                    f"at commit {cached.commit[:12]}",
                )
            )
            return cached
        problem = explain(exc, repo, repo_type, revision, where)
        if problem is None:
            raise
        raise problem from None


def _download(
    repo: str,
    repo_type: str,
    revision: str | None,
    select: Select,
    emit: Callable[[protocol.Event], None],
    workers: int,
) -> Snapshot:
    from huggingface_hub import HfApi, hf_hub_download

    info = HfApi().repo_info(repo, repo_type=repo_type, revision=revision, files_metadata=True)
    commit = str(info.sha)
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}

    def read(name: str) -> bytes:  # small files the choice depends on (an index, a README)
        return Path(hf_hub_download(repo, name, repo_type=repo_type, revision=commit)).read_bytes()

    files = select(sorted(sizes), read)
    folder = cache.storage(repo, repo_type) / "snapshots" / commit
    missing = [f for f in files if not (folder / f).is_file()]
    progress = ByteProgress(
        emit,
        label=repo if revision is None else f"{repo}@{revision}",
        total=sum(sizes.get(f, 0) for f in files),
        done=sum(sizes.get(f, 0) for f in files if f not in missing),
    )
    _check_space(cache.storage(repo, repo_type), sum(sizes.get(f, 0) for f in missing), repo)
    if missing:
        progress.report(force=True)
    _run_all(missing, lambda name: _fetch_file(repo, repo_type, commit, name, progress), progress, workers)
    if missing:
        progress.finish()
    cache.write_ref(repo, repo_type, revision, commit)
    cache.write_manifest(repo, repo_type, commit, sizes)
    return Snapshot(repo, repo_type, commit, folder, files, sizes)


def _run_all(names: list[str], job: Callable[[str], None], progress: ByteProgress, workers: int) -> None:
    """Every job, `workers` at a time. The first failure (or a Ctrl-C here) stops the others at
    their next chunk; partial files stay for the next attempt."""
    if not names:
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers, len(names))))
    futures = [pool.submit(job, name) for name in names]
    try:
        for future in concurrent.futures.as_completed(futures):
            future.result()
    except BaseException:
        progress.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _check_space(root: Path, needed: int, repo: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if needed > free:
        raise UserError(
            f"{repo} needs {needed / 1e9:.1f} GB more in the hub cache ({root.parent}), and the disk has {free / 1e9:.1f} GB free",
            "free space, or point HF_HOME (or HF_HUB_CACHE) at a larger disk",
        )


def _fetch_file(repo: str, repo_type: str, commit: str, name: str, progress: ByteProgress) -> None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    url = hf_hub_url(repo, name, repo_type=repo_type, revision=commit)
    meta = get_hf_file_metadata(url)
    if not meta.etag:
        raise UserError(f"{repo}: the hub sent no etag for {name}", "check HF_ENDPOINT")
    blob = cache.storage(repo, repo_type) / "blobs" / meta.etag
    if blob.is_file():  # the same content under another name or commit
        progress.start_file(name, already=blob.stat().st_size)
    else:
        _download_blob(url, blob, meta.size, name, progress)
    progress.end_file(name)
    # The snapshot link (and nothing else: the blob is there, so nothing is transferred).
    hf_hub_download(repo, name, repo_type=repo_type, revision=commit)


def _download_blob(url: str, blob: Path, size: int | None, name: str, progress: ByteProgress) -> None:
    from huggingface_hub import constants
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    constants.DOWNLOAD_CHUNK_SIZE = CHUNK_BYTES  # read by http_get at each call
    blob.parent.mkdir(parents=True, exist_ok=True)
    partial = blob.with_name(f"{blob.name}.incomplete")
    fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+b") as f:
        # Another process (a rank, a `qlc pull`) downloading the same file: wait, then use its blob.
        fcntl.flock(f, fcntl.LOCK_EX)
        if blob.is_file():
            progress.start_file(name, already=blob.stat().st_size)
            return
        for attempt in (1, 2):
            have = f.seek(0, os.SEEK_END)
            if size is not None and have > size:  # not this file's start: begin again
                f.truncate(0)
                have = f.seek(0)
            progress.start_file(name, size or 0, already=have)
            http_get(
                url,
                f,
                resume_size=have,
                # The token (HF_TOKEN or `hf auth login`'s); httpx drops it when a redirect leaves the hub.
                headers=build_hf_headers(),
                expected_size=size,
                displayed_filename=name,
                tqdm_class=bar_class(progress),
            )
            f.flush()
            if have == 0 or not SHA256.match(blob.name) or _sha256(f) == blob.name:
                break
            # The part kept from an earlier session does not belong to this file: start it over.
            progress.start_file(name, size or 0, already=-f.tell())
            f.truncate(0)
            f.seek(0)
            if attempt == 2:
                raise UserError(
                    f"{name}: the downloaded file does not match its checksum twice", "try again later"
                )
        os.fsync(f.fileno())
        os.replace(partial, blob)


def _sha256(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    f.seek(0)
    while chunk := f.read(1 << 24):
        digest.update(chunk)
    return digest.hexdigest()


__all__ = ["Cancelled", "Snapshot", "fetch"]
