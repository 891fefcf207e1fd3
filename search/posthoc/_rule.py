"""How `search.pick` chooses one trial from a front, and how sure it can be of the choice.

Only front trials are candidates, and a rule reads only what the trials report on the
validation split or measure on the model itself (the metrics of trainables.contract.DIRECTIONS);
a test-split column is never a rule's metric.

* `--where "robust_acc>=0.6,size_kib<=16"` keeps the front trials meeting every condition, then
  `--maximize M` / `--minimize M` takes the best on M (ties: the sweep's objectives in order,
  then the trial id).
* `--knee` takes the front's knee: after normalizing each objective over the candidates to
  [0, 1] with 1 its best value, the candidate farthest (signed, on the utopia side) from the
  hyperplane through the extreme points, one per objective: the point best on that objective
  (Das 1999, "On characterizing the 'knee' of the Pareto curve based on normal-boundary
  intersection"; the same construction as Deb and Gupta 2011, "Understanding knee points in
  bicriteria problems and their implications as preferred solution principles", Eq. 1, and
  Branke et al. 2004's distance-to-the-line for two objectives). Where the extremes do not span
  a hyperplane (fewer distinct extremes than objectives), the plane's normal is the equal-weight
  direction (1, ..., 1): the knee is then the candidate with the largest sum of normalized
  objectives.

Confidence: trials.parquet holds each trial's validation accuracies, not its per-image scores, so
the intervals are a parametric (binomial) bootstrap: B draws of Binomial(n, acc) / n, with n the
validation split's size. A trial's accuracy is an expected correctness over noise draws (a mean of
per-image scores in [0, 1]), whose variance is at most the binomial one at the same mean, so
these intervals are if anything wide. Two front trials cannot be told apart when, on every
validation accuracy among the objectives, the 95 % bootstrap interval of their difference (the two
resampled independently) contains 0. Both were scored on the same images, so a paired test would
be sharper; without per-image scores the independent one is the conservative choice.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from trainables.contract import CLEAN_ACC, DIRECTIONS, MAXIMIZE, ROBUST_ACC, TRIAL_ID

#: objectives that are accuracies on the validation split (the bootstrap's subjects)
ACCURACIES = (CLEAN_ACC, ROBUST_ACC)
BOOTSTRAP_DRAWS = 4000
OPERATORS = {">=": np.greater_equal, "<=": np.less_equal, ">": np.greater, "<": np.less}
_CONDITION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


class RuleError(ValueError):
    """A rule that names an unknown metric or is malformed, or that no front trial meets; one line."""


@dataclass(frozen=True)
class Condition:
    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


@dataclass(frozen=True)
class Rule:
    """`knee`, or `where` conditions plus one metric to optimise in its own direction."""

    knee: bool = False
    where: tuple[Condition, ...] = ()
    optimize: str | None = None  # a metric of DIRECTIONS; its direction is DIRECTIONS[optimize]
    metrics_needed: tuple[str, ...] = field(default=(), compare=False)

    def describe(self) -> str:
        what = "knee" if self.knee else f"{'maximize' if DIRECTIONS[self.optimize] == MAXIMIZE else 'minimize'} {self.optimize}"
        return what + (f" where {','.join(map(str, self.where))}" if self.where else "")


def _known(metric: str, flag: str) -> str:
    if metric.startswith("test_"):
        raise RuleError(f"{flag}: {metric!r} is a test-split value; a pick never reads the test split; accepted: "
                        f"{', '.join(DIRECTIONS)}")
    if metric not in DIRECTIONS:
        raise RuleError(f"{flag}: unknown metric {metric!r}; accepted: {', '.join(DIRECTIONS)}")
    return metric


def parse_rule(knee: bool, where: str | None, maximize: str | None, minimize: str | None) -> Rule:
    """The rule the flags give; RuleError (one line) otherwise."""
    if sum(x is not None and x is not False for x in (knee or None, maximize, minimize)) != 1:
        raise RuleError("give exactly one of --knee, --maximize METRIC, --minimize METRIC (with --where CONDITIONS "
                        "optionally)")
    conds = []
    for part in (p for p in (where or "").split(",") if p.strip()):
        m = _CONDITION.match(part)
        if not m:
            raise RuleError(f"--where: cannot read {part.strip()!r}; accepted: METRIC>=X, METRIC<=X, METRIC>X or "
                            f"METRIC<X, comma-separated (e.g. robust_acc>=0.6,size_kib<=16)")
        try:
            value = float(m.group(3))
        except ValueError:
            raise RuleError(f"--where: {m.group(3)!r} in {part.strip()!r} is not a number") from None
        conds.append(Condition(_known(m.group(1), "--where"), m.group(2), value))
    if where is not None and not conds:
        raise RuleError(f"--where {where!r}: no condition; accepted: e.g. robust_acc>=0.6,size_kib<=16")
    target = None
    for flag, name, direction in (("--maximize", maximize, MAXIMIZE), ("--minimize", minimize, None)):
        if name is None:
            continue
        target = _known(name, flag)
        own = DIRECTIONS[target]
        if (own == MAXIMIZE) != (direction == MAXIMIZE):
            raise RuleError(f"{flag} {name}: {name} is {'maximized' if own == MAXIMIZE else 'minimized'}; accepted: "
                            f"{'--maximize' if own == MAXIMIZE else '--minimize'} {name}")
    needed = tuple(dict.fromkeys([c.metric for c in conds] + ([target] if target else [])))
    return Rule(knee=bool(knee), where=tuple(conds), optimize=target, metrics_needed=needed)


# --- the choice --------------------------------------------------------------------------------
def oriented(values: np.ndarray, metrics: Sequence[str]) -> np.ndarray:
    """Columns flipped so that larger is better on every one (minimized metrics negated)."""
    sign = np.array([1.0 if DIRECTIONS.get(m, MAXIMIZE) == MAXIMIZE else -1.0 for m in metrics])
    return np.asarray(values, dtype=float) * sign


def knee_index(values: np.ndarray, metrics: Sequence[str]) -> int:
    """Row index of the knee of `values` (n candidates x m objectives, in `metrics`' directions):
    the module docstring's definition. Ties go to the lowest index."""
    pts = oriented(values, metrics)
    n, m = pts.shape
    if n == 1:
        return 0
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    f = (pts - lo) / span  # 1 = best on that objective among the candidates
    # one extreme per objective: best on it, ties broken by the sum of the others
    extremes = [int(np.lexsort((-f.sum(axis=1), -f[:, j]))[0]) for j in range(m)]
    e = f[extremes]
    normal = None
    if len(set(extremes)) == m:
        # the normal w of the hyperplane through the m extremes: w . (e_i - e_0) = 0 for all i
        d = e[1:] - e[0]
        _, s, vt = np.linalg.svd(d, full_matrices=True)
        if len(s) == m - 1 and s.min() > 1e-9 * max(1.0, s.max()):
            normal = vt[-1]
            if normal.sum() < 0:
                normal = -normal
            if not (normal >= -1e-12).all():  # a plane tilted away from the utopia point: no knee geometry
                normal = None
    if normal is None:
        normal = np.ones(m)
    normal = normal / np.linalg.norm(normal)
    dist = (f - e[0]) @ normal
    best = dist.max()
    return int(np.flatnonzero(np.isclose(dist, best, rtol=0, atol=1e-12))[0])


def choose(front: pd.DataFrame, rule: Rule, objectives: Sequence[str]) -> tuple[int, list[str]]:
    """(row position in `front` of the chosen trial, the front's trial ids that meet the rule's
    conditions). `front`: a DataFrame of front trials holding every metric the rule and the
    objectives name. RuleError when no front trial meets the conditions."""
    ok = np.ones(len(front), dtype=bool)
    for c in rule.where:
        col = front[c.metric].to_numpy(dtype=float)
        ok &= np.nan_to_num(OPERATORS[c.op](col, c.value), nan=0).astype(bool)
    idx = np.flatnonzero(ok)
    if not len(idx):
        best = ", ".join(f"{c.metric} on the front {front[c.metric].min():.4g} to {front[c.metric].max():.4g}"
                         for c in rule.where)
        raise RuleError(f"no front trial meets --where {','.join(map(str, rule.where))} ({best}); accepted: "
                        f"conditions at least one of the {len(front)} front trial(s) meets")
    sub = front.iloc[idx]
    if rule.knee:
        pos = knee_index(sub[list(objectives)].to_numpy(dtype=float), objectives)
    else:
        keys = [rule.optimize, *[o for o in objectives if o != rule.optimize]]
        vals = oriented(sub[keys].to_numpy(dtype=float), keys)
        ids = sub[TRIAL_ID].astype(str).to_numpy()
        # np.lexsort: the last key is the primary one; larger is better, so sort on the negation
        order = np.lexsort((ids, *[-vals[:, j] for j in reversed(range(len(keys)))]))
        pos = int(order[0])
    return int(idx[pos]), list(sub[TRIAL_ID].astype(str))


# --- confidence ----------------------------------------------------------------------------------
def binomial_draws(acc: float, n: int, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> np.ndarray:
    """B bootstrap accuracies of a rate `acc` on `n` images: Binomial(n, acc) / n."""
    rng = np.random.default_rng(seed)
    p = min(1.0, max(0.0, float(acc)))
    return rng.binomial(n, p, size=draws) / n


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    a = (1 - level) / 2
    return float(np.quantile(samples, a)), float(np.quantile(samples, 1 - a))


def accuracy_intervals(row: pd.Series, accuracies: Sequence[str], n: int, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95 % binomial-bootstrap interval of each validation accuracy of one trial."""
    return {m: interval(binomial_draws(float(row[m]), n, seed=seed + i)) for i, m in enumerate(accuracies)
            if m in row and row[m] is not None and math.isfinite(float(row[m]))}


def indistinguishable(front: pd.DataFrame, chosen: int, accuracies: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """Trial ids of the other front trials whose every validation accuracy differs from the chosen
    trial's by an amount whose 95 % bootstrap interval contains 0."""
    out = []
    a = front.iloc[chosen]
    for k in range(len(front)):
        if k == chosen:
            continue
        b = front.iloc[k]
        same = True
        for i, m in enumerate(accuracies):
            diff = binomial_draws(float(a[m]), n, seed=seed + 2 * i) - binomial_draws(float(b[m]), n, seed=seed + 2 * i + 1)
            lo, hi = interval(diff)
            if not lo <= 0.0 <= hi:
                same = False
                break
        if same:
            out.append(str(b[TRIAL_ID]))
    return out
