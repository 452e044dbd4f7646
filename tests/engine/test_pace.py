"""The ETA the engine sends with each step: steady through the run's recurring pauses."""

from __future__ import annotations

import itertools

import pytest

from engine.train import callback


def test_the_eta_holds_through_evaluations_and_saves(monkeypatch: pytest.MonkeyPatch) -> None:
    """0.28 s a step, logged every 2 steps, and a 5 s evaluation every 40 steps: an average of
    the intervals swung the ETA by 3x around each evaluation; the mean since the first log
    counts the evaluations as the rest of the run will pay them."""
    clock = [100.0]
    monkeypatch.setattr(callback.time, "perf_counter", lambda: clock[0])
    pace = callback.Pace()
    pace.start(0)
    clock[0] += 3.0  # the first interval: warm-up, not counted
    pace.update(2, 0)
    etas = []
    for step in range(4, 400, 2):
        clock[0] += 2 * 0.28 + (5.0 if step % 40 == 0 else 0.0)
        pace.update(step, 0)
        if step >= 100:
            etas.append(pace.eta(4000 - step))
    # Against the time those steps truly take: 0.28 s each plus 5 s per 40 steps (0.405 s a step);
    # early on the mean lags an evaluation (within 10% from step 100: two evaluations seen).
    truth = [(4000 - s) * (0.28 + 5.0 / 40) for s in range(100, 400, 2)]
    errors = [e / t - 1 for e, t in zip(etas, truth, strict=True)]
    assert max(map(abs, errors)) < 0.10, (min(errors), max(errors))
    # And from one log to the next it moves by little (the interval average jumped by 94%).
    assert max(abs(b / a - 1) for a, b in itertools.pairwise(etas)) < 0.15


def test_a_live_sample_is_not_training_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(callback.time, "perf_counter", lambda: clock[0])
    pace = callback.Pace()
    pace.start(0)
    clock[0] += 1.0
    pace.update(2, 0)
    clock[0] += 1.0
    pace.update(4, 0)
    clock[0] += 30.0
    pace.exclude(30.0)  # a sample from the live model
    clock[0] += 1.0
    pace.update(6, 0)
    assert pace.eta(10) == pytest.approx(5.0)
