"""Replay into MLflow what a sweep's stored results hold and MLflow lacks: after a tracking
outage that outlasted the sweep (`python -m search.pareto --name N --resume-logging`), and at the
end of every `--resume` (a driver that crashed may have had logging queued).

The source is Tune's experiment directory: every trial's config, every result it reported
(`result.json`, and the reports its newest checkpoint holds), its status and final checkpoint.
`SweepLogger`'s operations are idempotent, so a replay sends only what is missing: runs are found
by tag, epochs already logged are skipped, models are found by their run. The parent's live
hypervolume curve is rebuilt for the completions MLflow has not seen, in the order they happened.
"""
from __future__ import annotations

import math
from typing import Any

from mlflow.entities import Metric

from search.front import Floors
from search.results import trial_outcome
from trainables.contract import COMPLETED
from trainables.tune import stored_reports

from ._callback import add_point, front_metrics, front_row, live_front
from ._writer import SweepLogger, result_metrics, result_step


def _records(frame: Any) -> list[dict[str, Any]]:
    """result.json rows as dicts without the NaN padding pandas adds for keys a row lacks."""
    if frame is None or not len(frame):
        return []
    out = []
    for row in frame.to_dict(orient="records"):
        out.append(_finite(row))
    return out


def _stored_rows(trial: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A trial's results, epoch by epoch, from every place the storage keeps them: Tune's
    result.json (`rows`), the snapshot's last result, and the reports in its newest checkpoint.

    Tune stages result.json and uploads it with its snapshots, so a driver killed just after a
    trial's last result leaves the storage without it (the snapshot has it); and a trial continued
    after a driver crash starts a fresh result.json, so its epochs before the crash are only in its
    checkpoints (`trainables.tune.stored_reports`, read only when epochs are missing)."""
    by_step: dict[int, dict[str, Any]] = {}  # the first result of an epoch: what the live logger kept
    last = _finite(trial.last_result or {})
    for r in [*rows, *([last] if result_step(last) else [])]:
        by_step.setdefault(result_step(r), r)
    if any(s not in by_step for s in range(1, max(by_step, default=0) + 1)):
        for r in stored_reports(trial.storage.storage_filesystem, trial.storage.trial_fs_path):
            by_step.setdefault(result_step(r), _finite(r))
    return [by_step[s] for s in sorted(by_step)]


def _finite(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not (isinstance(v, float) and math.isnan(v))}


def replay(logger: SweepLogger, analysis: Any, floors: Floors | None) -> int:
    """Queue every trial's run, results and end (from Tune's ExperimentAnalysis), and the missing
    live front points; returns the number of trials with results.

    Args:
        logger: the sweep's logger.
        analysis: Tune's ExperimentAnalysis of the experiment directory.
        floors: the sweep's floors.
    """
    completions = []  # (time, trial id, the metrics the front reads)
    stamps = []  # every result's time: epochs consumed up to a completion
    n = 0
    frames = analysis.trial_dataframes
    for t in analysis.trials:
        rows = _stored_rows(t, _records(frames.get(t.trial_id)))
        if not rows:
            continue
        n += 1
        logger.trial_started(t.trial_id, str(t), t.config or {}, running=False)
        for r in rows:
            step = result_step(r)
            logger.trial_result(t.trial_id, step, result_metrics(r, step))
            stamps.append(float(r.get("timestamp", 0)))
        if t.status in ("TERMINATED", "ERROR"):
            status, reason = trial_outcome(t)
            logger.trial_finished(t, status, reason)
            if status == COMPLETED:
                last = t.last_result or rows[-1]
                completions.append((float(rows[-1].get("timestamp", 0)), t.trial_id, front_row(floors, last)))
    logger.call(_replay_front, logger, sorted(completions), sorted(stamps), floors, label="replay hypervolume")
    return n


def _replay_front(logger: SweepLogger, completions: list[tuple[float, str, dict[str, float]]],
                  stamps: list[float], floors: Floors | None) -> None:
    """Log the live front's points for completions beyond the last `n_completed` MLflow has
    (the live callback logs hypervolume, n_pareto and n_completed together)."""
    client = logger.client
    seen = client.get_metric_history(logger.run.parent_run_id, "n_completed")
    have = int(max((m.value for m in seen), default=0))
    last_step = max((m.step for m in seen), default=0)
    front = live_front(floors, [])
    batch: list[Metric] = []
    for i, (when, _tid, vec) in enumerate(completions, 1):
        add_point(front, floors, vec)
        if i <= have:
            continue
        consumed = sum(1 for s in stamps if s <= when)
        last_step = max(last_step + 1, consumed)
        batch += front_metrics(front, last_step, ts=int(when * 1000))
    for i in range(0, len(batch), 900):
        client.log_batch(logger.run.parent_run_id, metrics=batch[i:i + 900])
