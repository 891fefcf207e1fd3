"""Pareto-front utilities for **maximized** objectives (pure numpy).

All functions take ``points`` as an array of shape ``(n, k)``: one row per trial, one column per
objective, every objective maximized. (For our sweeps the objectives are ``clean_acc``,
``robust_acc`` and ``channel_sparsity``, all in ``[0, 1]``.) Negate a minimized objective
before calling. NaN is rejected with ``ValueError``, because a NaN row is neither dominated
nor dominating and would silently corrupt a front. Map NaN to ``-inf`` yourself if a NaN
should count as "worst".

Dominance: ``a`` dominates ``b`` iff ``a >= b`` in every objective and ``a > b`` in at least one.
Identical points therefore never dominate each other: duplicates of a non-dominated point are
all non-dominated.

Hypervolume: implementation choice
------------------------------------
Optuna 5.0 has **no public hypervolume API**. The maintained exact implementation is the
private ``optuna._hypervolume.compute_hypervolume(loss_vals, reference_point,
assume_pareto=False)``. It is what Optuna's own public ``plot_hypervolume_history`` and the TPE
and GP samplers call: a 2-D sweep, an O(n^2) 3-D algorithm, and WFG for k > 3. It assumes
**minimization** and raises unless every point weakly dominates the reference. So
:func:`hypervolume` (a) keeps only the points that strictly dominate the reference (the others
contribute zero volume), then (b) negates the points and the reference, and (c) calls Optuna.

Because the function is private, a small exact slicing implementation
(:func:`_hypervolume_exact`, HSO-style and fine for fronts of tens to a few hundred points) is
kept as a fallback. It is used **only** when the Optuna import fails, and a ``RuntimeWarning``
is emitted when it is. ``HYPERVOLUME_BACKEND`` records which one is active. The tests assert
that it is ``"optuna"`` and that both implementations agree, so an Optuna API change fails loudly
in CI instead of silently changing numbers. (A pymoo ``HV`` indicator would also work, but pymoo is
not a dependency of this project.)
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

__all__ = [
    "DEFAULT_REFERENCE",
    "SWEEP_REFERENCE",
    "HYPERVOLUME_BACKEND",
    "crowding_distance",
    "hypervolume",
    "non_dominated_mask",
    "non_dominated_sort",
]

#: Reference point for (clean_acc, robust_acc, channel_sparsity), all maximized, all in [0, 1].
DEFAULT_REFERENCE: tuple[float, float, float] = (0.0, 0.0, 0.0)

#: Reference point of a sweep's hypervolume (the parent run's ``hypervolume`` metric and
#: benchmarks/search_efficiency.py): a tenth of each objective's range below its worst value 0.
#: With DEFAULT_REFERENCE a dense model (channel_sparsity exactly 0, the common case for short
#: runs and for group_lasso = 0) adds no volume at all, so the hypervolume of a sweep without a
#: channel-sparse trial stays 0 however good its accuracies are.
SWEEP_REFERENCE: tuple[float, float, float] = (-0.1, -0.1, -0.1)

try:  # pragma: no branch - which branch runs depends on the installed optuna
    from optuna._hypervolume import compute_hypervolume as _optuna_compute_hypervolume

    HYPERVOLUME_BACKEND = "optuna"
except ImportError:  # pragma: no cover - exercised only if optuna moves/removes the helper
    _optuna_compute_hypervolume = None
    HYPERVOLUME_BACKEND = "exact"
    warnings.warn(
        "optuna._hypervolume.compute_hypervolume is unavailable; search.front.hypervolume falls "
        "back to its own exact slicing implementation (slower on large fronts).",
        RuntimeWarning,
        stacklevel=2,
    )


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
    marked ``True``. O(n^2 k) time, O(n k) memory.
    """
    pts = _as_points(points)
    n = pts.shape[0]
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        ge = np.all(pts >= pts[i], axis=1)
        gt = np.any(pts > pts[i], axis=1)
        if np.any(ge & gt):
            mask[i] = False
    return mask


def non_dominated_sort(points) -> list[np.ndarray]:
    """Non-dominated sorting (maximization): a list of fronts, each an array of row indices.

    ``fronts[0]`` is the Pareto front, ``fronts[1]`` is the front of what remains once the
    first is removed, and so on. Indices within a front are ascending. Every row appears in exactly one front.
    """
    pts = _as_points(points)
    remaining = np.arange(pts.shape[0])
    fronts: list[np.ndarray] = []
    while remaining.size:
        mask = non_dominated_mask(pts[remaining])
        fronts.append(remaining[mask])
        remaining = remaining[~mask]
    return fronts


def crowding_distance(points) -> np.ndarray:
    """NSGA-II crowding distance of each point within the given set (normally one front).

    For every objective the points are sorted. The two extreme points get ``inf``. An interior
    point adds ``(next - prev) / (max - min)`` for that objective, and an objective with zero
    spread adds nothing. Larger means more isolated, so it is preferred as a tie-break.

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
        span = col[-1] - col[0]
        if not np.isfinite(span) or span <= 0:
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
    ``0.0``. Any ``k >= 1`` works: the Optuna backend does 2-D and 3-D exactly and fast, and uses
    WFG above that. See the module docstring for why Optuna's private helper is used.
    """
    pts, ref = _contributing(points, reference)
    if pts.shape[0] == 0:
        return 0.0
    if _optuna_compute_hypervolume is None:  # pragma: no cover - see module docstring
        return _hypervolume_exact(pts, ref)
    # Optuna minimizes: negate both, so p > ref becomes -p < -ref (strict domination holds).
    return float(_optuna_compute_hypervolume(-pts, -ref, assume_pareto=False))


def _contributing(points, reference: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The points that strictly dominate the reference (the only ones adding volume) and the
    checked reference; an empty input gives an empty (0, k) array."""
    pts = _as_points(points)
    if pts.size == 0:
        return pts.reshape(0, len(reference)), np.asarray(reference, dtype=float)
    ref = _check_reference(reference, pts.shape[1])
    return pts[np.all(pts > ref, axis=1)], ref


def _hypervolume_exact(points, reference: Sequence[float]) -> float:
    """Exact hypervolume by recursive slicing along the last objective (maximization).

    This is the reference and fallback implementation, roughly O(n^(k-1) log n). Points
    that do not strictly dominate ``reference`` are ignored.
    """
    pts, ref = _contributing(points, reference)
    if pts.shape[0] == 0:
        return 0.0
    pts = pts[non_dominated_mask(pts)]
    return _slice_hv(pts, ref)


def _slice_hv(pts: np.ndarray, ref: np.ndarray) -> float:
    k = pts.shape[1]
    if k == 1:
        return float(pts[:, 0].max() - ref[0])
    # Sweep the last coordinate from high to low. Between consecutive distinct levels
    # z_i > z_{i+1} the cross-section is the (k-1)-D hypervolume of the points with z >= z_i.
    levels = np.unique(pts[:, -1])[::-1]
    bounds = np.append(levels[1:], ref[-1])
    total = 0.0
    for z, z_next in zip(levels, bounds):
        active = pts[pts[:, -1] >= z, :-1]
        if k - 1 > 1:
            active = active[non_dominated_mask(active)]
        total += _slice_hv(active, ref[:-1]) * (z - z_next)
    return float(total)
