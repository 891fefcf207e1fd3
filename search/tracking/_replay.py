"""Replay into MLflow what a sweep's stored results hold and MLflow lacks: after a tracking
outage that outlasted the sweep (`python -m search.pareto --name N --resume-logging`), and at the
end of every `--resume` (a driver that crashed may have had logging queued).

The source is Tune's experiment directory: every trial's config, every result it reported
(`result.json`), its status and final checkpoint. `SweepLogger`'s operations are idempotent, so a
replay sends only what is missing: runs are found by tag, epochs already logged are skipped,
models are found by their run. The parent's live hypervolume curve is rebuilt for the
completions MLflow has not seen, in the order they happened.
"""
from __future__ import annotations

import math
from typing import Any

from mlflow.entities import Metric

from .objectives import OBJECTIVES
from .outcomes import trial_outcome
from .tracking import SweepLogger, hypervolume_metrics, result_metrics


def _records(frame: Any) -> list[dict[str, Any]]:
    """result.json rows as dicts without the NaN padding pandas adds for keys a row lacks."""
    if frame is None or not len(frame):
        return []
    out = []
    for row in frame.to_dict(orient="records"):
        out.append({k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))})
    return out


def replay(logger: SweepLogger, trials: list[Any], frames: dict[str, Any], reference: tuple[float, ...],
           floors: Any = None) -> int:
    """Queue every trial's run, results and end, and the missing hypervolume points; returns the
    number of trials with results."""
    completions = []  # (time, trial id, objective vector)
    stamps = []  # every result's time: epochs consumed up to a completion
    n = 0
    for t in trials:
        rows = _records(frames.get(t.trial_id))
        if not rows:
            continue
        n += 1
        finished = t.status in ("TERMINATED", "ERROR")
        logger.trial_started(t.trial_id, str(t), t.config or {}, running=False)
        for r in rows:
            step = int(r.get("epoch", r.get("training_iteration", 0)))
            logger.trial_result(t.trial_id, step, result_metrics(r, step))
            stamps.append(float(r.get("timestamp", 0)))
        if finished:
            status, reason = trial_outcome(t)
            last = t.last_result or rows[-1]
            logger.trial_finished(t.trial_id, str(t), t.config or {}, status, reason,
                                  t.checkpoint if status == "completed" else None, int(last.get("epoch", 0)))
            if status == "completed":
                completions.append((float(rows[-1].get("timestamp", 0)), t.trial_id,
                                    [float(last[m]) for m in OBJECTIVES]))
    logger.call(_replay_hypervolume, logger, sorted(completions), sorted(stamps), reference, floors,
                label="replay hypervolume")
    return n


def _replay_hypervolume(logger: SweepLogger, completions: list[tuple[float, str, list[float]]],
                        stamps: list[float], reference: tuple[float, ...], floors: Any = None) -> None:
    """Log the hypervolume curve's points for completions beyond the last `n_completed` MLflow has
    (the live callback logs hypervolume, n_pareto and n_completed together)."""
    client = logger.client
    seen = client.get_metric_history(logger.parent_run_id, "n_completed")
    have = int(max((m.value for m in seen), default=0))
    last_step = max((m.step for m in seen), default=0)
    points: list[list[float]] = []
    batch: list[Metric] = []
    for when, _tid, vec in completions:
        points.append(vec)
        if len(points) <= have:
            continue
        consumed = sum(1 for s in stamps if s <= when)
        last_step = max(last_step + 1, consumed)
        batch += hypervolume_metrics(points, reference, last_step, ts=int(when * 1000), floors=floors)
    for i in range(0, len(batch), 900):
        client.log_batch(logger.parent_run_id, metrics=batch[i:i + 900])
