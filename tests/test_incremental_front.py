"""search.front.IncrementalFront: the front kept one completed trial at a time equals the front and
hypervolume recomputed from scratch after every trial (what the MLflow callback logged before)."""
from __future__ import annotations

import math

import numpy as np

from search.front import IncrementalFront, hypervolume, non_dominated_mask

REFERENCE = (1 / 10, 0.0, 0.0)  # the digits floor: chance clean accuracy, robust 0, sparsity 0


def test_incremental_front_matches_recomputation():
    rng = np.random.default_rng(0)
    pts = rng.random((300, 3))
    pts[::7] = pts[::7].round(1)  # ties and duplicates
    pts[5] = [math.nan, 0.5, 0.5]  # a failed trial: ignored
    inc = IncrementalFront(REFERENCE)
    seen = []
    for i, p in enumerate(pts):
        inc.add(p)
        if np.all(np.isfinite(p)):
            seen.append(p)
        if i % 10 == 0 or i == len(pts) - 1:
            arr = np.array(seen)
            front = arr[non_dominated_mask(arr)]
            assert len(inc) == len(front) and inc.count == len(seen)
            assert sorted(map(tuple, inc.front)) == sorted(map(tuple, front))
            assert math.isclose(inc.hypervolume, hypervolume(arr, REFERENCE), rel_tol=1e-12)
