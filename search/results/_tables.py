"""The sweep's results as tables: every trial, and the Pareto front among completed ones.

Written with pyarrow as Parquet (plus CSV copies) under <storage-path>/<name>/, each file to a
temporary name and renamed, so a crash mid-write leaves the previous good file.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from search.front import Floors, feasible_mask, non_dominated_mask
from search.redact import redact
from trainables.contract import (
    CHANNEL_SPARSITY,
    COMPLETED,
    DIRECTIONS,
    DIVERGED,
    EPOCH,
    FRONT_TABLE,
    INTERRUPTED,
    LATENCY_MS,
    LATENCY_SPREAD_MS,
    LATENCY_THREADS,
    MAX_EPOCHS,
    MINIMIZE,
    NODE_ID,
    OBJECTIVES,
    SIZE_KIB,
    TABLE_SUFFIXES,
    TRIAL_ID,
    TRIALS_TABLE,
)
from trainables.fileio import atomic_path

from ._outcomes import trial_outcome

# objectives and the other metrics are validation-split numbers; test_* come from the one
# evaluation of the test split at the end of a trial and are reported, never selected on
METRIC_COLUMNS = (*OBJECTIVES, SIZE_KIB, LATENCY_MS, LATENCY_SPREAD_MS, LATENCY_THREADS, "fgsm_acc",
                  "channel_sparsity_in", "weight_sparsity", "size_bits", "compression", EPOCH, MAX_EPOCHS,
                  "test_clean_acc", "test_robust_acc", "test_fgsm_acc", "test_cw_acc", "time_total_s")
STRING_COLUMNS = (NODE_ID,)  # the Ray node that ran the trial's last epoch
IMPORTED_COLUMN = "imported_from"  # the earlier sweep a warm-started sweep's row came from


def trials_frame(trials: list[Any], floors: Floors | None = None,
                 imported: list[dict[str, Any]] | tuple = ()) -> pd.DataFrame:
    """One row per Tune trial: id, status (completed/stopped/failed, or interrupted for a trial an
    interrupted sweep left unfinished), reason, config, metrics. Takes the trials after
    `Tuner.fit` returned, when their status is final.

    Args:
        trials: Tune's Trial objects (`ExperimentAnalysis.trials`).
        floors: the sweep's floors, for the `feasible` column.
        imported: rows of earlier sweeps' tables a warm start imported (`imported_from` set);
            they count for the front like the sweep's own trials.
    """
    rows = []
    for t in trials:
        last = t.last_result or {}
        if t.status in ("PENDING", "RUNNING", "PAUSED") and not last.get(DIVERGED):
            epoch = last.get(EPOCH)
            status = INTERRUPTED
            reason = (f"interrupted after epoch {epoch}" if epoch else "not started") + "; --resume continues it"
        else:
            status, reason = trial_outcome(t)
        row: dict[str, Any] = {TRIAL_ID: t.trial_id, "trial_name": str(t), "status": status, "reason": reason}
        for k in METRIC_COLUMNS:
            v = last.get(k)
            row[k] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        for k in STRING_COLUMNS:
            row[k] = None if last.get(k) is None else str(last[k])
        for k, v in sorted((t.config or {}).items()):
            v = v if isinstance(v, (int, float, bool)) or v is None else redact(v)  # logged to MLflow too
            row[f"config.{k}"] = v
        rows.append(row)
    for r in imported:
        rows.append({k: v for k, v in r.items() if k not in ("feasible", "pareto")})
    df = pd.DataFrame(rows)
    if not len(df):
        df = pd.DataFrame(columns=[TRIAL_ID, "trial_name", "status", "reason", *METRIC_COLUMNS, *STRING_COLUMNS])
    if imported:
        df[IMPORTED_COLUMN] = df[IMPORTED_COLUMN].where(df[IMPORTED_COLUMN].notna(), None)
    df["feasible"] = feasible_column(df, floors)
    df["pareto"] = front_mask(df, floors)
    return df.sort_values(TRIAL_ID).reset_index(drop=True)


def feasible_column(df: pd.DataFrame, floors: Floors | None) -> list[bool]:
    """Completed trials with finite objectives within the sweep's bounds (Floors.feasible, the
    contract's rule); every other row is False.

    Args:
        df: the trials table.
        floors: the sweep's objectives and bounds (None: the default objectives, no floors:
            completed with finite objectives is enough).
    """
    rule = floors or Floors(-math.inf, -math.inf, -math.inf)
    records = df.to_dict("records")
    on = feasible_mask([{m: r.get(m) for m in rule.bounds} for r in records], rule)
    return [bool(r["status"] == COMPLETED and ok) for r, ok in zip(records, on)]


def front_mask(df: pd.DataFrame, floors: Floors | None = None) -> list[bool]:
    """Non-dominated among the feasible trials (completed, finite objectives, within the bounds;
    the `feasible` column), every objective in its own direction; everything else is off.
    Stopped (PRUNED) trials never count."""
    rule = floors or Floors(0.0)
    ok = list(df["feasible"]) if "feasible" in df else feasible_column(df, floors)
    mask = [False] * len(df)
    idx = [i for i, o in enumerate(ok) if o]
    if idx:
        pts = df.iloc[idx][list(rule.objectives)].to_numpy(dtype=float)
        for i, on in zip(idx, non_dominated_mask(rule.gains(pts))):
            mask[i] = bool(on)
    return mask


def front_frame(df: pd.DataFrame, floors: Floors | None = None) -> pd.DataFrame:
    """The front's rows, objectives first, best first by the first objective."""
    objectives = list((floors or Floors(0.0)).objectives)
    cols = [TRIAL_ID, *objectives] + [c for c in df.columns if c not in (TRIAL_ID, *objectives, "pareto")]
    front = df[df["pareto"]][cols] if len(df) else df
    ascending = [DIRECTIONS[m] == MINIMIZE for m in objectives]
    return front.sort_values(objectives, ascending=ascending).reset_index(drop=True)


def write_tables(out_dir: Path, trials_df: pd.DataFrame, front_df: pd.DataFrame) -> list[Path]:
    """Write both tables as Parquet and CSV, each file atomically; returns the paths.

    Args:
        out_dir: where the sweep's files live on this machine (`SweepLocation.local_dir`).
        trials_df: the trials table.
        front_df: the front table.
    """
    written = []
    writers = dict(zip(TABLE_SUFFIXES, (pq.write_table, pacsv.write_csv)))
    for name, df in ((TRIALS_TABLE, trials_df), (FRONT_TABLE, front_df)):
        table = pa.Table.from_pandas(_arrow_safe(df), preserve_index=False)
        for suffix, write in writers.items():
            path = out_dir / f"{name}.{suffix}"
            with atomic_path(path) as tmp:
                write(table, str(tmp))
            written.append(path)
    return written


def _arrow_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Mixed-type config columns (e.g. 0.0 and 'x') become strings so Arrow accepts them."""
    out = df.copy()
    for c in out.columns:
        kinds = {type(v) for v in out[c] if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if len(kinds) > 1 and not kinds <= {int, float}:
            out[c] = out[c].map(lambda v: None if v is None else str(v))
    return out


def format_front(front_df: pd.DataFrame, floors: Floors | None = None) -> str:
    """The front as a terminal table: the objectives, then the footprint and the main settings."""
    if not len(front_df):
        return "(no completed trial: the front is empty)"
    objectives = list((floors or Floors(0.0)).objectives)
    cols = [TRIAL_ID, *objectives] + [c for c in (CHANNEL_SPARSITY, SIZE_KIB, LATENCY_MS, "weight_sparsity", "compression")
                                      if c in front_df and c not in objectives]
    cols += [c for c in ("config.bits", "config.loss", "config.alpha", "config.beta", "config.group_lasso",
                         "config.lambda0", "config.lambda_final", "config.rho", "config.phase2_start", "config.lr") if c in front_df]
    view = front_df[cols].copy()
    view.columns = [c.replace("config.", "") for c in cols]
    return view.to_string(index=False, float_format=lambda v: f"{v:.4g}")
