"""MO-ASHA's rung rule: which trials continue at a rung, as a small strategy object the
scheduler holds (search.optimizer.MOASHAScheduler).

Rungs and decisions
-------------------
* Milestones are ``grace_period * reduction_factor**j`` for ``j = 0, 1, ...`` while the value stays
  ``< max_t``. There is one bracket, and no rung at ``max_t``, so a trial that reaches ``max_t`` is
  never stopped by the rung logic. It ends on its own when the trainable returns.
* ``result[time_attr]`` must count **completed** budget units and grow monotonically, like
  ``training_iteration``: after the first epoch it is 1.
* When a result first reaches a milestone (``result[time_attr] >= milestone``; the highest such
  milestone, once per trial and rung), the trial's objective vector is recorded at that rung and
  ranked against every vector recorded there, its own included (see :func:`decide`).
* **The keep rule** (the paper's and Syne Tune's): the vectors at the rung are put in a total
  order by non-dominated sorting (front index, lower is better) and a tie-break inside each
  front. With ``position`` the 0-based place of the new vector in that order and ``n`` the number
  of vectors (its own included), the trial continues iff the normalised rank
  ``position / n <= 1 / reduction_factor``. So the first trial at a rung always continues, and of
  three with η = 3 the top two do.
* **Tie-break** inside a front (``tie_break``):

  - ``"crowding"`` (default): the NSGA-II crowding distance, larger first. Exact ties share a
    place (the new vector is placed before vectors it ties with, optimistically). It keeps the
    extremes of a front (infinite distance).
  - ``"epsnet"``: Syne Tune's ε-net order: the front's best point in the first objective first,
    then repeatedly the point farthest (Euclidean) from those already picked (Clarkson 2005). A
    copy of a point already picked is at distance 0 and comes last; the new vector takes the
    place of its first identical copy (optimistic, as above).

  Which works better here is measured in docs/benchmarks.md.
* Unlike Syne Tune 0.16's ``Bracket.on_result`` (which passes ``NonDominatedPriority``'s output,
  an argsort of the trials, to ``np.searchsorted`` as if it held per-trial priorities, so a new
  trial dominating every recorded one can be stopped), the position here is the new vector's
  own place in the order. ``tests/test_moasha.py`` checks the decisions against a brute-force
  statement of the rule on random data.
* Objectives with mode ``"min"`` are negated internally.
* **Non-finite objectives.** A NaN objective (a diverged trial, a metric that failed) counts as
  ``-inf``, the worst value of that objective. After that the rule works on the extended reals:
  ``-inf`` < every finite value < ``+inf``, and equal infinities are equal.

  - Ranking: non-dominated sorting with those comparisons (the C ranking is given values that
    keep every comparison, :func:`search.front.finite_order`; no comparison changes).
  - Crowding distance: computed on the extended-real values themselves, never on stand-ins.
    Per objective the first and last of the front's sorted distinct rows get ``inf`` (a row at
    ``-inf`` or ``+inf`` is such an extreme), and an objective whose spread on the front is
    infinite (any ``+-inf`` in it) or zero adds nothing to the interior rows. So a non-finite
    value decides who is an extreme, and the distances between finite rows come only from the
    objectives that are finite on the whole front.
  - ε-net: Euclidean distances need numbers, so each ``-inf`` / ``+inf`` stands for 1 below /
    above the finite range of its objective over the ranked vectors (``finite_order``; -1 / +1
    for an objective with no finite value there).

  ``tests/test_moasha.py`` checks the decisions against a brute-force statement of this rule on
  random rungs that mix NaN and ``+-inf`` with finite values.
* Cost: one decision is one call of moocore's non-dominated ranking (C) over the rung plus a
  tie-break on the new vector's front only, about a millisecond at 1,000 recorded vectors
  (``benchmarks/moasha_decision.py``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import moocore
import numpy as np

from search.front import crowding_distance, finite_order

from ._policy import DEFAULT_TIE_BREAK, TIE_BREAKS


def _extended(points: np.ndarray) -> np.ndarray:
    """A copy with NaN mapped to -inf (the worst value); +-inf stay as they are."""
    pts = np.array(points, dtype=float, copy=True)
    pts[np.isnan(pts)] = -np.inf
    return pts


# hand-written: Syne Tune is not a dependency (and its MOASHA has the searchsorted bug); stops at
# the keep limit, under 1 ms at 1,000 recorded trials (benchmarks/moasha_decision.py)
def _epsnet_position(front: np.ndarray, me: int, limit: int) -> int:
    """Place of row `me` (or of its first identical copy) in the greedy ε-net order of `front`
    (maximised): the best row in objective 0 first, then the row farthest from those picked.
    Stops once `limit` rows were picked without reaching it (returns `limit`: only whether the
    position is within the keep limit matters)."""
    same = np.all(front == front[me], axis=1)
    first = int(np.argmax(front[:, 0]))
    if same[first]:
        return 0
    dist = np.linalg.norm(front - front[first], axis=1)
    dist[first] = -1.0
    for place in range(1, min(limit, front.shape[0])):
        nxt = int(np.argmax(dist))
        if same[nxt]:
            return place
        np.minimum(dist, np.linalg.norm(front - front[nxt], axis=1), out=dist, where=dist >= 0)
        dist[nxt] = -1.0
    return limit


def keeps(position: int, n: int, reduction_factor: float) -> bool:
    """The keep rule: normalised rank position / n <= 1 / reduction_factor.

    Args:
        position: 0-based place in the rung's order.
        n: vectors at the rung, the new one included.
        reduction_factor: η.
    """
    return position * reduction_factor <= n * (1 + 1e-12)


def rung_position(points, index: int = -1, tie_break: str = "crowding", limit: int | None = None,
                  violations=None) -> int:
    """0-based place of row `index` in the MO-ASHA total order of `points` (maximised): non-dominated
    front first, then the tie-break inside the front; exact ties resolved in the row's favour.
    With `limit`, the ε-net walk may stop early and return `limit` for any place >= limit.
    With `violations` (one per row, > 0 = infeasible): feasible rows first, in that order, then the
    infeasible ones by increasing violation (Deb's constrained domination).

    Args:
        points: (n, k) objective vectors, maximised.
        index: the row to place.
        tie_break: `crowding` or `epsnet`.
        limit: stop the ε-net walk at this place.
        violations: per row, > 0 = below a floor.
    """
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break {tie_break!r}; accepted: {', '.join(TIE_BREAKS)}")
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2 or pts.shape[0] == 0:
        raise ValueError(f"points must have shape (n, k), n >= 1; got {pts.shape}")
    n = pts.shape[0]
    index = index % n
    if violations is not None:
        viol = np.asarray(violations, dtype=float).reshape(-1)
        if viol.shape[0] != n:
            raise ValueError(f"{viol.shape[0]} violations for {n} points")
        viol = np.where(np.isnan(viol), np.inf, viol)
        feasible = viol <= 0
        if not feasible[index]:  # behind every feasible row; ties with equal violation in its favour
            return int(np.count_nonzero(feasible)) + int(np.count_nonzero(viol[~feasible] < viol[index]))
        if not feasible.all():
            sub = np.flatnonzero(feasible)
            return rung_position(pts[sub], int(np.searchsorted(sub, index)), tie_break, limit)
    pts = _extended(pts)
    ordered = finite_order(pts)  # the same comparisons as pts, finite values only
    ranks = moocore.pareto_rank(ordered, maximise=True)
    mine = ranks[index]
    ahead = int(np.count_nonzero(ranks < mine))
    in_front = np.flatnonzero(ranks == mine)
    me = int(np.searchsorted(in_front, index))  # in_front is ascending and holds index
    if tie_break == "crowding":
        crowd = crowding_distance(pts[in_front])  # the extended-real values, no stand-ins
        return ahead + int(np.count_nonzero(crowd > crowd[me]))
    lim = in_front.shape[0] if limit is None else max(0, limit - ahead)
    return ahead + _epsnet_position(ordered[in_front], me, lim)


def _decide_detail(rung_vectors, new_vector, reduction_factor: float,
                   tie_break: str = "crowding", violations=None) -> tuple[bool, int, int]:
    """(continue?, position, n) of a new vector arriving at a rung (maximised objectives);
    `violations`: one per recorded vector and the new one last (see rung_position)."""
    new = np.asarray(new_vector, dtype=float).reshape(1, -1)
    prev = np.asarray(rung_vectors, dtype=float)
    if prev.size == 0:
        prev = prev.reshape(0, new.shape[1])
    if prev.ndim != 2 or prev.shape[1] != new.shape[1]:
        raise ValueError(
            f"rung vectors of shape {prev.shape} do not match a new vector of length {new.shape[1]}"
        )
    pts = np.vstack([prev, new])
    n = pts.shape[0]
    limit = math.floor(n / reduction_factor * (1 + 1e-12)) + 1  # first position that stops
    position = rung_position(pts, -1, tie_break, limit=limit, violations=violations)
    return keeps(position, n, reduction_factor), position, n


def decide(
    rung_vectors: Sequence[Sequence[float]],
    new_vector: Sequence[float],
    reduction_factor: float,
    tie_break: str = "crowding",
    violations: Sequence[float] | None = None,
) -> bool:
    """MO-ASHA rung decision for maximized objectives. ``True`` means CONTINUE, ``False`` STOP.

    ``rung_vectors`` are the vectors already recorded at the rung (the new one excluded).
    With ``n = len(rung_vectors) + 1``, the trial continues iff its position in the order of
    :func:`rung_position` satisfies ``position / n <= 1 / reduction_factor``. ``violations``
    (recorded vectors' first, the new one's last; > 0 = below a floor) puts infeasible vectors
    behind every feasible one.

    Args:
        rung_vectors: vectors already at the rung.
        new_vector: the arriving trial's vector.
        reduction_factor: η.
        tie_break: `crowding` or `epsnet`.
        violations: recorded vectors' first, the new one's last.
    """
    return _decide_detail(rung_vectors, new_vector, reduction_factor, tie_break, violations)[0]


@dataclass(frozen=True)
class RungRule:
    """The keep rule at a rung, with its parameters: η and the tie-break inside a front."""

    reduction_factor: float
    tie_break: str = DEFAULT_TIE_BREAK

    def __post_init__(self) -> None:
        if self.tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break {self.tie_break!r}; accepted: {', '.join(TIE_BREAKS)}")
        if not self.reduction_factor > 1:
            raise ValueError("reduction_factor must be > 1")

    def decide(self, rung_vectors, new_vector, violations=None) -> tuple[bool, int, int]:
        """(continue?, position, n) of `new_vector` arriving at a rung holding `rung_vectors`
        (maximised objectives; `violations` as in :func:`decide`)."""
        return _decide_detail(rung_vectors, new_vector, self.reduction_factor, self.tie_break, violations)
