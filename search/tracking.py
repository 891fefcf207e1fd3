"""MLflow logging from the driver: one parent run per sweep, one nested child run per trial.

Ray's stock MLflowLoggerCallback makes no parent run and keeps its trial->run map in memory, so
a restored sweep logs every resumed trial twice. `MLflowSweepCallback` persists the map through
Tune's callback state and falls back to looking runs up by their `ray_trial_id` tag. Workers
never talk to MLflow: only the driver needs a route to the tracking server.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from .front import SWEEP_REFERENCE, hypervolume, non_dominated_mask
from .searcher import OBJECTIVES

SECRET_PATTERN = re.compile(r"(token|secret|password|passwd|credential|api[_-]?key|access[_-]?key)", re.I)
URI_CREDENTIALS = re.compile(r"(://)[^/@\s]+@")
# user:password@ that lost its scheme (a URI resolved as a local path keeps only one slash)
USERINFO = re.compile(r"(^|[/\s=,;'\"])[^/@\s:'\"]+:[^/@\s'\"]*@")
SECRET_ASSIGNMENT = re.compile(r"((?:token|secret|password|passwd|credential|api[_-]?key|access[_-]?key|signature)"
                               r"[\w-]*=)[^&\s'\",;]+", re.I)


def redact(value: Any) -> str:
    """Strip user:password@ from URIs and paths, and the values of token=/password=/... query
    arguments; credentials never reach logged params or artifacts."""
    text = URI_CREDENTIALS.sub(r"\1***@", str(value))
    text = USERINFO.sub(r"\1***@", text)
    return SECRET_ASSIGNMENT.sub(r"\1***", text)


def redact_obj(obj: Any) -> Any:
    """`redact` through dicts and lists (sweep.json, space.json); values of secret-named keys go."""
    if isinstance(obj, dict):
        return {k: "***" if isinstance(k, str) and SECRET_PATTERN.search(k) else redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    if isinstance(obj, str):
        return redact(obj)
    return obj


def absolute_tracking_uri(uri: str) -> str:
    """sqlite:///relative.db is relative to the cwd, which Tune changes; pin it down."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:  # a bare path means a sqlite file
        return "sqlite:///" + str(Path(uri).resolve())
    return uri


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


def trial_outcome(trial: Any) -> tuple[str, str]:
    """(status, reason): completed | stopped (early, by the scheduler) | failed.

    Called from Tune's trial-complete callbacks too, where the trial's status is still RUNNING
    (Tune sets TERMINATED after the callbacks), so the status alone does not decide."""
    last = trial.last_result or {}
    if last.get("diverged"):  # trainables.tune: non-finite loss or weights (ERROR, or stopped on it)
        return "failed", str(last.get("failure_reason") or "DivergedError")[:500]
    if trial.status == "ERROR":
        return "failed", error_reason(trial)
    if last.get("final") and last.get("epoch", 0) >= last.get("max_epochs", 1):
        return "completed", ""
    if last:
        return "stopped", f"stopped after epoch {last.get('epoch')}"
    return "failed", "no result"


def error_reason(trial: Any) -> str:
    """The one line of a trial's error that says why (e.g. `DivergedError: loss is nan ...`)."""
    text = ""
    try:
        err = trial.get_pickled_error()
        text = str(err) if err is not None else ""
    except Exception:
        pass
    if not text and trial.error_file and os.path.exists(trial.error_file):
        text = Path(trial.error_file).read_text(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception)\b", ln):
            return ln[:500]
    return (lines[-1] if lines else "error")[:500]


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


class ProgressCallback(Callback):
    """One terminal line per finished trial, on top of Tune's status table."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def get_state(self) -> dict[str, Any]:
        return {"done": self.done}

    def set_state(self, state: dict[str, Any]) -> None:
        self.done = int(state.get("done", 0))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial)

    def _line(self, trial: Any) -> None:
        self.done += 1
        status, reason = trial_outcome(trial)
        r = trial.last_result or {}
        objs = "  ".join(f"{m} {r[m]:.4f}" for m in OBJECTIVES
                         if isinstance(r.get(m), (int, float)) and math.isfinite(r[m]))
        print(" ".join(p for p in (f"[{self.done}/{self.total}] {trial.trial_id} {status}:", objs, reason) if p), flush=True)


class NoRetryOnDivergence(Callback):
    """A trial that reported `diverged` (trainables.tune) fails without Tune's retries: training is
    deterministic, so a retry from its last checkpoint would diverge again. Ray has no retry filter
    per exception; Tune checks the trial's own `max_failures` when the error arrives, which is
    after this result. (Should this attribute go, a retry still fails at once on the marker
    checkpoint the trial left.)"""

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get("diverged") and hasattr(trial, "max_failures"):
            trial.max_failures = 0


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
            client.log_artifact(parent_run_id, str(plot_hypervolume(history, Path(d))), "plots")
    client.log_metric(parent_run_id, "n_pareto", float(len(front_df)))
    client.set_terminated(parent_run_id, status)


def plot_hypervolume(history: list[Any], out: Path) -> Path:
    """hypervolume.png: the parent run's `hypervolume` metric history (MLflow Metric objects,
    step = training epochs consumed by the sweep so far) as a step curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((m.step, m.timestamp, m.value) for m in history)
    xs, ys = [0] + [p[0] for p in pts], [0.0] + [p[2] for p in pts]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.step(xs, ys, where="post", color="crimson")
    ax.plot(xs[1:], ys[1:], "o", color="crimson", ms=4, label="a trial completed")
    ax.set_xlabel("training epochs consumed (all trials)")
    ax.set_ylabel(f"hypervolume (reference {tuple(SWEEP_REFERENCE)})")
    ax.set_title("brsearch: hypervolume of the front")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = out / "hypervolume.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_front(trials_df: Any, front_df: Any, out: Path) -> list[Path]:
    """2-D projections (PNG) and an interactive 3-D front (HTML)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = trials_df[trials_df["status"] == "completed"] if len(trials_df) else trials_df
    if not len(done):
        return []
    paths = []
    names = list(OBJECTIVES)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (i, j) in zip(axes, ((0, 1), (0, 2), (1, 2))):
        ax.scatter(done[names[i]], done[names[j]], c="lightgray", edgecolors="gray", label="dominated")
        if len(front_df):
            ax.scatter(front_df[names[i]], front_df[names[j]], c="crimson", label="Pareto front")
        ax.set_xlabel(names[i])
        ax.set_ylabel(names[j])
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("brsearch: Pareto front of the fully quantized models")
    fig.tight_layout()
    png = out / "pareto_front_2d.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    paths.append(png)

    import plotly.graph_objects as go

    hover = [f"{t}<br>bits={b}" for t, b in zip(done["trial_id"], done.get("config.bits", [""] * len(done)))]
    on = done["pareto"].astype(bool) if "pareto" in done else [False] * len(done)
    fig3 = go.Figure()
    for flag, colour, label in ((False, "lightgray", "dominated"), (True, "crimson", "Pareto front")):
        sel = done[on == flag]
        fig3.add_trace(go.Scatter3d(
            x=sel[names[0]], y=sel[names[1]], z=sel[names[2]], mode="markers", name=label,
            marker={"size": 5, "color": colour},
            text=[h for h, o in zip(hover, on) if o == flag], hoverinfo="text+x+y+z",
        ))
    fig3.update_layout(scene={"xaxis_title": names[0], "yaxis_title": names[1], "zaxis_title": names[2]},
                       title="brsearch Pareto front (3-D)")
    html = out / "pareto_front_3d.html"
    fig3.write_html(str(html), include_plotlyjs=True)
    paths.append(html)
    return paths
