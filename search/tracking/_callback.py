"""How a trial's results reach MLflow while the sweep runs: the Tune callback, and the parent
run's live front metrics (computed here and only here; the replay uses them too)."""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from mlflow.entities import Metric
from ray.tune import Callback

from search.front import Floors, IncrementalFront
from search.results import trial_outcome
from trainables.contract import COMPLETED, OBJECTIVES

from ._writer import SweepLogger, SweepRun, result_metrics, result_step, sweep_logger


def live_front(floors: Floors | None, rows: list[Mapping[str, float]]) -> IncrementalFront:
    """The front of these completed trials, measured against the floors.

    Args:
        floors: the sweep's objectives and bounds (None: the default objectives, every finite
            point counts).
        rows: completed trials' metrics (`front_row`), in completion order.
    """
    floors = floors or Floors(0.0)
    front = IncrementalFront(floors.fixed_reference)
    for r in rows:
        add_point(front, floors, r)
    return front


def front_row(floors: Floors | None, result: Mapping[str, Any]) -> dict[str, float]:
    """What the live front keeps of a completed trial's last result: the metrics its objectives
    and bounds read."""
    floors = floors or Floors(0.0)
    return {m: float(result[m]) if result.get(m) is not None else float("nan") for m in floors.bounds}


def add_point(front: IncrementalFront, floors: Floors | None, row: Mapping[str, float]) -> None:
    """One more completed trial; outside the bounds it is counted but stays off the front."""
    if isinstance(row, (list, tuple)):  # a point saved by an earlier version: default objectives
        row = dict(zip(OBJECTIVES, row))
    floors = floors or Floors(0.0)
    front.add(floors.gains(floors.point(row))[0], feasible=floors.feasible(row))


def front_metrics(front: IncrementalFront, step: int, ts: int | None = None) -> list[Metric]:
    """The parent's live curves after a completion, at step = epochs consumed so far: the
    hypervolume and size of the feasible front, and how many trials completed.

    Args:
        front: the completed trials' front.
        step: epochs consumed so far (the curves' x axis).
        ts: the metrics' timestamp in ms (default: now).
    """
    if not front.count:
        return []
    ts = int(time.time() * 1000) if ts is None else ts
    return [Metric("hypervolume", front.hypervolume, ts, step),
            Metric("n_pareto", float(len(front)), ts, step),
            Metric("n_completed", float(front.count), ts, step)]


class MLflowSweepCallback(Callback):
    """Queues a trial's run, results and end for `SweepLogger`, and the parent's live front
    metrics as trials complete. Its state (trial->run map, completed points) is saved with Tune's
    experiment checkpoints, so `Tuner.restore` continues the same runs."""

    def __init__(self, run: SweepRun, floors: Floors | None = None) -> None:
        self.run = run
        self.floors = floors  # the reference point, and who is feasible
        self.points: dict[str, list[float]] = {}  # completed trials' objective vectors
        self.epochs_consumed = 0
        self.hv_step = 0

    @property
    def logger(self) -> SweepLogger:
        return sweep_logger(self.run)

    def get_state(self) -> dict[str, Any]:
        return {"runs": dict(self.logger.runs), "points": dict(self.points),
                "epochs_consumed": self.epochs_consumed, "hv_step": self.hv_step}

    def set_state(self, state: dict[str, Any]) -> None:
        for tid, rid in dict(state.get("runs", {})).items():
            self.logger.runs.setdefault(tid, rid)
        self.points = dict(state.get("points", {}))
        self.epochs_consumed = int(state.get("epochs_consumed", 0))
        self.hv_step = int(state.get("hv_step", 0))
        self.__dict__.pop("_front", None)  # rebuilt from the restored points

    def __getstate__(self) -> dict[str, Any]:  # pickled with the Tuner: the front is derived
        d = self.__dict__.copy()
        d.pop("_front", None)
        return d

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.logger.trial_started(trial.trial_id, str(trial), trial.config)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        step = result_step(result)
        self.epochs_consumed += 1
        self.logger.trial_result(trial.trial_id, step, result_metrics(result, step))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial)

    def _finish(self, trial: Any) -> None:
        status, reason = trial_outcome(trial)
        self.logger.trial_finished(trial, status, reason)
        if status == COMPLETED:
            point = front_row(self.floors, trial.last_result)
            self.points[trial.trial_id] = point
            if "_front" not in self.__dict__:  # first use, or after a restore: all completed points
                self._front = live_front(self.floors, list(self.points.values()))
            else:
                add_point(self._front, self.floors, point)
            metrics = front_metrics(self._front, self.epochs_consumed)
            if metrics:
                self.hv_step += 1
                self.logger.parent_metrics(metrics)
