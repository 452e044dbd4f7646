"""A growing metric series that a chart can downsample in time proportional to its width.

A 100,000-step run must draw as fast as a 100-step one, and a run emitting 20 steps a second must
not rescan its whole history on every frame. So each series keeps, besides its raw points, a
pyramid of min/max/last summaries over blocks of 8, 64, 512, ... points, updated in O(levels) per
append. To draw C columns the chart picks the coarsest level whose blocks still fit several to a
column, and folds at most ~8 blocks into each column: the cost depends on C, not on the length.
"""

from __future__ import annotations

import math
from array import array
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
    __slots__ = ("block", "hi", "last", "lo")

    def __init__(self, block: int) -> None:
        self.block = block
        self.lo = array("d")
        self.hi = array("d")
        self.last = array("d")


def _fmin(a: float, b: float) -> float:
    # NaN-tolerant: a NaN loss is shown in the log, not allowed to erase a column's extent.
    if a != a:
        return b
    if b != b:
        return a
    return a if a < b else b


def _fmax(a: float, b: float) -> float:
    if a != a:
        return b
    if b != b:
        return a
    return a if a > b else b


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
        index = len(self.ys) - 1
        block = FACTOR
        depth = 0
        while index // block > 0 or (depth < len(self._levels)):
            if depth == len(self._levels):
                # A new coarser level, built from the raw points so far (happens log(n) times).
                self._levels.append(self._build_level(block))
            else:
                level = self._levels[depth]
                slot = index // block
                if slot == len(level.lo):
                    level.lo.append(y)
                    level.hi.append(y)
                    level.last.append(y)
                else:
                    level.lo[slot] = _fmin(level.lo[slot], y)
                    level.hi[slot] = _fmax(level.hi[slot], y)
                    level.last[slot] = y
            depth += 1
            block *= FACTOR
        self.version += 1

    def _build_level(self, block: int) -> _Level:
        level = _Level(block)
        ys = self.ys
        for start in range(0, len(ys), block):
            lo, hi = _NAN, _NAN
            for y in ys[start : start + block]:
                lo, hi = _fmin(lo, y), _fmax(hi, y)
            level.lo.append(lo)
            level.hi.append(hi)
            level.last.append(ys[min(start + block, len(ys)) - 1])
        return level

    def truncate_before(self, x: float) -> None:
        """Drop every point at or after `x`: a resumed run re-logs the steps after its checkpoint."""
        keep = len(self.xs)
        while keep and self.xs[keep - 1] >= x:
            keep -= 1
        if keep == len(self.xs):
            return
        del self.xs[keep:]
        del self.ys[keep:]
        self._levels = []
        block = FACTOR
        while len(self.ys) > block:
            self._levels.append(self._build_level(block))
            block *= FACTOR
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
        lo_arr, hi_arr, last_arr, block = self.ys, self.ys, self.ys, 1
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
            lo, hi = _NAN, _NAN
            for i in range(start, end):
                lo, hi = _fmin(lo, lo_arr[i]), _fmax(hi, hi_arr[i])
            last_index = min(end * block, n) - 1
            out.append(Column(self.xs[last_index], lo, hi, last_arr[end - 1]))
            start = end
        return out

    def extent(self) -> tuple[float, float]:
        """(min, max) of the finite values, from the coarsest summary: O(n / 8^levels)."""
        lo_arr, hi_arr = (self._levels[-1].lo, self._levels[-1].hi) if self._levels else (self.ys, self.ys)
        lo, hi = _NAN, _NAN
        for a, b in zip(lo_arr, hi_arr, strict=True):
            lo, hi = _fmin(lo, a), _fmax(hi, b)
        return lo, hi
