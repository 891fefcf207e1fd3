"""The chaos harness's verdict: every store of a finished sweep checked against the others.

`check` reads what a sweep left (trials.parquet, pareto.parquet, the Optuna journal, MLflow, the
checkpoints) and counts what is lost, duplicated or left open, independently of how the sweep ran,
so `tests/test_chaos.py` can plant each kind of fault in a real finished sweep and see it counted.
"""
from __future__ import annotations

import io
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainables.contract import (  # noqa: E402 - after the path setup, as a script
    CHECKPOINT_FILE,
    COMPLETED,
    EPOCH,
    FAILED,
    FRONT_FILE,
    LOST,
    MODEL_FILE,
    OBJECTIVES,
    RECORD_FILE,
    STATE_DIR,
    STUDY_JOURNAL,
    TRIAL_ID,
    TRIALS_FILE,
    trial_dir,
)

NAME = "chaos"


def read(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def check(fs, root: str, tracking_uri: str, trials: int, epochs: int, scratch: Path, name: str = NAME) -> dict:
    """Every store against the others; counts of what is lost, duplicated or left open.

    Args:
        fs, root: a pyarrow filesystem and the sweep's experiment folder on it.
        tracking_uri: the sweep's MLflow store.
        trials, epochs: what the sweep asked for.
        scratch: a folder for a local copy of the Optuna journal.
        name: the sweep's name (its Optuna study).
    """
    import numpy as np
    import optuna
    import pandas as pd
    import pyarrow.fs as pafs
    import torch
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from search.front import Floors, feasible_mask, non_dominated_mask

    problems: list[str] = []
    lost = duplicated = orphans = torn = 0
    df = pd.read_parquet(io.BytesIO(read(fs, f"{root}/{TRIALS_FILE}")))
    front = pd.read_parquet(io.BytesIO(read(fs, f"{root}/{FRONT_FILE}")))
    ids = list(df[TRIAL_ID])
    dup_ids = [t for t, c in Counter(ids).items() if c > 1]
    duplicated += sum(Counter(ids)[t] - 1 for t in dup_ids)
    if len(set(ids)) < trials:
        lost += trials - len(set(ids))
        problems.append(f"trials.parquet: {len(set(ids))} trials of {trials}")
    unfinished = df[~df["status"].isin([COMPLETED, FAILED])]
    if len(unfinished):
        lost += len(unfinished)
        problems.append(f"trials.parquet: not finished: {dict(zip(unfinished[TRIAL_ID], unfinished['status']))}")
    failed = sorted(df.loc[df["status"] == FAILED, TRIAL_ID])
    completed = sorted(df.loc[df["status"] == COMPLETED, TRIAL_ID])

    # the front: the non-dominated set of the feasible completed rows
    # (feasibility recomputed from the digits floors, not read from the table's own column)
    done_rows = df[df["status"] == COMPLETED]
    pts = done_rows[list(OBJECTIVES)].to_numpy(dtype=float)
    keep = np.isfinite(pts).all(axis=1)
    keep[keep] = feasible_mask(done_rows[keep].to_dict("records"), Floors.for_sweep("digits"))
    ok = done_rows[keep]
    mask = non_dominated_mask(pts[keep]) if len(ok) else np.zeros(0, bool)
    expected = set(ok[TRIAL_ID][mask])
    front_ok = expected == set(front[TRIAL_ID]) == set(df.loc[df["pareto"].astype(bool), TRIAL_ID])
    if not front_ok:
        problems.append(f"front: table {sorted(expected)}, pareto.parquet {sorted(front[TRIAL_ID])}")

    # Optuna
    local_journal = scratch / "check-optuna.journal"
    local_journal.write_bytes(read(fs, f"{root}/{STATE_DIR}/{STUDY_JOURNAL}"))
    study = optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(local_journal))))
    ot = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in ot)
    if states.get("RUNNING", 0):
        orphans += states["RUNNING"]
        problems.append(f"optuna: {states['RUNNING']} RUNNING")
    by_ray: dict[str, list] = {}
    for t in ot:
        by_ray.setdefault(t.user_attrs.get("ray_trial_id", "?"), []).append(t)
    for tid in set(ids):
        finals = [t for t in by_ray.get(tid, []) if t.state.name in ("COMPLETE", "FAIL", "PRUNED")]
        if not finals:
            lost += 1
            problems.append(f"optuna: no finished trial for {tid}")
        elif len(finals) > 1:
            duplicated += len(finals) - 1
            problems.append(f"optuna: {len(finals)} finished trials for {tid}")
    # finished in Optuna, unknown to Tune's restored experiment (ended after its last snapshot)
    unknown = sorted((t.user_attrs.get("ray_trial_id", "?"), t.state.name) for t in ot
                     if t.state.name in ("COMPLETE", "PRUNED") and t.user_attrs.get("ray_trial_id") not in set(ids))
    for tid, state in unknown:
        problems.append(f"optuna: {tid} is {state} but in no table (it ended after Tune's last snapshot; "
                        "the resumed sweep ran another trial in its place)")
    if states.get("COMPLETE", 0) != len(completed):
        problems.append(f"optuna: {states.get('COMPLETE', 0)} COMPLETE, the table has {len(completed)} completed")

    # MLflow
    record = json.loads(read(fs, f"{root}/{STATE_DIR}/{RECORD_FILE}"))
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("brsearch")
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=5000)
    parents = [r for r in runs if r.data.tags.get("brsearch.kind") == "sweep"]
    if [p.info.status for p in parents] != ["FINISHED"]:
        problems.append(f"mlflow: parents {[p.info.status for p in parents]}")
    children: dict[str, list] = {}
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId") == record["parent_run_id"]:
            children.setdefault(r.data.tags.get("ray_trial_id", "?"), []).append(r)
    epochs_missing = epochs_twice = 0
    for tid in set(ids):
        got = children.get(tid, [])
        if not got:
            lost += 1
            problems.append(f"mlflow: no child run for {tid}")
            continue
        if len(got) > 1:
            duplicated += len(got) - 1
            problems.append(f"mlflow: {len(got)} child runs for {tid}")
        child = got[0]
        want = "FAILED" if tid in failed else "FINISHED"
        if child.info.status != want:
            problems.append(f"mlflow: child {tid} is {child.info.status}, not {want}")
            orphans += child.info.status == "RUNNING"
        if tid in completed:
            for key in (EPOCH, *OBJECTIVES):
                steps = Counter(m.step for m in client.get_metric_history(child.info.run_id, key))
                missing = [s for s in range(1, epochs + 1) if steps[s] == 0]
                twice = [s for s, c in steps.items() if c > 1]
                epochs_missing += len(missing)
                epochs_twice += sum(steps[s] - 1 for s in twice)
                if missing or twice:
                    problems.append(f"mlflow: {tid} {key}: steps missing {missing}, logged twice {twice}")
    lost += epochs_missing
    duplicated += epochs_twice
    for tid, got in children.items():
        if tid not in set(ids):
            bad = [r for r in got if r.info.status == "RUNNING" or r.data.tags.get("brsearch.status") != LOST]
            if bad:
                orphans += len(bad)
                problems.append(f"mlflow: child {tid} unaccounted for ({[r.info.status for r in bad]})")
    models = Counter(m.tags.get("brsearch.trial_id") for m in client.search_logged_models([exp.experiment_id], max_results=5000))
    for tid in completed:
        if models[tid] == 0:
            lost += 1
            problems.append(f"mlflow: no logged model for {tid}")
        elif models[tid] > 1:
            duplicated += models[tid] - 1
            problems.append(f"mlflow: {models[tid]} logged models for {tid}")

    # checkpoints: the final one of each completed trial holds the model; none is torn
    for tid in sorted(set(ids)):
        base = f"{root}/{trial_dir(tid)}"
        cps = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
                     if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
        for cp in cps:
            try:
                torch.load(io.BytesIO(read(fs, f"{cp}/{CHECKPOINT_FILE}")), map_location="cpu", weights_only=False)
            except Exception as e:  # noqa: BLE001 - any unreadable file is a torn checkpoint
                torn += 1
                problems.append(f"checkpoint {cp.rsplit('/', 2)[-2]}/{cp.rsplit('/', 1)[-1]} unreadable: {type(e).__name__}")
        if tid in completed:
            try:
                torch.load(io.BytesIO(read(fs, f"{cps[-1]}/{MODEL_FILE}")), map_location="cpu", weights_only=False)
            except Exception as e:  # noqa: BLE001
                lost += 1
                problems.append(f"checkpoint: {tid}'s final model unreadable: {type(e).__name__}: {str(e)[:120]}")
    return {"trials": len(set(ids)), "completed": len(completed), "failed": len(failed), "lost": lost,
            "duplicated": duplicated, "orphans": orphans, "unknown_to_tune": len(unknown),
            "torn_checkpoints": torn, "front_ok": front_ok,
            "front_size": len(front), "mlflow_children": sum(len(v) for v in children.values()),
            "optuna_states": dict(states), "problems": problems}
