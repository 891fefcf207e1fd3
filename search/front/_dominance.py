"""Pareto-front utilities for **maximized** objectives: non-dominated sorting and hypervolume
from moocore (C implementations), the crowding distance, and the useful floor of a sweep.

All functions take ``points`` as an array of shape ``(n, k)``: one row per trial, one column per
objective, every objective maximized. (By default the objectives are ``clean_acc``,
``robust_acc`` and ``channel_sparsity``, all in ``[0, 1]``; a sweep that minimizes ``size_kib``
or ``latency_ms`` passes them negated, as ``Floors.gains`` does.) NaN is rejected with ``ValueError``,
because a NaN row is neither dominated nor dominating and would silently corrupt a front.

Dominance: ``a`` dominates ``b`` iff ``a >= b`` in every objective and ``a > b`` in at least one.
Identical points therefore never dominate each other: duplicates of a non-dominated point are
all non-dominated.

Why moocore: Optuna 5 exports no public hypervolume or non-dominated sorting
(``optuna._hypervolume`` and ``optuna.study._multi_objective`` are private). moocore
(``moocore.hypervolume``, ``is_nondominated``, ``pareto_rank``) is maintained, exact, and takes
about a millisecond at 1,000 points. The sweep's front is also cross-checked against Optuna's
public ``Study.best_trials`` in the tests.

The useful floor
----------------
A sweep's hypervolume reference point is its *floor* (``Floors.reference``): chance-level
clean accuracy (1 / number of classes) or the user's ``--min-clean-acc``, robust accuracy 0 or
``--min-robust-acc``, channel sparsity 0, and a minimized objective's cap (or, uncapped, a
reference inferred from the points). A trial is feasible iff its clean accuracy is strictly
above the clean floor (a model at chance is useless), its robust accuracy at least the robust
floor and every capped objective at most its cap (:func:`feasible_mask`). Infeasible trials never enter the front or the hypervolume. A
point adds volume only if it strictly beats the floor in every objective, so a dense model
(channel sparsity 0) is on the front if non-dominated but adds no volume: the hypervolume
measures the trade-off the sweep is for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import moocore
import numpy as np

from ._floors import Floors

#: Reference point for (clean_acc, robust_acc, channel_sparsity), all maximized, all in [0, 1].
DEFAULT_REFERENCE: tuple[float, float, float] = (0.0, 0.0, 0.0)


def feasible_mask(rows: Sequence[Mapping[str, Any]], floors: Floors) -> np.ndarray:
    """Rows (a trial's metrics, name -> value) within the bounds (Floors.feasible, the contract's rule).

    Args:
        rows: one mapping per trial, holding at least the bounded metrics.
        floors: the sweep's objectives and bounds.
    """
    return np.array([floors.feasible(r) for r in rows], dtype=bool)


def _as_points(points, name: str = "points") -> np.ndarray:
    arr = np.asarray(points, dtype=float)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 0)
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (n, k); got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN; map NaN to -inf (worst) or drop the rows first")
    return arr


def non_dominated_mask(points) -> np.ndarray:
    """Boolean mask of the points that no other point dominates (maximization).

    Identical points do not dominate each other, so every copy of a non-dominated point is
    marked ``True`` (moocore's ``keep_weakly``).
    """
    pts = _as_points(points)
    if pts.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    return np.asarray(moocore.is_nondominated(finite_order(pts), maximise=True, keep_weakly=True), dtype=bool)


def finite_order(pts: np.ndarray) -> np.ndarray:
    """Replace -inf / +inf by values 1 below / above each column's finite range (0 for a column
    with no finite value): every comparison is kept, and moocore (which ranks [-inf, -inf, 0]
    and [-inf, 0, -inf] as if one dominated the other) only sees finite numbers.

    For orderings only: the stand-ins' distances to finite values are made up, so a distance
    (the crowding distance) is computed on the original values (:func:`crowding_distance`)."""
    if np.isfinite(pts).all():
        return pts
    out = pts.copy()
    for j in range(out.shape[1]):
        col = out[:, j]
        finite = col[np.isfinite(col)]
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
        col[col == -np.inf] = lo - 1.0
        col[col == np.inf] = hi + 1.0
    return out


def non_dominated_sort(points) -> list[np.ndarray]:
    """Non-dominated sorting (maximization): a list of fronts, each an array of row indices.

    ``fronts[0]`` is the Pareto front, ``fronts[1]`` is the front of what remains once the
    first is removed, and so on. Indices within a front are ascending. Every row appears in exactly one front.
    """
    pts = _as_points(points)
    if pts.shape[0] == 0:
        return []
    ranks = np.asarray(moocore.pareto_rank(finite_order(pts), maximise=True))
    return [np.flatnonzero(ranks == r) for r in range(int(ranks.max()) + 1)]


# hand-written: neither moocore nor Optuna (only the private nsgaii._crowding_distance) exports it;
# O(k n log n), 0.1 ms on a 1,000-point front (benchmarks/moasha_decision.py)
def crowding_distance(points) -> np.ndarray:
    """NSGA-II crowding distance of each point within the given set (normally one front).

    For every objective the points are sorted. The two extreme points get ``inf``. An interior
    point adds ``(next - prev) / (max - min)`` for that objective, and an objective with zero
    spread adds nothing. Larger means more isolated, so it is preferred as a tie-break.

    Infinite values (NaN is refused) take part as values: a row at ``-inf`` or ``+inf`` in an
    objective is an extreme of it, and that objective's spread is infinite, so it adds nothing
    to any interior row. This is how MO-ASHA's crowding tie-break treats non-finite objectives
    (``search.optimizer``).

    Duplicate rows get the **same** distance: the distance is computed over the unique rows and
    copied back. (The textbook version gives copies of one point different distances depending
    on sort order.) With at most two distinct points, every distance is ``inf``.
    """
    pts = _as_points(points)
    n = pts.shape[0]
    if n == 0:
        return np.zeros(0)
    uniq, inverse = np.unique(pts, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    m, k = uniq.shape
    dist = np.zeros(m)
    if m <= 2:
        dist[:] = np.inf
        return dist[inverse]
    for j in range(k):
        order = np.argsort(uniq[:, j], kind="stable")
        col = uniq[order, j]
        dist[order[0]] = np.inf
        dist[order[-1]] = np.inf
        if not (np.isfinite(col[0]) and np.isfinite(col[-1])):
            continue  # an infinite spread: the objective adds nothing
        span = col[-1] - col[0]
        if span <= 0:
            continue
        dist[order[1:-1]] += (col[2:] - col[:-2]) / span
    return dist[inverse]


def _check_reference(reference: Sequence[float], k: int) -> np.ndarray:
    ref = np.asarray(reference, dtype=float).reshape(-1)
    if ref.shape[0] != k:
        raise ValueError(f"reference has {ref.shape[0]} coordinates, points have {k} objectives")
    if np.isnan(ref).any():
        raise ValueError("reference contains NaN")
    return ref


def hypervolume(points, reference: Sequence[float] = DEFAULT_REFERENCE) -> float:
    """Hypervolume dominated by ``points`` and bounded below by ``reference`` (maximization).

    A point contributes only if it **strictly** dominates the reference in every objective. The
    other points add zero volume and are dropped, so no error is raised for them. Dominated
    points do not change the result. An empty set, or a set with no contributing point, gives
    ``0.0``. Exact, by ``moocore.hypervolume``.

    Args:
        points: (n, k) rows, every objective maximised; NaN raises ValueError.
        reference: the lower corner (the sweep's floors).
    """
    pts, ref = _contributing(points, reference)
    if pts.shape[0] == 0:
        return 0.0
    return float(moocore.hypervolume(pts, ref=ref, maximise=True))


def _contributing(points, reference: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The points that strictly dominate the reference (the only ones adding volume) and the
    checked reference; an empty input gives an empty (0, k) array."""
    pts = _as_points(points)
    if pts.size == 0:
        return pts.reshape(0, len(reference)), np.asarray(reference, dtype=float)
    ref = _check_reference(reference, pts.shape[1])
    return pts[np.all(pts > ref, axis=1)], ref
