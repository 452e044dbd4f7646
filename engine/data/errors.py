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


SKIP_HINT = "or set data.bad_records: skip to leave such records out (counted in the data report)"


class BadRecords:
    """data.bad_records: what becomes of a record that cannot be read or does not fit the format.
    "stop" raises it (naming the way to skip when the records before it were fine: then it is this
    record's fault, not the format's); "skip" counts it and keeps the first few for the report."""

    NAMED = 3

    def __init__(self, mode: str) -> None:
        self.skip = mode == "skip"
        self.count = 0
        self.first: list[str] = []

    def __call__(self, error: DataError, earlier_fine: bool) -> None:
        if not self.skip:
            if earlier_fine:
                raise DataError(error.message, "; ".join(h for h in (error.hint, SKIP_HINT) if h)) from None
            raise error
        self.count += 1
        if len(self.first) < self.NAMED:
            self.first.append(error.message)
