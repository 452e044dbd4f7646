"""Hub datasets: the split's files fetched into the local hub cache with progress (engine/hub), then
opened with `datasets` as memory-mapped Arrow. Only in an engine process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from engine.data.errors import DataError, one_line
from engine.data.sources import Record


def open_hub(source: str, subset: str | None, split: str, revision: str | None = None) -> Any:
    """The split as a `datasets.Dataset`, at `revision` (a run's pinned commit) or the newest."""
    from engine.errors import UserError
    from engine.hub.dataset import load  # the data files, from the local hub cache (engine/hub)

    try:
        return load(source, subset, split, revision)
    except UserError:
        raise
    except Exception as exc:  # offline, unknown id, gated, bad split: all fixed by the user
        raise DataError(
            f"hub dataset {source}: cannot load split {split!r} ({exc.__class__.__name__}: {one_line(exc, 160)})",
            "check the id, data.subset and data.split, and that the hub is reachable",
        ) from None


def hub_records(dataset: Any, source: str, split: str) -> Iterator[Record]:
    for number, row in enumerate(dataset, 1):
        yield Record(f"hub dataset {source} ({split}): row {number}", dict(row), f"hub dataset {source}")


def read_hub(source: str, subset: str | None, split: str, revision: str | None = None) -> Iterator[Record]:
    yield from hub_records(open_hub(source, subset, split, revision), source, split)
