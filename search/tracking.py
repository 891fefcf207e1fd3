"""MLflow logging from the driver: one parent run per sweep, one nested child run per trial.

Ray's stock MLflowLoggerCallback makes no parent run and keeps its trial->run map in memory, so
a restored sweep logs every resumed trial twice. `MLflowSweepCallback` persists the map through
Tune's callback state and falls back to looking runs up by their `ray_trial_id` tag. Workers
never talk to MLflow: only the driver needs a route to the tracking server.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from .front import SWEEP_REFERENCE, hypervolume, non_dominated_mask
from .objectives import OBJECTIVES
from .outcomes import trial_outcome
from .plots import plot_front, plot_hypervolume
from .redact import SECRET_PATTERN, redact


def get_or_create_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):  # keep artifacts beside the database, absolute
        artifact_location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def _flat_params(config: dict[str, Any]) -> list[Param]:
    out = []
    for k, v in sorted(config.items()):
        if SECRET_PATTERN.search(k):
            continue
        out.append(Param(k, redact(v)[:6000]))
    return out


def _finite_metrics(result: dict[str, Any], step: int) -> list[Metric]:
    ts = int(time.time() * 1000)
    out = []
    for k, v in result.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if k in ("training_iteration", "timestamp", "pid", "time_this_iter_s", "time_total_s",
                 "time_since_restore", "iterations_since_restore"):
            continue
        if math.isfinite(float(v)):
            out.append(Metric(k, float(v), ts, step))
    return out


class MLflowSweepCallback(Callback):
    """Driver-side logging with a trial->run map that survives `Tuner.restore`."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str,
                 reference: tuple[float, ...] = SWEEP_REFERENCE) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep = sweep
        self.reference = reference
        self.runs: dict[str, str] = {}  # ray trial id -> mlflow run id
        self.points: dict[str, list[float]] = {}  # completed trials' objective vectors
        self.epochs_consumed = 0
        self.hv_step = 0
        self._client: MlflowClient | None = None

    # pickled with the Tuner: keep the client out
    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["_client"] = None
        d["_last_step"] = {}
        return d

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def get_state(self) -> dict[str, Any]:
        return {"runs": dict(self.runs), "points": dict(self.points),
                "epochs_consumed": self.epochs_consumed, "hv_step": self.hv_step}

    def set_state(self, state: dict[str, Any]) -> None:
        self.runs = dict(state.get("runs", {}))
        self.points = dict(state.get("points", {}))
        self.epochs_consumed = int(state.get("epochs_consumed", 0))
        self.hv_step = int(state.get("hv_step", 0))

    # --- runs ------------------------------------------------------------------------------
    def run_for(self, trial: Any) -> str:
        rid = self.runs.get(trial.trial_id)
        if rid is None:
            found = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.ray_trial_id = '{trial.trial_id}' and tags.mlflow.parentRunId = '{self.parent_run_id}'",
                max_results=1,
            )
            if found:
                rid = found[0].info.run_id
            else:
                run = self.client.create_run(
                    self.experiment_id, run_name=str(trial),
                    tags={"mlflow.parentRunId": self.parent_run_id, "ray_trial_id": trial.trial_id,
                          "sweep": self.sweep, "brsearch.status": "running"},
                )
                rid = run.info.run_id
                self.client.log_batch(rid, params=_flat_params(trial.config))
            self.runs[trial.trial_id] = rid
        return rid

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rid = self.run_for(trial)
        self.client.update_run(rid, status="RUNNING")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        rid = self.run_for(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        self.epochs_consumed += 1
        if step <= self._logged_step(trial.trial_id, rid):
            return  # logged before a crash (--resume reran it), or a diverged trial's last report
        self._last_step[trial.trial_id] = step
        self.client.log_batch(rid, metrics=_finite_metrics(result, step))

    def _logged_step(self, trial_id: str, run_id: str) -> int:
        """The last epoch logged for the trial. Not part of the restored state (a snapshot may be
        older than the crash): the first result of a trial in this driver asks MLflow."""
        last = self.__dict__.setdefault("_last_step", {})
        if trial_id not in last:
            last[trial_id] = max((m.step for m in self.client.get_metric_history(run_id, "epoch")), default=0)
        return last[trial_id]

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial)

    def _finish(self, trial: Any) -> None:
        rid = self.run_for(trial)
        status, reason = trial_outcome(trial)
        tags = {"brsearch.status": status}
        if reason:
            tags["brsearch.reason"] = reason
        for k, v in tags.items():
            self.client.set_tag(rid, k, v)
        if status == "completed":
            self._log_model(trial, rid)
            last = trial.last_result
            self.points[trial.trial_id] = [float(last[m]) for m in OBJECTIVES]
            self._log_hypervolume()
        self.client.set_terminated(rid, "FAILED" if status == "failed" else "FINISHED")

    def _log_model(self, trial: Any, rid: str) -> None:
        ck = trial.checkpoint
        if ck is None:
            return
        try:
            with ck.as_directory() as d:
                model = Path(d) / "model.pt"
                if model.exists():
                    self.client.log_artifact(rid, str(model), "model")
        except Exception as e:  # the model is a convenience; the metrics are what matter
            self.client.set_tag(rid, "brsearch.model_artifact_error", str(e)[:250])

    def _log_hypervolume(self) -> None:
        pts = [p for p in self.points.values() if all(math.isfinite(v) for v in p)]
        if not pts:
            return
        hv = hypervolume(pts, self.reference)
        self.hv_step += 1
        ts = int(time.time() * 1000)
        self.client.log_batch(self.parent_run_id, metrics=[
            Metric("hypervolume", hv, ts, self.epochs_consumed),
            Metric("n_pareto", float(non_dominated_mask(pts).sum()), ts, self.epochs_consumed),
            Metric("n_completed", float(len(pts)), ts, self.epochs_consumed),
        ])


# --- the parent run ----------------------------------------------------------------------------

def start_parent_run(client: MlflowClient, experiment_id: str, sweep: str, params: dict[str, Any],
                     tags: dict[str, str]) -> str:
    run = client.create_run(experiment_id, run_name=sweep, tags={"sweep": sweep, "brsearch.kind": "sweep", **tags})
    client.log_batch(run.info.run_id, params=_flat_params(params))
    return run.info.run_id


def finish_parent_run(client: MlflowClient, parent_run_id: str, experiment_id: str,
                      trials_df: Any, front_df: Any, files: list[Path], status: str = "FINISHED") -> None:
    """Tags every child pareto=true/false to match the front, ends orphaned children, and logs
    the front as a table, PNG projections and an interactive 3-D HTML plot on the parent, plus
    `hypervolume.png` (the parent's hypervolume metric against epochs consumed)."""
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  max_results=50000)
    on_front = set(front_df["trial_id"]) if len(front_df) else set()
    known = set(trials_df["trial_id"]) if len(trials_df) else set()
    for run in children:
        tid = run.data.tags.get("ray_trial_id")
        client.set_tag(run.info.run_id, "pareto", "true" if tid in on_front else "false")
        if run.info.status == "RUNNING" and tid not in known:
            client.set_tag(run.info.run_id, "brsearch.status", "lost")
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    for f in files:
        client.log_artifact(parent_run_id, str(f), "results")
    if len(front_df):
        client.log_table(parent_run_id, front_df.to_dict(orient="list"), "pareto_front.json")
    with tempfile.TemporaryDirectory() as d:
        for path in plot_front(trials_df, front_df, Path(d)):
            client.log_artifact(parent_run_id, str(path), "plots")
        history = client.get_metric_history(parent_run_id, "hypervolume")
        if history:
            client.log_artifact(parent_run_id, str(plot_hypervolume(history, Path(d), SWEEP_REFERENCE)), "plots")
    client.log_metric(parent_run_id, "n_pareto", float(len(front_df)))
    client.set_terminated(parent_run_id, status)


