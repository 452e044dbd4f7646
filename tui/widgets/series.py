"""A growing metric series that a chart can downsample in time proportional to its width.

A 100,000-step run must draw as fast as a 100-step one, and a run emitting 20 steps a second must
not rescan its whole history on every frame. So each series keeps, besides its raw points, a
pyramid of min/max/last summaries over complete blocks of 8, 64, 512, ... points. A block is
summarised once, when it completes (amortised O(1) per point). To draw C columns the chart picks
the coarsest level whose blocks still fit several to a column and folds about 8 blocks into each
column, plus the few points after the last complete block: the cost depends on C, not on the
length.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

FACTOR = 8  # each level summarises FACTOR blocks of the level below
_NAN = math.nan


@dataclass(frozen=True, slots=True)
class Column:
    """What one drawn column of a chart covers: the extremes and the value it ends on."""

    x: float  # x of the last point in the column
    lo: float
    hi: float
    last: float


class _Level:
    """Summaries of the complete blocks of one size; a partial block at the end is not stored."""

    __slots__ = ("block", "hi", "last", "lo")

    def __init__(self, block: int) -> None:
        self.block = block
        self.lo = array("d")
        self.hi = array("d")
        self.last = array("d")


def _extremes(lo_values: Sequence[float], hi_values: Sequence[float]) -> tuple[float, float]:
    """(min, max) ignoring NaN: a NaN loss is shown in the log, not allowed to erase a column."""
    lows = [v for v in lo_values if v == v]  # v == v is False only for NaN
    highs = [v for v in hi_values if v == v]
    return (min(lows) if lows else _NAN, max(highs) if highs else _NAN)


class Series:
    """Points (x, y) appended in increasing x; y may be NaN or infinite (drawn as gaps)."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.xs = array("d")
        self.ys = array("d")
        self._levels: list[_Level] = []
        self.version = 0  # bumped on every change, so charts can cache their drawing

    def __len__(self) -> int:
        return len(self.ys)

    @property
    def last_x(self) -> float:
        return self.xs[-1] if self.xs else 0.0

    @property
    def last_y(self) -> float:
        return self.ys[-1] if self.ys else _NAN

    def append(self, x: float, y: float) -> None:
        if not math.isfinite(y):
            y = _NAN
        self.xs.append(x)
        self.ys.append(y)
        self.version += 1
        if len(self.ys) % FACTOR == 0:
            self._close_blocks()

    def _close_blocks(self) -> None:
        """A block of FACTOR points just completed: summarise it, and cascade up the levels (level k
        is touched once every FACTOR**(k+1) points)."""
        lo_src: Sequence[float] = self.ys
        hi_src: Sequence[float] = self.ys
        last_src: Sequence[float] = self.ys
        depth = 0
        while lo_src and len(lo_src) % FACTOR == 0:
            if depth == len(self._levels):
                self._levels.append(_Level(FACTOR ** (depth + 1)))
            level = self._levels[depth]
            lo, hi = _extremes(lo_src[-FACTOR:], hi_src[-FACTOR:])
            level.lo.append(lo)
            level.hi.append(hi)
            level.last.append(last_src[-1])
            lo_src, hi_src, last_src = level.lo, level.hi, level.last
            depth += 1

    def truncate_before(self, x: float) -> None:
        """Drop every point at or after `x`: a resumed run re-logs the steps after its checkpoint."""
        keep = len(self.xs)
        while keep and self.xs[keep - 1] >= x:
            keep -= 1
        if keep == len(self.xs):
            return
        xs, ys = self.xs[:keep], self.ys[:keep]
        self.xs, self.ys, self._levels = array("d"), array("d"), []
        for xv, yv in zip(xs, ys, strict=True):
            self.append(xv, yv)
        self.version += 1

    def columns(self, count: int) -> list[Column]:
        """At most `count` columns covering every point, in order; each column folds an equal share
        of the points (snapped to summary blocks, which moves a boundary by less than a column)."""
        n = len(self.ys)
        if n == 0 or count <= 0:
            return []
        if n <= count:
            return [Column(self.xs[i], self.ys[i], self.ys[i], self.ys[i]) for i in range(n)]
        per_column = n / count
        # The coarsest summary whose blocks are no larger than a column's share.
        lo_arr: Sequence[float] = self.ys
        hi_arr: Sequence[float] = self.ys
        last_arr: Sequence[float] = self.ys
        block = 1
        for level in self._levels:
            if level.block > per_column:
                break
            lo_arr, hi_arr, last_arr, block = level.lo, level.hi, level.last, level.block
        blocks = len(lo_arr)
        out: list[Column] = []
        start = 0
        for c in range(count):
            end = min(blocks, max(start + 1, round((c + 1) * blocks / count)))
            if start >= end:
                break
            lo, hi = _extremes(lo_arr[start:end], hi_arr[start:end])
            out.append(Column(self.xs[end * block - 1], lo, hi, last_arr[end - 1]))
            start = end
        covered = blocks * block
        if covered < n:
            # The points after the last complete block join the final column.
            lows, highs = list(self.ys[covered:]), list(self.ys[covered:])
            if out:
                prev = out.pop()
                lows.append(prev.lo)
                highs.append(prev.hi)
            lo, hi = _extremes(lows, highs)
            out.append(Column(self.xs[n - 1], lo, hi, self.ys[n - 1]))
        return out

    def extent(self) -> tuple[float, float]:
        """(min, max) of the finite values: the coarsest summary plus the points after it."""
        if not self._levels:
            return _extremes(self.ys, self.ys)
        top = self._levels[-1]
        covered = len(top.lo) * top.block
        return _extremes([*top.lo, *self.ys[covered:]], [*top.hi, *self.ys[covered:]])
