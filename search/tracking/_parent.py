"""The end of a sweep in MLflow: the parent run's summary, front, plots and registry, after a
sweep, a `--resume` or a `--resume-logging` alike.

The end never fails the sweep for MLflow's sake: the results are already in the storage path.
When the tracking server does not come back within `--mlflow-wait` seconds of no progress, the
sweep ends normally with one line saying what was not logged and the command that replays it.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient

from search.front import Floors
from search.redact import redact
from search.results import sweep_summary
from trainables.contract import COMPLETED, FAILED, LOST, STOPPED, TRIAL_ID

from ._models import register_front, tag_front
from ._plots import plot_front, plot_hypervolume
from ._replay import replay
from ._writer import STATUS_TAG, SweepRun, child_runs, sweep_logger, tags


@dataclass(frozen=True)
class SweepEnd:
    """What a sweep's end logs: its trials (Tune's ExperimentAnalysis) and tables, the files
    written, the parent's final status, and what its summary needs."""

    analysis: Any
    trials_df: Any
    front_df: Any
    files: list[Path]
    status: str  # FINISHED, or KILLED for an interrupted sweep
    floors: Floors
    cpus_per_trial: float
    gpus_per_trial: float
    register: str | None = None


def finish_logging(run: SweepRun, end: SweepEnd, *, patience_s: float, replay_first: bool, resume_hint: str) -> str | None:
    """Queue the end of the sweep's logging and wait for the background logger; returns the one
    line to print when something could not be sent, else None. `replay_first`: a resumed sweep,
    or --resume-logging: what a crashed driver or a server outage left unlogged is replayed from
    the stored results first.

    Args:
        run: the sweep's parent run.
        end: what the end logs.
        patience_s: how long to wait for an unreachable server while nothing gets through.
        replay_first: replay the stored results first (a resume, --resume-logging).
        resume_hint: the command that replays the logging later.
    """
    logger = sweep_logger(run)
    if replay_first:
        replay(logger, end.analysis, end.floors)
    summary = sweep_summary(end.trials_df, end.front_df, None, end.cpus_per_trial,
                            end.gpus_per_trial, end.floors)
    logger.call(finish_parent_run, logger.client, run, end, summary, label="finish parent run")
    t0 = time.monotonic()
    left = logger.close(patience_s)
    if not left:
        return None
    q = logger.queue
    since = time.strftime("%H:%M:%S", time.localtime(q.down_since)) if q.down_since else "the end"
    return (f"mlflow: {redact(run.tracking_uri)} unreachable since {since} ({q.last_error or 'no reply'}); "
            f"{left} logging operations not sent after waiting {time.monotonic() - t0:.0f} s; the results are "
            f"complete in the storage path; log them when the server is back with: {resume_hint}")


def finish_parent_run(client: MlflowClient, run: SweepRun, end: SweepEnd,
                      summary: tuple[dict[str, float], dict[str, str]]) -> None:
    """Tags every child (and its logged model) pareto=true/false to match the front, ends orphaned
    children, logs the summary metrics and tags, the front as a table, PNG projections and an
    interactive 3-D HTML plot, `hypervolume.png` (the parent's hypervolume metric against epochs
    consumed), registers the front if asked, and ends the parent. Idempotent: run again by a
    retry, a --resume or a --resume-logging, it leaves the same state.

    Args:
        client: the logger's MLflow client.
        run: the sweep's parent run.
        end: the sweep's tables, files, status and floors.
        summary: (metrics, tags) from `search.results.sweep_summary`.
    """
    parent, trials_df, front_df = run.parent_run_id, end.trials_df, end.front_df
    on_front = set(front_df[TRIAL_ID]) if len(front_df) else set()
    known = set(trials_df[TRIAL_ID]) if len(trials_df) else set()
    run_ids = {}
    for tid, child in child_runs(client, run).items():
        run_ids[tid] = child.info.run_id
        flag = "true" if tid in on_front else "false"
        if child.data.tags.get("pareto") != flag:
            client.set_tag(child.info.run_id, "pareto", flag)
        if tid not in known and (child.info.status != "KILLED" or child.data.tags.get(STATUS_TAG) != LOST):
            # a trial the restored experiment never heard of (started after Tune's last snapshot,
            # logged live, maybe to its end): no table holds it, so neither does the sweep's record
            client.set_tag(child.info.run_id, STATUS_TAG, LOST)
            client.set_terminated(child.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    models = tag_front(client, run.experiment_id, parent, on_front)
    for f in end.files:
        client.log_artifact(parent, str(f), "results")
    if len(front_df):  # (log_table would append to the table a previous attempt logged)
        client.log_text(parent, front_df.to_json(orient="split", index=False, date_format="iso"), "pareto_front.json")
    with tempfile.TemporaryDirectory() as d:
        for path in plot_front(trials_df, front_df, Path(d), end.floors.objectives):
            client.log_artifact(parent, str(path), "plots")
        history = client.get_metric_history(parent, "hypervolume")
        if history:
            client.log_artifact(parent, str(plot_hypervolume(history, Path(d), end.floors.fixed_reference)), "plots")
    # the final front's size and hypervolume as the latest points of the live curves; the rest at
    # step = trials finished. A value already there (a retry, a resume with nothing new) is not sent.
    ts = int(time.time() * 1000)
    last = max((m.step for m in history), default=0)
    values = {"n_pareto": (float(len(front_df)), last)}
    metrics_now, run_tags = summary
    finished = int(sum(metrics_now.get(f"n_{s}", 0) for s in (COMPLETED, STOPPED, FAILED)))
    values.update({k: (v, last if k == "hypervolume" else finished) for k, v in metrics_now.items()})
    run_tags = dict(run_tags)
    current = client.get_run(parent).data.metrics
    metrics = [Metric(k, v, ts, step) for k, (v, step) in values.items() if current.get(k) != v]
    if end.register:
        aliases = register_front(client, end.register, front_df, models, run_ids, end.floors.objectives)
        run_tags["registered_model"] = f"{end.register} ({len(aliases)} aliases)"
    client.log_batch(parent, metrics=metrics, tags=tags(run_tags))
    client.set_terminated(parent, end.status)
