"""Where a session's start went: from the engine process's start to its first logged step, split
by the events' own timestamps. `qlc train`, `qlc attach` and the dashboard's log print it once per
engine session, so a slow start says what was slow (imports, a download, quantizing, the data)."""

from __future__ import annotations

from engine import protocol


class LaunchClock:
    """Feed it every event; `line()` is the breakdown once the session's first step arrives."""

    def __init__(self) -> None:
        self._reset(None)

    def _reset(self, hello: protocol.Hello | None) -> None:
        self.hello = hello
        self.download: tuple[float, float] | None = None  # first and last download event
        self.ready: float | None = None
        self.data: float | None = None
        self.training: float | None = None
        self.done = False

    def feed(self, ev: protocol.Event) -> str | None:
        """The breakdown when `ev` is the session's first step, else None."""
        match ev:
            case protocol.Hello():
                self._reset(ev)
            case protocol.StageEvent(stage="downloading"):
                first = self.download[0] if self.download else ev.time
                self.download = (first, ev.time)
            case protocol.StageEvent(stage="training") if self.training is None:
                self.training = ev.time
            case protocol.ModelReady():
                self.ready = ev.time
            case protocol.DataReady():
                self.data = ev.time
            case protocol.Step() if (
                not self.done and self.hello is not None and self.hello.mode in ("train", "resume")
            ):
                self.done = True
                return self.line(ev)
        return None

    def line(self, step: protocol.Step) -> str:
        hello = self.hello
        assert hello is not None
        start = hello.started or hello.time
        parts: list[tuple[str, float]] = []
        if hello.started:
            parts.append(("start and imports", hello.time - hello.started))
        if self.ready is not None:
            model = self.ready - hello.time
            if self.download is not None:
                fetched = self.download[1] - self.download[0]
                parts.append(("download", fetched))
                model -= fetched
            parts.append(("model", model))
        if self.data is not None:
            parts.append(("data", self.data - (self.ready or hello.time)))
        before_steps = self.training or self.data or self.ready or hello.time
        if self.training is not None:
            parts.append(("trainer", self.training - (self.data or self.ready or hello.time)))
        first = "first step" if step.step == 1 else f"to step {step.step}"
        parts.append((first, step.time - before_steps))
        shown = " · ".join(f"{name} {max(0.0, seconds):.1f} s" for name, seconds in parts)
        return f"first step logged {step.time - start:.0f} s after the engine started: {shown}"
