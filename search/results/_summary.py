"""The numbers a user compares sweeps by, for the parent run's metrics and tags.

Computed from the result tables (`trials_frame` / `front_frame`), so a replay
(`--resume-logging`) logs the same values as the live sweep. Objectives are the validation
values the search optimised; the test-split values of the same trials are labelled `test_...`.
"""
from __future__ import annotations

import math
from typing import Any

from search.front import Floors, hypervolume
from trainables.contract import CLEAN_ACC, COMPLETED, FAILED, OBJECTIVES, ROBUST_ACC, STOPPED, TRIAL_ID


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bits_label(b: Any) -> str:
    try:
        f = float(b)
        return f"{int(f)}bit" if f == int(f) else f"{f:g}bit"
    except (TypeError, ValueError):
        return f"{b}bit"


def sweep_summary(trials_df: Any, front_df: Any, reference: tuple[float, ...] | None, cpus_per_trial: float,
                  gpus_per_trial: float, floors: Any = None) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) for the parent run.

    metrics: front_size, hypervolume (of the final front against `reference`), n_completed,
    n_stopped, n_failed, cpu_hours and gpu_hours (trial time x resources per trial), and per bit
    width b among completed trials: best_clean_acc.<b>bit and best_robust_acc.<b>bit (validation,
    the objectives), with test_clean_acc.best_clean.<b>bit / test_robust_acc.best_robust.<b>bit,
    the test-split accuracy of that same trial where the trial reported it; and floor.<objective>
    for each floor. `floors`: a `search.front.Floors`, or {objective: value or None}.
    tags: `floor` (the floors in words, or "none"),
    `front_trials` (the front's trial ids).

    Args:
        trials_df: the trials table.
        front_df: the front table.
        reference: the hypervolume's reference point (gain space); with `floors` a Floors, the
            sweep's own (`Floors.reference` over its feasible trials) is used instead.
        cpus_per_trial: for cpu_hours.
        gpus_per_trial: for gpu_hours.
        floors: a `search.front.Floors`, or {objective: value or None}.
    """
    metrics: dict[str, float] = {}
    n = len(trials_df)
    status = trials_df["status"] if n else []
    for s in (COMPLETED, STOPPED, FAILED):
        metrics[f"n_{s}"] = float(sum(1 for v in status if v == s))
    metrics["front_size"] = float(len(front_df))
    if isinstance(floors, Floors):  # the sweep's objectives; an inferred reference from its feasible trials
        objectives = floors.objectives
        feasible = trials_df[trials_df["feasible"].astype(bool)] if n and "feasible" in trials_df else trials_df.iloc[0:0]
        reference = floors.reference(floors.gains(feasible[list(objectives)].to_numpy(dtype=float)) if len(feasible) else ())
        signs = floors.signs
    else:
        objectives, signs = OBJECTIVES, [1.0] * len(OBJECTIVES)
    pts = [[s_ * float(r[m]) for s_, m in zip(signs, objectives)] for _, r in front_df.iterrows()
           if all(_finite(r[m]) for m in objectives)] if len(front_df) else []
    metrics["hypervolume"] = float(hypervolume(pts, reference)) if pts else 0.0
    seconds = sum(float(v) for v in (trials_df["time_total_s"] if n and "time_total_s" in trials_df else []) if _finite(v))
    metrics["cpu_hours"] = seconds * cpus_per_trial / 3600.0
    metrics["gpu_hours"] = seconds * gpus_per_trial / 3600.0
    if n and "config.bits" in trials_df:
        done = trials_df[trials_df["status"] == COMPLETED]
        for bits, group in done.groupby("config.bits"):
            label = _bits_label(bits)
            for obj, short in ((CLEAN_ACC, "clean"), (ROBUST_ACC, "robust")):
                vals = group[group[obj].map(_finite)]
                if not len(vals):
                    continue
                best = vals.loc[vals[obj].idxmax()]
                metrics[f"best_{obj}.{label}"] = float(best[obj])
                test = best.get(f"test_{obj}")
                if _finite(test):
                    metrics[f"test_{obj}.best_{short}.{label}"] = float(test)
    if floors is None or isinstance(floors, dict):  # {objective: floor or None}
        floor_values = {k: float(v) for k, v in (floors or {}).items() if v is not None}
        described = ", ".join(f"{k}>={v:g}" for k, v in floor_values.items()) or "none"
    else:  # search.front.Floors
        floor_values = {k: float(v) for k, v in floors.bounds.items() if v is not None}
        described = floors.describe()
    for k, v in floor_values.items():
        metrics[f"floor.{k}"] = v
    tags = {"floor": described,
            "front_trials": ",".join(str(t) for t in (front_df[TRIAL_ID] if len(front_df) else []))[:5000]}
    return metrics, tags
