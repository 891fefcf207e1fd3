"""Cost of one MO-ASHA rung decision, as the Tune driver pays it (MOASHAScheduler.on_trial_result).

    python benchmarks/moasha_decision.py                 # 1,000 recorded trials, both tie-breaks
    python benchmarks/moasha_decision.py --recorded 300 1000 3000

A rung is filled with `--recorded` objective vectors shaped like a sweep's (clean and robust
accuracy correlated, channel sparsity 0 for a third of the trials), then a new trial arrives and
the scheduler decides. Each timing is one `on_trial_result` call on a copy of the filled
scheduler (the rung grows by one per decision otherwise); the median over `--repeats` is
reported. The old pure-Python ranking (a dominance loop per point) is timed beside it once, at
the first size, for the ratio. Last stdout line: JSON, `decision_ms` = the median at 1,000
recorded trials, the slower of the two tie-breaks (target <= 20 ms).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np
from ray.tune.experiment import Trial

from search.front import Floors
from search.optimizer import MOASHAScheduler

OBJ = ["clean_acc", "robust_acc", "channel_sparsity"]


def rung_points(n: int, rng: np.random.Generator) -> np.ndarray:
    clean = rng.uniform(0.1, 0.95, n)
    robust = clean * rng.uniform(0.2, 0.8, n)
    sparse = np.where(rng.random(n) < 1 / 3, 0.0, rng.beta(1.5, 4, n))
    return np.round(np.column_stack([clean, robust, sparse]), 3)  # test-set accuracies are discrete


def filled(points: np.ndarray, tie_break: str) -> MOASHAScheduler:
    s = MOASHAScheduler(OBJ, "max", time_attr="epoch", grace_period=1, reduction_factor=3, max_t=9,
                        tie_break=tie_break, violation=Floors.for_sweep("digits").violation)  # as the CLI
    s._rungs[0][1].update({f"t{i}": tuple(map(float, p)) for i, p in enumerate(points)})
    s._violations(list(s._rungs[0][1].values()))  # cached by the decisions that recorded them
    return s


def time_decisions(points: np.ndarray, tie_break: str, repeats: int, rng: np.random.Generator) -> list[float]:
    base = filled(points, tie_break)
    times = []
    for _ in range(repeats):
        s = copy.deepcopy(base)
        new = rung_points(1, rng)[0]
        trial = Trial("__fake", stub=True)
        result = {"epoch": 1, **dict(zip(OBJ, map(float, new)))}
        t0 = time.perf_counter()
        s.on_trial_result(None, trial, result)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def old_python_position(points: np.ndarray) -> int:
    """The ranking as it was: non-dominated fronts peeled with a Python loop per point."""
    remaining = np.arange(len(points))
    rank = np.empty(len(points), dtype=int)
    r = 0
    while remaining.size:
        pts = points[remaining]
        mask = np.ones(len(pts), dtype=bool)
        for i in range(len(pts)):
            if np.any(np.all(pts >= pts[i], axis=1) & np.any(pts > pts[i], axis=1)):
                mask[i] = False
        rank[remaining[mask]] = r
        remaining = remaining[~mask]
        r += 1
    return int(np.count_nonzero(rank < rank[-1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recorded", type=int, nargs="+", default=[1000])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    out: dict = {"repeats": args.repeats, "ms": {}}
    for n in args.recorded:
        pts = rung_points(n, rng)
        for tb in ("crowding", "epsnet"):
            ts = time_decisions(pts, tb, args.repeats, rng)
            med = statistics.median(ts)
            out["ms"][f"{tb}@{n}"] = round(med, 3)
            print(f"{n:6d} recorded, tie-break {tb:8s}: median {med:7.3f} ms  (min {min(ts):.3f}, max {max(ts):.3f})")
    n0 = args.recorded[0]
    pts = np.vstack([rung_points(n0, rng), rung_points(1, rng)])
    t0 = time.perf_counter()
    old_python_position(pts)
    old = (time.perf_counter() - t0) * 1e3
    print(f"{n0:6d} recorded, old Python dominance loop (fronts only): {old:.1f} ms")
    out["old_python_ms"] = round(old, 1)
    at_1000 = [out["ms"][k] for k in ("crowding@1000", "epsnet@1000") if k in out["ms"]]
    out["decision_ms"] = max(at_1000) if at_1000 else None  # the slower tie-break
    out["target_ms"] = 20.0
    out["target_met"] = out["decision_ms"] is not None and out["decision_ms"] <= 20.0
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
