"""Fit a stack's step costs (engine.memory.speed) to measured steps, and say how well they hold.

The model is linear in its six kinds of work with non-negative costs, and what matters is the
relative error (a 1B step of 0.3 s and an 8B step of 2 s count alike), so the fit minimises
sum(((predicted - measured) / measured)^2) under costs >= 0: a least-squares problem on rows
divided by their measured time. With six features the exact non-negative solution is the best of
the 63 subsets' unconstrained solutions whose costs are all non-negative; no numerical library is
needed. Columns are scaled to unit norm first, so matmul seconds and thousands of launches weigh
alike in the normal equations.

`fit_step` adds the host floor (engine.memory.speed.HOST): for each candidate host cost on a grid,
the steps the host could not have bound (its floor under 97% of the measured time, or under the
device's predicted time) fit the device's costs, which re-sorts the steps, five times over; the
host cost whose whole model (the larger of the two) fits best wins. The device's launches cost is
left to the host floor: both scale with layer passes, and a sum cannot say which one a short step
waited on.

`leave_one_out` fits without each configuration in turn and predicts it: the error a run the
table never saw should expect. `choices` replays hardware.backend auto on paired configurations
with held-out predictions and auto's own rule (engine.stacks.fastest), and says how
much slower its pick was than the faster stack.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from engine import stacks
from engine.memory.speed import FEATURES, HOST, StepWork, device_s, predict_s

# The device's work without launches: the host floor takes the per-pass cost (fit_step).
DEVICE_FEATURES = tuple(f for f in FEATURES if f != "launches")
# Host costs tried, seconds per thousand layer passes (ms per pass): coarse, then around the best.
HOST_COARSE = tuple(0.25 * i for i in range(33))  # 0 to 8 ms a pass
HOST_FINE_STEP = 0.025
BOUND_MARGIN = 0.97  # a step whose host floor is under 97% of its time did not wait on the host


@dataclass(frozen=True)
class Measured:
    """One configuration's measured step on one stack."""

    key: str  # the configuration, the same for both stacks (pairs them)
    stack: str
    work: StepWork
    step_s: float
    arch: str = ""


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when singular."""
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        if abs(m[p][c]) < 1e-12:
            return None
        m[c], m[p] = m[p], m[c]
        for r in range(n):
            if r != c:
                f = m[r][c] / m[c][c]
                if f:
                    m[r] = [x - f * y for x, y in zip(m[r], m[c], strict=True)]
    return [m[i][n] / m[i][i] for i in range(n)]


def fit_costs(rows: Sequence[Measured], features: Sequence[str] = FEATURES) -> dict[str, float]:
    """Non-negative costs per feature minimising the squared relative error over `rows`."""
    if not rows:
        raise ValueError("no measured steps to fit")
    idx = [FEATURES.index(f) for f in features]
    vectors = [(r.work.vector(), r.step_s) for r in rows]
    x = [[v[i] / t for i in idx] for v, t in vectors]  # each row / its time: target 1
    norms = [math.sqrt(sum(row[j] ** 2 for row in x)) or 1.0 for j in range(len(idx))]
    xs = [[row[j] / norms[j] for j in range(len(idx))] for row in x]
    # The normal equations once: every subset's system is a slice of them, and its residual
    # sum((row . c - 1)^2) = c'Gc - 2c'g + n needs no second pass over the rows.
    n = len(idx)
    gram = [[sum(row[i] * row[j] for row in xs) for j in range(n)] for i in range(n)]
    rhs = [sum(row[i] for row in xs) for i in range(n)]
    best: tuple[float, dict[str, float]] | None = None
    for size in range(1, n + 1):
        for subset in itertools.combinations(range(n), size):
            sol = _solve([[gram[i][j] for j in subset] for i in subset], [rhs[i] for i in subset])
            if sol is None or any(v < 0 for v in sol):
                continue
            c = dict(zip(subset, sol, strict=True))
            quad = sum(c[i] * gram[i][j] * c[j] for i in c for j in c)
            residual = quad - 2 * sum(c[i] * rhs[i] for i in c) + len(xs)
            if best is None or residual < best[0] - 1e-12:
                best = (residual, {features[j]: c.get(j, 0.0) / norms[j] for j in range(n)})
    assert best is not None  # a single column with positive entries always solves
    return {f: best[1].get(f, 0.0) for f in FEATURES}


def _fit_device(rows: Sequence[Measured], host: float) -> dict[str, float] | None:
    """The device's costs under a host floor of `host`, fitted to the steps it did not bind."""

    def floor(r: Measured) -> float:
        return host * r.work.launches

    free = [r for r in rows if floor(r) < BOUND_MARGIN * r.step_s]
    if not free:
        return None
    costs = fit_costs(free, DEVICE_FEATURES)
    for _ in range(5):
        again = [r for r in rows if device_s(costs, r.work) >= floor(r) or floor(r) < BOUND_MARGIN * r.step_s]
        if again == free:  # both filter `rows` in its order: the same steps
            break  # settled
        free = again
        costs = fit_costs(free, DEVICE_FEATURES)
    return {**costs, HOST: host}


def _relative_loss(rows: Sequence[Measured], costs: dict[str, float]) -> float:
    return sum((predict_s(costs, r.work) / r.step_s - 1) ** 2 for r in rows)


def fit_step(rows: Sequence[Measured]) -> dict[str, float]:
    """The device's costs and the host floor (HOST) that together fit `rows` best."""
    if not rows:
        raise ValueError("no measured steps to fit")
    # The table's held-out errors and its replay of auto fit the same rows without each
    # configuration: one fit serves both.
    return dict(_fit_step(tuple(rows)))


@functools.lru_cache(maxsize=1024)
def _fit_step(rows: tuple[Measured, ...]) -> dict[str, float]:
    def best_of(grid: Sequence[float]) -> tuple[float, dict[str, float]] | None:
        found = None
        for host in grid:
            costs = _fit_device(rows, host)
            if costs is None:
                continue
            loss = _relative_loss(rows, costs)
            if found is None or loss < found[0]:
                found = (loss, costs)
        return found

    coarse = best_of(HOST_COARSE)
    assert coarse is not None  # a floor of 0 binds no step: that fit always exists
    h = coarse[1][HOST]
    step = HOST_COARSE[1] - HOST_COARSE[0]
    # Around the coarse best (which is among them, so a fit exists); a floor near 0 clips to 0 once.
    fine = sorted(
        {
            max(0.0, h + HOST_FINE_STEP * i)
            for i in range(-int(step / HOST_FINE_STEP), int(step / HOST_FINE_STEP) + 1)
        }
    )
    best = best_of(fine)
    assert best is not None
    return best[1]


@dataclass(frozen=True)
class HeldOut:
    row: Measured
    predicted_s: float

    @property
    def error(self) -> float:
        return self.predicted_s / self.row.step_s - 1


def leave_one_out(rows: Sequence[Measured], group: str = "key") -> list[HeldOut]:
    """Each row predicted by a fit on the rows of the other groups (`key`: configurations,
    `arch`: whole architectures). Groups that would leave nothing to fit are skipped."""
    out: list[HeldOut] = []
    for g in dict.fromkeys(getattr(r, group) for r in rows):
        train = [r for r in rows if getattr(r, group) != g]
        if len(train) < len(FEATURES):
            continue
        costs = fit_step(train)
        out += [HeldOut(r, predict_s(costs, r.work)) for r in rows if getattr(r, group) == g]
    return out


@dataclass(frozen=True)
class Choice:
    """hardware.backend auto on one configuration measured on several stacks."""

    key: str
    measured_s: dict[str, float]
    predicted_s: dict[str, float]  # held out: fitted without this configuration (too few rows: absent)

    @property
    def chosen(self) -> str | None:
        """The stack auto takes (engine.stacks.fastest); None unless every measured stack could be
        predicted."""
        if set(self.predicted_s) != set(self.measured_s):
            return None
        order = [s for s in stacks.AUTO_ORDER if s in self.predicted_s]
        order += sorted(set(self.predicted_s) - set(order))
        return stacks.fastest(order, {s: stacks.Predicted(t, "") for s, t in self.predicted_s.items()})[0]

    @property
    def fastest(self) -> str:
        return min(self.measured_s, key=self.measured_s.__getitem__)

    @property
    def ratio_miss(self) -> float | None:
        """How far the held-out predicted ratio of the stacks' steps missed the measured one, the
        worst pair's (0.05 for 5%); None unless every measured stack was predicted."""
        if set(self.predicted_s) != set(self.measured_s) or len(self.measured_s) < 2:
            return None
        names = sorted(self.measured_s)
        return max(
            abs((self.predicted_s[a] / self.predicted_s[b]) / (self.measured_s[a] / self.measured_s[b]) - 1)
            for a, b in itertools.combinations(names, 2)
        )

    @property
    def loss(self) -> float | None:
        """How much slower the chosen stack's step was than the faster one's (0 when it chose it)."""
        chosen = self.chosen
        return None if chosen is None else self.measured_s[chosen] / self.measured_s[self.fastest] - 1


def choices(rows: Sequence[Measured]) -> list[Choice]:
    """auto's pick on every configuration measured on more than one stack, each stack's costs
    fitted without that configuration (a stack with too few other rows to fit is not predicted)."""
    names = sorted({r.stack for r in rows})
    out = []
    for k in dict.fromkeys(r.key for r in rows):
        measured: dict[str, float] = {}
        predicted: dict[str, float] = {}
        for s in names:
            mine = [r for r in rows if r.stack == s]
            here = [r for r in mine if r.key == k]
            if not here:
                continue
            measured[s] = statistics.median(r.step_s for r in here)  # a configuration measured again
            train = [r for r in mine if r.key != k]
            if len(train) >= len(FEATURES):
                predicted[s] = predict_s(fit_step(train), here[0].work)
        if len(measured) > 1:
            out.append(Choice(k, measured, predicted))
    return out


# Fewer predicted pairs than this say too little of the ratio's error: auto's reasons quote the
# models' own.
MIN_RATIO_PAIRS = 5


def typical_ratio_error(picks: Sequence[Choice]) -> float:
    """The median ratio miss over the choices that were predicted; 0 (not measured) for fewer than
    MIN_RATIO_PAIRS of them."""
    misses = [m for m in (c.ratio_miss for c in picks) if m is not None]
    return statistics.median(misses) if len(misses) >= MIN_RATIO_PAIRS else 0.0
