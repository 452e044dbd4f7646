"""Hub datasets: the data files of one subset and split, fetched with progress into the local hub
cache, then loaded by `datasets` from that local snapshot (never from the hub id, which would
download again, silently, and at whatever `main` is by then)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine import protocol
from engine.errors import UserError
from engine.hub.cache import Select, Snapshot
from engine.hub.fetch import fetch
from engine.hub.files import README, dataset_files, readme_configs

BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".txt": "text"}  # fmt: skip
COMPRESSION = (".gz", ".zst", ".bz2", ".xz")


def _configs(names: list[str], read: Callable[[str], bytes]) -> list[dict[str, Any]]:
    return readme_configs(read(README).decode("utf-8", "replace")) if README in names else []


def selector(repo: str, subset: str | None, split: str) -> Select:
    def select(names: list[str], read: Callable[[str], bytes]) -> list[str]:
        configs = _configs(names, read)
        files, _ = dataset_files(names, configs, repo=repo, subset=subset, split=split)
        # The card stays with the files: which file is which split is read from it again on load.
        return sorted({*files, README}) if configs else files

    return select


def fetch_dataset(
    repo: str,
    subset: str | None,
    split: str,
    revision: str | None,
    *,
    where: str = "data.source",
    emit: Callable[[protocol.Event], None] | None = None,
    refresh: bool = False,
) -> Snapshot:
    return fetch(
        repo, "dataset", revision, selector(repo, subset, split), where=where, emit=emit, refresh=refresh
    )


def _builder(files: list[str], repo: str) -> tuple[str, dict[str, Any]]:
    kinds = set()
    for name in files:
        base = name.lower()
        for comp in COMPRESSION:
            base = base.removesuffix(comp)
        kinds.add(next((b for suffix, b in BUILDERS.items() if base.endswith(suffix)), "?"))
    if len(kinds) != 1 or "?" in kinds:
        raise UserError(
            f"data.split: {repo}'s files for this split mix formats ({', '.join(sorted(files)[:3])}…)"
        )
    builder = kinds.pop()
    options = {"delimiter": "\t"} if builder == "csv" and all(".tsv" in f.lower() for f in files) else {}
    return builder, options


def load(repo: str, subset: str | None, split: str, revision: str | None) -> Any:
    """A `datasets.Dataset` of one split of a hub dataset, at `revision` (a pinned commit in a run),
    from the local snapshot (fetched first if it is not cached)."""
    import datasets

    snap = fetch_dataset(repo, subset, split, revision)
    names = sorted(snap.sizes)
    configs = _configs(names, lambda name: (snap.path / name).read_bytes())
    _, by_split = dataset_files(names, configs, repo=repo, subset=subset, split=split)
    if by_split is None:  # no card configs: `datasets` tells the splits apart by file names
        return datasets.load_dataset(str(snap.path), subset, split=split)
    builder, options = _builder([f for fs in by_split.values() for f in fs], repo)
    data_files = {name: [str(snap.path / f) for f in fs] for name, fs in by_split.items()}
    return datasets.load_dataset(builder, data_files=data_files, split=split, **options)
