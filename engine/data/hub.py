"""Hub datasets, through `datasets.load_dataset`: only in the engine process, only with a network."""

from __future__ import annotations

from collections.abc import Iterator

from engine.data.errors import DataError, one_line
from engine.data.sources import Record


def read_hub(source: str, subset: str | None, split: str, revision: str | None = None) -> Iterator[Record]:
    from engine.errors import UserError
    from engine.hub.dataset import load  # the data files, from the local hub cache (engine/hub)

    try:
        dataset = load(source, subset, split, revision)
    except UserError:
        raise
    except Exception as exc:  # offline, unknown id, gated, bad split: all fixed by the user
        raise DataError(
            f"hub dataset {source}: cannot load split {split!r} ({exc.__class__.__name__}: {one_line(exc, 160)})",
            "check the id, data.subset and data.split, and that the hub is reachable",
        ) from None
    for number, row in enumerate(dataset, 1):
        yield Record(f"hub dataset {source} ({split}): row {number}", dict(row))
