"""Progress of data preparation as `protocol.StageEvent`s: a few a second at most, with the rate
measured over the last several seconds and the ETA it implies."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from engine import protocol

Emit = Callable[[protocol.StageEvent], None]


class Progress:
    """Counts one phase (`message`) of `total` units; `advance` reports at most every `every_s`."""

    def __init__(
        self,
        emit: Emit | None,
        message: str,
        total: int = 0,
        unit: str = "examples",
        every_s: float = 0.5,
        window_s: float = 10.0,
    ) -> None:
        self.emit = emit
        self.message = message
        self.total = total
        self.unit = unit
        self.every_s = every_s
        self.window_s = window_s
        self.current = 0
        self.started = time.monotonic()
        self._last_emit = float("-inf")
        self._samples: deque[tuple[float, int]] = deque([(self.started, 0)])
        self._send(force=True)

    def rate(self) -> float | None:
        """Units a second over the recent window (since the start until a window has passed)."""
        now = time.monotonic()
        while len(self._samples) > 1 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        if now - t0 < 0.2 or self.current <= n0:
            return None
        return (self.current - n0) / (now - t0)

    def advance(self, n: int) -> None:
        self.current += n
        self._samples.append((time.monotonic(), self.current))
        self._send()

    def done(self, message: str | None = None) -> None:
        if self.total != self.current:
            self.total = self.current  # the total was an estimate (blank lines, a JSON array's size)
        if message:
            self.message = message
        self._send(force=True, final=True)

    def _send(self, force: bool = False, final: bool = False) -> None:
        if self.emit is None:
            return
        now = time.monotonic()
        if not force and now - self._last_emit < self.every_s:
            return
        self._last_emit = now
        rate = self.rate()
        if final and self.current:
            rate = self.current / max(now - self.started, 1e-9)
        total = max(self.total, self.current) if self.total else 0
        eta = (total - self.current) / rate if rate and total else None
        self.emit(
            protocol.StageEvent(
                stage="preparing_data",
                message=self.message,
                current=self.current,
                total=total,
                unit=self.unit,
                rate=round(rate, 3) if rate else None,
                eta_s=round(eta, 1) if eta is not None else None,
            )
        )


def stage(emit: Emit | None, message: str) -> None:
    """A step of data preparation without a count (reusing the cache, packing)."""
    if emit is not None:
        emit(protocol.StageEvent(stage="preparing_data", message=message))
