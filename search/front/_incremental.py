"""The front of completed trials, kept up to date one trial at a time.

The driver logs the hypervolume after every completed trial. Recomputing the non-dominated set
of all n completed trials each time is O(n^2) per trial (O(n^3) per sweep), which at 1,000
trials costs the driver more than everything else it does per result (benchmarks/driver_scale.py).
A new point changes the front only if no front point dominates it; then it replaces the front
points it dominates, and the hypervolume is recomputed over the front alone (dominated points
add no volume), a few dozen points.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ._dominance import hypervolume
from ._floors import infer_reference


class IncrementalFront:
    """Non-dominated set (all objectives maximised: gains, `Floors.gains`) and its hypervolume
    against `reference`. A None in `reference` is inferred from the feasible points seen
    (`infer_reference`); when a new worst point moves it, the hypervolume is recomputed."""

    def __init__(self, reference: Sequence[float | None]) -> None:
        self.fixed_reference = tuple(reference)
        self.front = np.empty((0, len(self.fixed_reference)))
        self.count = 0  # finite points seen
        self._hv = 0.0
        self._worst = np.full(len(self.fixed_reference), np.inf)  # per column, over feasible points

    @property
    def reference(self) -> tuple[float, ...]:
        seen = self._worst[None, :] if np.isfinite(self._worst).all() else np.empty((0, len(self._worst)))
        return infer_reference(self.fixed_reference, seen)

    def add(self, point: Sequence[float], feasible: bool = True) -> bool:
        """Adds a completed trial's objectives; True if the front changed. Non-finite points
        are ignored (a failed trial is no point of any front); an infeasible one (below a
        floor) is counted but stays off the front."""
        p = np.asarray(point, dtype=float)
        if p.shape != (len(self.fixed_reference),) or not all(math.isfinite(v) for v in p):
            return False
        self.count += 1
        if not feasible:
            return False
        moved = bool(np.any(p < self._worst) and any(r is None for r in self.fixed_reference))
        self._worst = np.minimum(self._worst, p)
        f = self.front
        if len(f) and np.any(np.all(f >= p, axis=1) & np.any(f > p, axis=1)):
            if moved:  # an inferred reference moved: the same front, a new volume
                self._hv = hypervolume(self.front, self.reference)
            return False  # dominated: the front unchanged
        keep = ~(np.all(p >= f, axis=1) & np.any(p > f, axis=1)) if len(f) else np.ones(0, bool)
        self.front = np.vstack([f[keep], p[None, :]])
        self._hv = hypervolume(self.front, self.reference)
        return True

    @property
    def hypervolume(self) -> float:
        return self._hv

    def __len__(self) -> int:
        return len(self.front)
