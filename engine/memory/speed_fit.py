"""Fit a stack's step costs (engine.memory.speed) to measured steps, and say how well they hold.

The model is linear in its six kinds of work with non-negative costs, and what matters is the
relative error (a 1B step of 0.3 s and an 8B step of 2 s count alike), so the fit minimises
sum(((predicted - measured) / measured)^2) under costs >= 0: a least-squares problem on rows
divided by their measured time. With six features the exact non-negative solution is the best of
the 63 subsets' unconstrained solutions whose costs are all non-negative; no numerical library is
needed. Columns are scaled to unit norm first, so matmul seconds and thousands of launches weigh
alike in the normal equations.

`leave_one_out` fits without each configuration in turn and predicts it: the error a run the
table never saw should expect. `choices` replays hardware.backend auto on paired configurations
with held-out predictions and auto's own rule (engine.stacks.fastest_within_error), and says how
much slower its pick was than the faster stack.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine import stacks
from engine.memory.speed import FEATURES, StepWork, predict_s


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
    x = [[r.work.vector()[i] / r.step_s for i in idx] for r in rows]  # each row / its time: target 1
    norms = [math.sqrt(sum(row[j] ** 2 for row in x)) or 1.0 for j in range(len(idx))]
    xs = [[row[j] / norms[j] for j in range(len(idx))] for row in x]
    best: tuple[float, dict[str, float]] | None = None
    for size in range(1, len(idx) + 1):
        for subset in itertools.combinations(range(len(idx)), size):
            a = [[sum(row[i] * row[j] for row in xs) for j in subset] for i in subset]
            b = [sum(row[i] for row in xs) for i in subset]
            sol = _solve(a, b)
            if sol is None or any(v < 0 for v in sol):
                continue
            coef = dict.fromkeys(range(len(idx)), 0.0)
            coef.update(zip(subset, sol, strict=True))
            residual = sum((sum(row[j] * coef[j] for j in coef) - 1.0) ** 2 for row in xs)
            if best is None or residual < best[0]:
                best = (residual, {features[j]: coef[j] / norms[j] for j in coef})
    assert best is not None  # a single column with positive entries always solves
    return {f: best[1].get(f, 0.0) for f in FEATURES}


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
        costs = fit_costs(train)
        out += [HeldOut(r, predict_s(costs, r.work)) for r in rows if getattr(r, group) == g]
    return out


@dataclass(frozen=True)
class Choice:
    """hardware.backend auto on one configuration measured on several stacks."""

    key: str
    measured_s: dict[str, float]
    predicted_s: dict[str, float]  # held out: fitted without this configuration (too few rows: absent)
    errors: dict[str, float] = field(default_factory=dict)  # each stack's typical held-out error

    @property
    def chosen(self) -> str | None:
        """The stack auto takes (engine.stacks.fastest_within_error); None unless every measured
        stack could be predicted."""
        if set(self.predicted_s) != set(self.measured_s):
            return None
        order = [s for s in stacks.AUTO_ORDER if s in self.predicted_s]
        order += sorted(set(self.predicted_s) - set(order))
        predicted = {s: stacks.Predicted(t, "", self.errors.get(s, 0.0)) for s, t in self.predicted_s.items()}
        return stacks.fastest_within_error(order, predicted)[0]

    @property
    def fastest(self) -> str:
        return min(self.measured_s, key=self.measured_s.__getitem__)

    @property
    def loss(self) -> float | None:
        """How much slower the chosen stack's step was than the faster one's (0 when it chose it)."""
        chosen = self.chosen
        return None if chosen is None else self.measured_s[chosen] / self.measured_s[self.fastest] - 1


def choices(rows: Sequence[Measured], errors: dict[str, float] | None = None) -> list[Choice]:
    """auto's pick on every configuration measured on more than one stack, each stack's costs
    fitted without that configuration (a stack with too few other rows to fit is not predicted),
    `errors` the stacks' typical held-out errors (none: the pick is the faster prediction)."""
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
            measured[s] = here[0].step_s
            train = [r for r in mine if r.key != k]
            if len(train) >= len(FEATURES):
                predicted[s] = predict_s(fit_costs(train), here[0].work)
        if len(measured) > 1:
            out.append(Choice(k, measured, predicted, dict(errors or {})))
    return out
