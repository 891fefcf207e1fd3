"""What `search.pareto` does with MLflow around a sweep: the link it prints, the end of the
sweep's logging (summary, front, models, registry), and `--resume-logging`.

The end never fails the sweep for MLflow's sake: the results are already in the storage path.
When the tracking server does not come back within `--mlflow-wait` seconds of no progress, the
sweep ends normally with one line saying what was not logged and the command that replays it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .front import DEFAULT_REFERENCE
from .mlflow_replay import replay
from .mlflow_uri import runs_view_url, ui_command
from .redact import redact
from .summary import sweep_summary
from .tracking import finish_parent_run, sweep_logger


def link_lines(tracking_uri: str, experiment_id: str) -> str:
    """`  open     <runs view>` and, for a database store, the `mlflow ui` command serving it."""
    cmd = ui_command(tracking_uri)
    return f"  open     {runs_view_url(tracking_uri, experiment_id)}" + (f"\n           (after: {cmd})" if cmd else "")


def finish_logging(*, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str, analysis: Any,
                   trials_df: Any, front_df: Any, files: list[Path], status: str, cpus_per_trial: float,
                   gpus_per_trial: float, floors: Any, register: str | None,
                   patience_s: float, replay_first: bool, resume_hint: str,
                   reference: tuple[float, ...] = DEFAULT_REFERENCE) -> str | None:
    """Queue the end of the sweep's logging and wait for the background logger; returns the one
    line to print when something could not be sent, else None."""
    logger = sweep_logger(tracking_uri, experiment_id, parent_run_id, sweep)
    if replay_first:  # a resumed sweep: what a crashed driver had queued is in the stored results
        replay(logger, analysis.trials, analysis.trial_dataframes, reference,
               floors=None if isinstance(floors, dict) else floors)
    summary = sweep_summary(trials_df, front_df, reference, cpus_per_trial, gpus_per_trial, floors)
    logger.call(finish_parent_run, logger.client, parent_run_id, experiment_id, trials_df, front_df, files,
                status, summary, register, reference, label="finish parent run")
    t0 = time.monotonic()
    left = logger.close(patience_s)
    if not left:
        return None
    q = logger.queue
    since = time.strftime("%H:%M:%S", time.localtime(q.down_since)) if q.down_since else "the end"
    return (f"mlflow: {redact(tracking_uri)} unreachable since {since} ({q.last_error or 'no reply'}); "
            f"{left} logging operations not sent after waiting {time.monotonic() - t0:.0f} s; the results are "
            f"complete in the storage path; log them when the server is back with: {resume_hint}")

