"""MLflow logging from the driver: one parent run per sweep, one nested child run per trial, and
each finished trial's model as an MLflow logged model.

Ray's stock MLflowLoggerCallback makes no parent run, keeps its trial->run map in memory (a
restored sweep logs every resumed trial twice) and calls MLflow synchronously in Tune's driver
loop. Here the Tune callback only queues work (`search.mlflow_async`): `SweepLogger` runs it on
one background thread, retried through outages, and every operation is idempotent (runs and
models are looked up by tag before they are created, metrics carry the trial's own timestamps,
a step already in MLflow is not sent again), so an outage, a lost reply or a `--resume` logs
everything exactly once. Workers never talk to MLflow.
"""
from __future__ import annotations

import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from .front import DEFAULT_REFERENCE, hypervolume, non_dominated_mask
from .incremental import IncrementalFront
from .logged_models import log_trial_model, register_front, tag_front
from .mlflow_async import BackgroundQueue, configure_http_retries
from .objectives import OBJECTIVES
from .outcomes import trial_outcome
from .plots import plot_front, plot_hypervolume
from .redact import SECRET_PATTERN, redact

SKIPPED_RESULT_KEYS = ("training_iteration", "timestamp", "pid", "time_this_iter_s", "time_total_s",
                       "time_since_restore", "iterations_since_restore")


def get_or_create_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):  # keep artifacts beside the database, absolute
        artifact_location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def _flat_params(config: dict[str, Any]) -> list[Param]:
    return [Param(k, redact(v)[:6000]) for k, v in sorted(config.items()) if not SECRET_PATTERN.search(k)]


def result_metrics(result: dict[str, Any], step: int) -> list[Metric]:
    """A result's finite numbers as metrics at `step`, stamped with the time the trial reported
    it (not the time they are sent), so a resend after a lost reply or a replay is the same row."""
    stamp = result.get("timestamp")
    ts = int(float(stamp) * 1000) if isinstance(stamp, (int, float)) and math.isfinite(stamp) else int(time.time() * 1000)
    out = []
    for k, v in result.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or k in SKIPPED_RESULT_KEYS:
            continue
        if math.isfinite(float(v)):
            out.append(Metric(k, float(v), ts, step))
    return out


class SweepLogger:
    """The sweep's MLflow writes. Methods without a leading underscore are called from Tune's
    driver loop and only queue work; the `_` methods run on the background thread."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str,
                 log_models: bool = True) -> None:
        if tracking_uri.startswith(("http://", "https://")):
            configure_http_retries()
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)  # mlflow.pytorch.log_model resolves it globally
        self.tracking_uri, self.experiment_id, self.parent_run_id, self.sweep = tracking_uri, experiment_id, parent_run_id, sweep
        self.log_models = log_models
        self.client = MlflowClient(tracking_uri)
        self.runs: dict[str, str] = {}  # ray trial id -> mlflow run id
        self.last_step: dict[str, int] = {}  # the last epoch in MLflow, per trial
        self.models: dict[str, str] = {}  # ray trial id -> logged model id
        self.queue = BackgroundQueue()

    # --- queued from the driver loop --------------------------------------------------------
    def trial_started(self, trial_id: str, name: str, config: dict[str, Any], running: bool = True) -> None:
        self.queue.submit(self._ensure_run, trial_id, name, dict(config), running, label=f"start {trial_id}")

    def trial_result(self, trial_id: str, step: int, metrics: list[Metric]) -> None:
        self.queue.submit(self._log_result, trial_id, step, metrics, label=f"result {trial_id}/{step}")

    def trial_finished(self, trial_id: str, name: str, config: dict[str, Any], status: str, reason: str,
                       checkpoint: Any, step: int) -> None:
        self.queue.submit(self._finish_trial, trial_id, name, dict(config), status, reason, checkpoint, step,
                          label=f"finish {trial_id}")

    def parent_metrics(self, metrics: list[Metric]) -> None:
        self.queue.submit(self._log_parent, metrics, label="parent metrics")

    def call(self, fn: Any, *args: Any, label: str = "") -> None:
        self.queue.submit(fn, *args, label=label)

    # --- on the background thread -----------------------------------------------------------
    def _run_id(self, trial_id: str, name: str = "", config: dict[str, Any] | None = None) -> str:
        rid = self.runs.get(trial_id)
        if rid is None:
            found = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.ray_trial_id = '{trial_id}' and tags.mlflow.parentRunId = '{self.parent_run_id}'",
                max_results=1,
            )
            if found:
                rid = found[0].info.run_id
            else:
                run = self.client.create_run(
                    self.experiment_id, run_name=name or trial_id,
                    tags={"mlflow.parentRunId": self.parent_run_id, "ray_trial_id": trial_id,
                          "sweep": self.sweep, "brsearch.status": "running"},
                )
                rid = run.info.run_id
                if config:
                    self.client.log_batch(rid, params=_flat_params(config))
            self.runs[trial_id] = rid
        return rid

    def _ensure_run(self, trial_id: str, name: str, config: dict[str, Any], running: bool) -> None:
        rid = self._run_id(trial_id, name, config)
        if running:
            self.client.update_run(rid, status="RUNNING")

    def _logged_step(self, trial_id: str, run_id: str) -> int:
        """The last epoch in MLflow for the trial: asked once per trial and driver (a restored
        snapshot may be older than what was logged before a crash), then kept here."""
        if trial_id not in self.last_step:
            self.last_step[trial_id] = max((m.step for m in self.client.get_metric_history(run_id, "epoch")), default=0)
        return self.last_step[trial_id]

    def _log_result(self, trial_id: str, step: int, metrics: list[Metric]) -> None:
        rid = self._run_id(trial_id)
        if step <= self._logged_step(trial_id, rid):
            return  # logged before a crash (--resume reran it), replayed, or a diverged trial's last report
        self.client.log_batch(rid, metrics=metrics)
        self.last_step[trial_id] = step

    def _finish_trial(self, trial_id: str, name: str, config: dict[str, Any], status: str, reason: str,
                      checkpoint: Any, step: int) -> None:
        rid = self._run_id(trial_id, name, config)
        tags = {"brsearch.status": status, **({"brsearch.reason": reason} if reason else {})}
        self.client.log_batch(rid, tags=[_tag(k, v) for k, v in tags.items()])
        if status == "completed" and self.log_models and checkpoint is not None and trial_id not in self.models:
            mid = log_trial_model(self.client, self.experiment_id, rid, trial_id, self.sweep, self.parent_run_id,
                                  config, checkpoint, step)
            if mid:
                self.models[trial_id] = mid
        if self.client.get_run(rid).info.status in ("RUNNING", "SCHEDULED"):
            self.client.set_terminated(rid, "FAILED" if status == "failed" else "FINISHED")

    def _log_parent(self, metrics: list[Metric]) -> None:
        self.client.log_batch(self.parent_run_id, metrics=metrics)

    # --- the end ----------------------------------------------------------------------------
    def close(self, patience_s: float) -> int:
        """Wait for the queue (while it makes progress, or `patience_s` without), stop the thread,
        return the number of operations not sent."""
        left = self.queue.close(patience_s)
        with _LOCK:
            _LOGGERS.pop((self.tracking_uri, self.parent_run_id), None)
        return left


def _tag(k: str, v: str) -> Any:
    from mlflow.entities import RunTag

    return RunTag(k, v)


_LOGGERS: dict[tuple[str, str], SweepLogger] = {}
_LOCK = threading.Lock()


def sweep_logger(tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str) -> SweepLogger:
    """The process's one logger for a sweep: the Tune callback (restored from the experiment
    state on --resume, so not the object the driver built) and the driver's end share it."""
    with _LOCK:
        key = (tracking_uri, parent_run_id)
        if key not in _LOGGERS:
            _LOGGERS[key] = SweepLogger(tracking_uri, experiment_id, parent_run_id, sweep)
        return _LOGGERS[key]


class MLflowSweepCallback(Callback):
    """Tune callback: queues a trial's run, results and end for `SweepLogger`, and the parent's
    hypervolume as trials complete. Its state (trial->run map, completed points) is saved with
    Tune's experiment checkpoints so `Tuner.restore` continues the same runs."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str,
                 reference: tuple[float, ...] = DEFAULT_REFERENCE, floors: Any = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep = sweep
        self.floors = floors  # search.objectives.Floors: the reference point, and who is feasible
        self.reference = floors.reference if floors is not None else reference
        self.points: dict[str, list[float]] = {}  # completed trials' objective vectors
        self.epochs_consumed = 0
        self.hv_step = 0

    @property
    def logger(self) -> SweepLogger:
        return sweep_logger(self.tracking_uri, self.experiment_id, self.parent_run_id, self.sweep)

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

    def __getstate__(self) -> dict[str, Any]:  # pickled with the Tuner: the front cache is derived
        d = self.__dict__.copy()
        d.pop("_front", None)
        return d

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.logger.trial_started(trial.trial_id, str(trial), trial.config)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        self.epochs_consumed += 1
        self.logger.trial_result(trial.trial_id, step, result_metrics(result, step))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial)

    def _finish(self, trial: Any) -> None:
        status, reason = trial_outcome(trial)
        last = trial.last_result or {}
        self.logger.trial_finished(trial.trial_id, str(trial), trial.config, status, reason,
                                   trial.checkpoint if status == "completed" else None, int(last.get("epoch", 0)))
        if status == "completed":
            self.points[trial.trial_id] = [float(last[m]) for m in OBJECTIVES]
            metrics = self._front_metrics(self.points[trial.trial_id])
            if metrics:
                self.hv_step += 1
                self.logger.parent_metrics(metrics)


    def _front_metrics(self, point: list[float]) -> list[Metric]:
        """`hypervolume_metrics` kept incrementally (search/incremental.py): a completed trial
        costs O(front), not an O(n^2) non-dominated sort of every completed trial."""
        floors = getattr(self, "floors", None)

        def feasible(p: list[float]) -> bool:
            return floors is None or bool(floors.feasible(p[0], p[1]))

        front = self.__dict__.get("_front")
        if front is None:  # first use, or after a restore: from all completed points
            front = self._front = IncrementalFront(self.reference)
            for p in self.points.values():
                front.add(p, feasible=feasible(p))
        else:
            front.add(point, feasible=feasible(point))
        if not front.count:
            return []
        ts = int(time.time() * 1000)
        return [Metric("hypervolume", front.hypervolume, ts, self.epochs_consumed),
                Metric("n_pareto", float(len(front)), ts, self.epochs_consumed),
                Metric("n_completed", float(front.count), ts, self.epochs_consumed)]


def hypervolume_metrics(points: list[list[float]], reference: tuple[float, ...], step: int,
                        ts: int | None = None, floors: Any = None) -> list[Metric]:
    """The parent's live front metrics after a completion, at step = epochs consumed so far:
    hypervolume and n_pareto over the feasible points (above the floors, if any), n_completed
    over all completed ones."""
    pts = [p for p in points if all(math.isfinite(v) for v in p)]
    if not pts:
        return []
    n_completed = len(pts)
    if floors is not None:  # below the floor: off the front and out of the hypervolume
        pts = [p for p in pts if floors.feasible(p[0], p[1])]
    ts = int(time.time() * 1000) if ts is None else ts
    return [Metric("hypervolume", hypervolume(pts, reference) if pts else 0.0, ts, step),
            Metric("n_pareto", float(non_dominated_mask(pts).sum()) if pts else 0.0, ts, step),
            Metric("n_completed", float(n_completed), ts, step)]


# --- the parent run ----------------------------------------------------------------------------

def start_parent_run(client: MlflowClient, experiment_id: str, sweep: str, params: dict[str, Any],
                     tags: dict[str, str]) -> str:
    run = client.create_run(experiment_id, run_name=sweep, tags={"sweep": sweep, "brsearch.kind": "sweep", **tags})
    client.log_batch(run.info.run_id, params=_flat_params(params))
    return run.info.run_id


def finish_parent_run(client: MlflowClient, parent_run_id: str, experiment_id: str,
                      trials_df: Any, front_df: Any, files: list[Path], status: str = "FINISHED",
                      summary: tuple[dict[str, float], dict[str, str]] | None = None,
                      register: str | None = None, reference: tuple[float, ...] = DEFAULT_REFERENCE) -> None:
    """Tags every child (and its logged model) pareto=true/false to match the front, ends orphaned
    children, logs the summary metrics and tags, the front as a table, PNG projections and an
    interactive 3-D HTML plot, `hypervolume.png` (the parent's hypervolume metric against epochs
    consumed), registers the front under `register` if given, and ends the parent. Idempotent:
    run again by a retry, a --resume or a --resume-logging, it leaves the same state."""
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  max_results=50000)
    on_front = set(front_df["trial_id"]) if len(front_df) else set()
    known = set(trials_df["trial_id"]) if len(trials_df) else set()
    run_ids = {}
    for run in children:
        tid = run.data.tags.get("ray_trial_id")
        run_ids[tid] = run.info.run_id
        flag = "true" if tid in on_front else "false"
        if run.data.tags.get("pareto") != flag:
            client.set_tag(run.info.run_id, "pareto", flag)
        if run.info.status == "RUNNING" and tid not in known:
            client.set_tag(run.info.run_id, "brsearch.status", "lost")
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    models = tag_front(client, experiment_id, parent_run_id, on_front)
    for f in files:
        client.log_artifact(parent_run_id, str(f), "results")
    if len(front_df):  # (log_table would append to the table a previous attempt logged)
        client.log_text(parent_run_id, front_df.to_json(orient="split", index=False, date_format="iso"),
                        "pareto_front.json")
    with tempfile.TemporaryDirectory() as d:
        for path in plot_front(trials_df, front_df, Path(d)):
            client.log_artifact(parent_run_id, str(path), "plots")
        history = client.get_metric_history(parent_run_id, "hypervolume")
        if history:
            client.log_artifact(parent_run_id, str(plot_hypervolume(history, Path(d), reference)), "plots")
    # the final front's size and hypervolume as the latest points of the live curves; the rest at
    # step = trials finished. A value already there (a retry, a resume with nothing new) is not sent.
    ts = int(time.time() * 1000)
    last = max((m.step for m in history), default=0)
    values = {"n_pareto": (float(len(front_df)), last)}
    tags = {}
    if summary is not None:
        finished = int(sum(summary[0].get(f"n_{s}", 0) for s in ("completed", "stopped", "failed")))
        values.update({k: (v, last if k == "hypervolume" else finished) for k, v in summary[0].items()})
        tags = dict(summary[1])
    current = client.get_run(parent_run_id).data.metrics
    metrics = [Metric(k, v, ts, step) for k, (v, step) in values.items() if current.get(k) != v]
    if register:
        aliases = register_front(client, register, front_df, models, run_ids, OBJECTIVES)
        tags["registered_model"] = f"{register} ({len(aliases)} aliases)"
    client.log_batch(parent_run_id, metrics=metrics, tags=[_tag(k, v) for k, v in tags.items()])
    client.set_terminated(parent_run_id, status)
