"""The one error the data pipeline raises for bad data: a single line naming where and what."""

from __future__ import annotations

from typing import Any

from engine.errors import UserError


class DataError(UserError):
    """A dataset problem a user can fix: the file, the line or row, and what is wrong with it."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised in a tokenizing worker process, it crosses back pickled: keep the hint too.
        return (type(self), (self.message, self.hint))


def at(where: str, problem: str, hint: str = "") -> DataError:
    """`where` is "FILE: line N" (or row/record N); the message stays on one line whatever the data holds."""
    return DataError(f"{where}: {one_line(problem)}", hint)


def one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class FormatError(DataError):
    """The data as a whole does not fit (mixed formats in a folder, a pinned data.format the
    records do not have): never one bad record to skip."""


SKIP_HINT = "or set data.bad_records: skip to leave such records out (counted in the data report)"


class BadRecords:
    """data.bad_records: what becomes of a record that cannot be read or does not fit the format.
    "stop" raises it (naming the way to skip when the records before it were fine: then it is this
    record's fault, not the format's); "skip" counts it and keeps the first few for the report.
    A FormatError is raised either way."""

    NAMED = 3

    def __init__(self, mode: str) -> None:
        self.skip = mode == "skip"
        self.count = 0
        self.first: list[str] = []

    def __call__(self, error: DataError, earlier_fine: bool) -> None:
        if isinstance(error, FormatError):
            raise error
        if not self.skip:
            if earlier_fine:
                raise DataError(error.message, "; ".join(h for h in (error.hint, SKIP_HINT) if h)) from None
            raise error
        self.count += 1
        if len(self.first) < self.NAMED:
            self.first.append(error.message)

    def verdict(self, source: str, good: int, skipped_before: int = 0) -> None:
        """After one source: skipping must have left more good records than bad ones. When most
        are bad, the format (a stray first record decided it) or data.columns is what is wrong."""
        skipped = self.count - skipped_before
        if not skipped or good > skipped:
            return
        first = self.first[0] if self.first else ""
        what = (
            f"every record was bad ({skipped:,} skipped)"
            if not good
            else (f"more records were bad ({skipped:,}) than good ({good:,})")
        )
        raise DataError(
            f"{source}: {what}; the first: {first}",
            "check data.format and data.columns, or fix the data: with data.bad_records: stop the "
            "first bad record stops preparation, named",
        )
