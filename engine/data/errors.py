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
