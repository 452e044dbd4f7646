"""Where a session's start went: the breakdown `qlc train` and the dashboard log print once per
engine session, from the events' own timestamps."""

from __future__ import annotations

from engine import protocol
from tui.history import RunHistory
from tui.launch_clock import LaunchClock


def _session(t0: float, mode: str = "train", first_step: int = 1) -> list[protocol.Event]:
    return [
        protocol.Hello(time=t0 + 40.0, started=t0, mode=mode, run_id="r"),
        protocol.StageEvent(time=t0 + 41.0, stage="downloading", unit="B", current=0, total=100),
        protocol.StageEvent(time=t0 + 161.0, stage="downloading", unit="B", current=100, total=100),
        protocol.ModelReady(time=t0 + 180.0),
        protocol.DataReady(time=t0 + 182.5),
        protocol.StageEvent(time=t0 + 185.0, stage="training"),
        protocol.Step(time=t0 + 190.0, step=first_step),
        protocol.Step(time=t0 + 191.0, step=first_step + 1),
    ]


def test_each_phase_is_the_time_between_its_events_and_a_download_is_its_own() -> None:
    clock = LaunchClock()
    lines = [line for ev in _session(1000.0) if (line := clock.feed(ev))]
    assert lines == [
        "first step logged 190 s after the engine started: start and imports 40.0 s · download 120.0 s · "
        "model 20.0 s · data 2.5 s · trainer 2.5 s · first step 5.0 s"
    ]


def test_once_per_session_and_a_resume_gets_its_own() -> None:
    clock = LaunchClock()
    events = [*_session(0.0, first_step=5), *_session(500.0, mode="resume", first_step=9)]
    lines = [line for ev in events if (line := clock.feed(ev))]
    assert len(lines) == 2 and "to step 5 " in lines[0] and "to step 9 " in lines[1]


def test_an_engine_without_its_start_time_starts_the_clock_at_hello() -> None:
    clock = LaunchClock()
    hello = protocol.Hello(time=100.0, mode="train")  # an older engine: no `started`
    for ev in (hello, protocol.ModelReady(time=110.0)):
        clock.feed(ev)
    line = clock.feed(protocol.Step(time=115.0, step=1))
    assert line == "first step logged 15 s after the engine started: model 10.0 s · first step 5.0 s"


def test_the_dashboard_log_shows_it_with_the_first_step() -> None:
    history = RunHistory()
    history.apply_all(_session(0.0))
    texts = [line.text for line in history.log]
    assert sum("after the engine started" in t for t in texts) == 1
