"""A sweep's results as tables: what became of each trial, the Pareto front, the summary.

`trials_frame` turns Tune's trials into one row each (status by `trial_outcome`, feasibility by
the sweep's floors), `front_frame` keeps the non-dominated feasible rows, `write_tables` writes
both as Parquet and CSV, and `sweep_summary` gives the parent run's summary metrics.
"""
from search._lazy import attach

__all__, __getattr__, __dir__ = attach(__name__, {
    "_outcomes": ["stopped_reason", "trial_outcome"],
    "_summary": ["sweep_summary"],
    "_tables": ["IMPORTED_COLUMN", "METRIC_COLUMNS", "feasible_column", "format_front", "front_frame", "front_mask", "trials_frame",
                "write_tables"],
})
