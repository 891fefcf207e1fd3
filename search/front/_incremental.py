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


class IncrementalFront:
    """Non-dominated set (all objectives maximised) and its hypervolume against `reference`."""

    def __init__(self, reference: Sequence[float]) -> None:
        self.reference = tuple(reference)
        self.front = np.empty((0, len(self.reference)))
        self.count = 0  # finite points seen
        self._hv = 0.0

    def add(self, point: Sequence[float], feasible: bool = True) -> bool:
        """Adds a completed trial's objectives; True if the front changed. Non-finite points
        are ignored (a failed trial is no point of any front); an infeasible one (below a
        floor) is counted but stays off the front."""
        p = np.asarray(point, dtype=float)
        if p.shape != (len(self.reference),) or not all(math.isfinite(v) for v in p):
            return False
        self.count += 1
        if not feasible:
            return False
        f = self.front
        if len(f) and np.any(np.all(f >= p, axis=1) & np.any(f > p, axis=1)):
            return False  # dominated: front and hypervolume unchanged
        keep = ~(np.all(p >= f, axis=1) & np.any(p > f, axis=1)) if len(f) else np.ones(0, bool)
        self.front = np.vstack([f[keep], p[None, :]])
        self._hv = hypervolume(self.front, self.reference)
        return True

    @property
    def hypervolume(self) -> float:
        return self._hv

    def __len__(self) -> int:
        return len(self.front)
