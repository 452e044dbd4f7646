"""Byte progress over one download (several files, possibly several at once), reported as
`downloading` stage events: bytes done of the total, the rate over the last few seconds and the ETA
it implies, a few times a second at most.

huggingface_hub reports transferred bytes to a tqdm-like class; `bar_class` makes one that feeds a
`ByteProgress` instead of drawing a bar.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from engine import protocol

EMIT_EVERY_S = 0.25  # at most four events a second
RATE_WINDOW_S = 5.0  # the rate is measured over this much of the recent past


class Cancelled(Exception):
    """The download was asked to stop (Ctrl-C, SIGTERM): raised inside the transfer loop."""


class ByteProgress:
    """Thread-safe: every file's transfer adds to one count."""

    def __init__(
        self,
        emit: Callable[[protocol.Event], None],
        label: str,
        total: int,
        done: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.emit = emit
        self.label = label
        self.total = total
        self.done = done  # bytes on disk: already cached or partial files count from the start
        self.transferred = 0  # bytes over the network in this session: what the rate measures
        self._active: dict[str, int] = {}  # files in transfer -> their size, for the message
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, int]] = deque([(clock(), 0)])
        self._last_emit = float("-inf")
        self._last_sent = -1
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def start_file(self, name: str, size: int = 0, already: int = 0) -> None:
        """A file of `size` bytes begins (or resumes with `already` bytes on disk, counted as done)."""
        with self._lock:
            self._active[name] = size
            self.done += already
        self.report(force=True)

    def end_file(self, name: str) -> None:
        with self._lock:
            self._active.pop(name, None)

    @property
    def file(self) -> str:
        """The largest file in transfer: what the wait is for."""
        with self._lock:
            return max(self._active, key=lambda n: self._active[n], default="")

    def add(self, n: int) -> None:
        if self._cancelled.is_set():
            raise Cancelled
        with self._lock:
            self.done += n
            self.transferred += n
        self.report()

    def rate(self) -> float | None:
        """Bytes per second over the last RATE_WINDOW_S seconds; None before there is a measure."""
        with self._lock:
            now = self._clock()
            while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
                self._samples.popleft()
            t0, b0 = self._samples[0]
            if now - t0 < 0.2:
                return None
            return max(self.transferred - b0, 0) / (now - t0)

    def finish(self) -> None:
        """The last event, unless the last one sent already said all of it."""
        with self._lock:
            self._active.clear()
        if self._last_sent != self.total:
            self.report(force=True)

    def report(self, force: bool = False) -> None:
        now = self._clock()
        with self._lock:
            if not force and now - self._last_emit < EMIT_EVERY_S:
                return
            self._last_emit = now
            self._last_sent = self.done
            self._samples.append((now, self.transferred))
        rate = self.rate()
        file = self.file
        remaining = max(self.total - self.done, 0)
        eta = remaining / rate if rate else (0.0 if remaining == 0 else None)
        message = f"{self.label}: {file}" if file else self.label
        self.emit(
            protocol.StageEvent(
                stage="downloading",
                message=message,
                current=min(self.done, self.total) if self.total else self.done,
                total=self.total,
                unit="B",
                rate=rate,
                eta_s=eta,
            )
        )


def bar_class(progress: ByteProgress) -> type:
    """A tqdm stand-in for huggingface_hub's `http_get(tqdm_class=...)`: counts bytes, draws nothing.

    Not a tqdm subclass on purpose: huggingface_hub disables its own bars (HF_HUB_DISABLE_PROGRESS_BARS,
    which the engine sets so that engine.log stays readable), never a class it does not know."""

    class Bar:
        def __init__(self, *args: Any, initial: int = 0, **kwargs: Any) -> None:
            self.n = initial

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, n: int | float | None = 1) -> None:
            n = int(n or 0)
            self.n += n
            progress.add(n)  # negative when a server ignored a Range request and the file restarts

        def close(self) -> None:
            pass

    return Bar
