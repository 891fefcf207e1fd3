"""The one MLflow writer: a sweep's parent run, one child run per trial, and everything logged on them.

Ray's stock MLflowLoggerCallback makes no parent run, keeps its trial->run map in memory (a
restored sweep logs every resumed trial twice) and calls MLflow synchronously in Tune's driver
loop. Here the driver loop only queues work: `SweepLogger` runs it on one background thread
(search.tracking's queue), retried through outages, and every operation is idempotent (runs and
models are looked up by tag before they are created, metrics carry the trial's own timestamps,
an epoch already in MLflow is not sent again), so an outage, a lost reply or a `--resume` logs
everything exactly once. Workers never talk to MLflow; `search.evaluate` writes through
`log_strong_results` here, finding the same child runs the same way.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from trainables.contract import COMPLETED, EPOCH, FAILED, RUNNING

from ._models import config_params, log_trial_model
from ._queue import BackgroundQueue, configure_http_retries, server_probe

SKIPPED_RESULT_KEYS = ("training_iteration", "timestamp", "pid", "time_this_iter_s", "time_total_s",
                       "time_since_restore", "iterations_since_restore")
TRIAL_TAG = "ray_trial_id"  # a child run's trial
STATUS_TAG = "brsearch.status"  # a child run's trial status (trainables.contract statuses)
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag


@dataclass(frozen=True)
class TrialEnd:
    """What a finished trial leaves to log: its status and, for a completed trial, its model."""

    trial_id: str
    name: str
    config: dict[str, Any]
    status: str
    reason: str
    checkpoint: Any  # Tune's final checkpoint of a completed trial, else None
    step: int  # the last epoch

    @classmethod
    def of(cls, trial: Any, status: str, reason: str) -> TrialEnd:
        last = trial.last_result or {}
        return cls(trial.trial_id, str(trial), dict(trial.config or {}), status, reason,
                   trial.checkpoint if status == COMPLETED else None, result_step(last))


@dataclass(frozen=True)
class SweepRun:
    """Where a sweep logs: the tracking store, its experiment, the sweep's parent run."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep: str


def get_or_create_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The experiment's id, created on first use.

    Args:
        client: an MLflow client.
        name: the experiment (--experiment).
        tracking_uri: the store; a sqlite store keeps its artifacts beside the database.
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):  # keep artifacts beside the database, absolute
        artifact_location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def flat_params(config: dict[str, Any]) -> list[Param]:
    return [Param(k, v) for k, v in config_params(config).items()]


def tags(values: dict[str, str]) -> list[RunTag]:
    return [RunTag(k, v) for k, v in values.items()]


def start_parent_run(client: MlflowClient, experiment_id: str, sweep: str, params: dict[str, Any],
                     run_tags: dict[str, str]) -> str:
    """Create a sweep's parent run; returns its id.

    Args:
        client: an MLflow client.
        experiment_id: the sweep's experiment.
        sweep: the sweep's name (run name and `sweep` tag).
        params: the plan's record, logged as params (credentials dropped or redacted).
        run_tags: more tags (versions, floors).
    """
    run = client.create_run(experiment_id, run_name=sweep, tags={"sweep": sweep, "brsearch.kind": "sweep", **run_tags})
    client.log_batch(run.info.run_id, params=flat_params(params))
    return run.info.run_id


def child_runs(client: MlflowClient, run: SweepRun, trial_id: str | None = None) -> dict[str, Any]:
    """The sweep's child runs by trial id (one trial's, if given): the one lookup every writer uses.

    Args:
        client: an MLflow client of the sweep's store.
        run: the sweep's parent run.
        trial_id: one trial's run only.
    """
    where = f"tags.{PARENT_TAG} = '{run.parent_run_id}'"
    if trial_id is not None:
        where = f"tags.{TRIAL_TAG} = '{trial_id}' and {where}"
    found = client.search_runs([run.experiment_id], filter_string=where, max_results=1 if trial_id else 50000)
    return {r.data.tags.get(TRIAL_TAG): r for r in found}


def result_metrics(result: dict[str, Any], step: int) -> list[Metric]:
    """A result's finite numbers as metrics at `step`, stamped with the time the trial reported
    it (not the time they are sent), so a resend after a lost reply or a replay is the same row.

    Args:
        result: a Tune result dict.
        step: its epoch.
    """
    stamp = result.get("timestamp")
    ts = int(float(stamp) * 1000) if isinstance(stamp, (int, float)) and math.isfinite(stamp) else int(time.time() * 1000)
    out = []
    for k, v in result.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or k in SKIPPED_RESULT_KEYS:
            continue
        if math.isfinite(float(v)):
            out.append(Metric(k, float(v), ts, step))
    return out


def result_step(result: dict[str, Any]) -> int:
    """The MLflow step of a trial's result: its epoch."""
    return int(result.get(EPOCH, result.get("training_iteration", 0)))


class SweepLogger:
    """The sweep's MLflow writes. Methods without a leading underscore are called from Tune's
    driver loop and only queue work; the `_` methods run on the background thread."""

    def __init__(self, run: SweepRun, log_models: bool = True) -> None:
        if run.tracking_uri.startswith(("http://", "https://")):
            configure_http_retries()
        import mlflow

        mlflow.set_tracking_uri(run.tracking_uri)  # mlflow.pytorch.log_model resolves it globally
        self.run = run
        self.log_models = log_models
        self.client = MlflowClient(run.tracking_uri)
        self.runs: dict[str, str] = {}  # ray trial id -> mlflow run id
        self.logged_steps: dict[str, set[int]] = {}  # the epochs in MLflow, per trial
        self.models: dict[str, str] = {}  # ray trial id -> logged model id
        self.queue = BackgroundQueue(probe=server_probe(run.tracking_uri))

    # --- queued from the driver loop --------------------------------------------------------
    def trial_started(self, trial_id: str, name: str, config: dict[str, Any], running: bool = True) -> None:
        self.queue.submit(self._ensure_run, trial_id, name, dict(config), running, label=f"start {trial_id}")

    def trial_result(self, trial_id: str, step: int, metrics: list[Metric]) -> None:
        self.queue.submit(self._log_result, trial_id, step, metrics, label=f"result {trial_id}/{step}")

    def trial_finished(self, trial: Any, status: str, reason: str) -> None:
        """A Tune trial that ended (completed, stopped or failed): its status, and its model."""
        self.queue.submit(self._finish_trial, TrialEnd.of(trial, status, reason), label=f"finish {trial.trial_id}")

    def parent_metrics(self, metrics: list[Metric]) -> None:
        self.queue.submit(self._log_parent, metrics, label="parent metrics")

    def call(self, fn: Any, *args: Any, label: str = "") -> None:
        self.queue.submit(fn, *args, label=label)

    # --- on the background thread -----------------------------------------------------------
    def _run_id(self, trial_id: str, name: str = "", config: dict[str, Any] | None = None) -> str:
        rid = self.runs.get(trial_id)
        if rid is None:
            found = child_runs(self.client, self.run, trial_id)
            if found:
                rid = found[trial_id].info.run_id
            else:
                created = self.client.create_run(
                    self.run.experiment_id, run_name=name or trial_id,
                    tags={PARENT_TAG: self.run.parent_run_id, TRIAL_TAG: trial_id,
                          "sweep": self.run.sweep, STATUS_TAG: RUNNING},
                )
                rid = created.info.run_id
                if config:
                    self.client.log_batch(rid, params=flat_params(config))
            self.runs[trial_id] = rid
        return rid

    def _ensure_run(self, trial_id: str, name: str, config: dict[str, Any], running: bool) -> None:
        rid = self._run_id(trial_id, name, config)
        if running:
            self.client.update_run(rid, status="RUNNING")

    def _logged_steps(self, trial_id: str, run_id: str) -> set[int]:
        """The epochs in MLflow for the trial: asked once per trial and driver (a restored
        snapshot may be older than what was logged before a crash), then kept here. A set, not
        the last epoch: a driver killed while the server was away loses the epochs it had
        buffered, the resumed trial logs its next epoch live, and the end's replay must still
        send the earlier ones."""
        if trial_id not in self.logged_steps:
            self.logged_steps[trial_id] = {m.step for m in self.client.get_metric_history(run_id, EPOCH)}
        return self.logged_steps[trial_id]

    def _log_result(self, trial_id: str, step: int, metrics: list[Metric]) -> None:
        rid = self._run_id(trial_id)
        logged = self._logged_steps(trial_id, rid)
        if step in logged:
            return  # logged before a crash (--resume reran it), replayed, or a diverged trial's last report
        self.client.log_batch(rid, metrics=metrics)
        logged.add(step)

    def _finish_trial(self, end: TrialEnd) -> None:
        rid = self._run_id(end.trial_id, end.name, end.config)
        self.client.log_batch(rid, tags=tags({STATUS_TAG: end.status, **({"brsearch.reason": end.reason} if end.reason else {})}))
        if end.checkpoint is not None and self.log_models and end.trial_id not in self.models:
            mid = log_trial_model(self.client, self.run, rid, end)
            if mid:
                self.models[end.trial_id] = mid
        if self.client.get_run(rid).info.status in ("RUNNING", "SCHEDULED"):
            self.client.set_terminated(rid, "FAILED" if end.status == FAILED else "FINISHED")

    def _log_parent(self, metrics: list[Metric]) -> None:
        self.client.log_batch(self.run.parent_run_id, metrics=metrics)

    # --- the end ----------------------------------------------------------------------------
    def close(self, patience_s: float) -> int:
        """Wait for the queue (while it makes progress, or `patience_s` without), stop the thread,
        return the number of operations not sent."""
        left = self.queue.close(patience_s)
        with _LOCK:
            _LOGGERS.pop((self.run.tracking_uri, self.run.parent_run_id), None)
        return left


_LOGGERS: dict[tuple[str, str], SweepLogger] = {}
_LOCK = threading.Lock()


def sweep_logger(run: SweepRun) -> SweepLogger:
    """The process's one logger for a sweep: the Tune callback (restored from the experiment
    state on --resume, so not the object the driver built) and the driver's end share it."""
    with _LOCK:
        key = (run.tracking_uri, run.parent_run_id)
        if key not in _LOGGERS:
            _LOGGERS[key] = SweepLogger(run)
        return _LOGGERS[key]


def log_strong_results(run: SweepRun, per_trial: dict[str, dict[str, Any]], per_trial_tags: dict[str, dict[str, str]],
                       summary: dict[str, float], files: list[Path]) -> tuple[int, list[str]]:
    """`search.evaluate`'s results: metrics and tags on each trial's child run, a summary and the
    updated tables on the parent. A metric whose latest value on the run is already this one is
    not logged again; a changed value (other suite settings) is logged at the next step. Returns
    (child runs that got new metrics, trial ids without a child run).

    Args:
        run: the sweep's parent run.
        per_trial: trial id -> metric name -> value (None: not measured).
        per_trial_tags: trial id -> tag -> value.
        summary: the parent's summary metrics.
        files: the updated tables, logged under `results/`.
    """
    client = MlflowClient(run.tracking_uri)
    by_trial = child_runs(client, run)
    ts = int(time.time() * 1000)
    logged, missing = 0, []
    for tid, values in per_trial.items():
        child = by_trial.get(tid)
        if child is None:
            missing.append(tid)
            continue
        new = _changed(client, child, values, ts)
        if new:
            client.log_batch(child.info.run_id, metrics=new)
            logged += 1
        client.log_batch(child.info.run_id, tags=tags(per_trial_tags.get(tid, {})))
    parent = client.get_run(run.parent_run_id)
    new = [Metric(k, v, ts, 0) for k, v in summary.items()
           if not (k in parent.data.metrics and math.isclose(parent.data.metrics[k], v))]
    if new:
        client.log_batch(run.parent_run_id, metrics=new)
    for f in files:
        client.log_artifact(run.parent_run_id, str(f), "results")
    return logged, missing


def _changed(client: MlflowClient, child: Any, values: dict[str, Any], ts: int) -> list[Metric]:
    out = []
    for k, v in values.items():
        if v is None:
            continue
        if k in child.data.metrics:  # logged before: again only if other settings changed it
            if math.isclose(child.data.metrics[k], float(v)):
                continue
            step = len(client.get_metric_history(child.info.run_id, k))
        else:
            step = 0
        out.append(Metric(k, float(v), ts, step))
    return out
