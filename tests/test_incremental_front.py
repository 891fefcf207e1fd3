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


def test_incremental_front_with_a_minimized_uncapped_objective_matches_the_table_summary():
    """clean_acc (max) and size_kib (min, no cap): the live front's hypervolume after every trial
    equals the one recomputed from scratch with the reference inferred from all feasible points so
    far, which is what the parent run's final `hypervolume` uses (Floors.reference)."""
    from search.front import Floors

    floors = Floors.for_sweep("digits", objectives=("clean_acc", "size_kib"))
    rng = np.random.default_rng(1)
    raw = np.column_stack([rng.uniform(0.05, 1.0, 200), rng.uniform(2.0, 120.0, 200)])
    inc = IncrementalFront(floors.fixed_reference)
    kept = []
    for i, p in enumerate(raw):
        ok = floors.feasible({"clean_acc": p[0], "robust_acc": 0.3, "size_kib": p[1]})
        inc.add(floors.gains(p)[0], feasible=ok)
        if ok:
            kept.append(p)
        g = floors.gains(np.array(kept)) if kept else np.empty((0, 2))
        want = hypervolume(g, floors.reference(g)) if kept else 0.0
        assert math.isclose(inc.hypervolume, want, rel_tol=1e-12), i
    # the worst size measured still adds volume (the reference lies 10 % beyond it)
    assert floors.reference(floors.gains(np.array(kept)))[1] == -1.1 * max(k[1] for k in kept)
