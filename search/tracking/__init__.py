"""Everything the project writes to MLflow, through one writer.

A sweep has a parent run and one child run per trial (`SweepRun` names them). While the sweep
runs, `MLflowSweepCallback` queues each trial's run, per-epoch metrics and end, and the parent's
live front metrics, for `SweepLogger`'s background thread; at the end `finish_logging` logs the
summary, front, plots, models and registry; `--resume-logging` replays what an outage left out;
`search.evaluate` adds its results with `log_strong_results`. Every write is idempotent.
"""
from search._lazy import attach

__all__, __getattr__, __dir__ = attach(__name__, {
    "_callback": ["MLflowSweepCallback", "front_metrics", "live_front"],
    "_parent": ["SweepEnd", "finish_logging", "finish_parent_run"],
    "_models": ["register_pick"],
    "_plots": ["compare_figure", "compare_fronts", "front_figures", "front_views"],
    "_queue": ["BackgroundQueue", "is_transient", "server_probe"],
    "_replay": ["replay"],
    "_uri": ["absolute_tracking_uri", "link_lines", "runs_view_url", "ui_command"],
    "_writer": ["SweepLogger", "SweepRun", "child_runs", "get_or_create_experiment", "log_strong_results",
                "result_metrics", "start_parent_run", "sweep_logger"],
})
