"""`python -m search.evaluate` after a real 3-trial digits sweep (real local Ray, sqlite MLflow,
Optuna storage; no mocks): the strong columns land on every front row of pareto.parquet and in
trials.parquet, each front trial's MLflow child run gets the metrics and flag tags exactly once
(the command is run twice, the first time on one trial only, so the second run also resumes).
The suite runs the published AutoAttack-rand protocol at each trial's own eps (digits' 0.1) on
the sweep's own 100 test images: on every front row, per its definition, worst <= AA-rand <=
clean, and AA-rand <= the sweep's own PGD on the same images (`test_robust_acc`, PGD-2 in this
tiny sweep, scored the same way: expected correctness over the noise draws; two different
attacks, so that comparison is not by construction, but AA-rand is the far stronger one here). Cheaper APGD settings write `test_apgd_acc`, never `test_aa_acc`."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from _mlflow_store import mlflow_uri

ROOT = Path(__file__).resolve().parents[1]
SETS = {"depth": "8", "width": "4", "attack_steps": "2", "proxy_eval_size": "64", "cw": "false",
        "eval_attack.steps": "2", "batch_size": "32"}
# the published AutoAttack-rand; the other attacks cheap. In-process: no --threads (it is global)
QUICK = ["--square-queries", "60", "--eot-samples", "2", "--eot-steps", "5", "--pgd-steps", "5"]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _run(tmp: Path, module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args, "--storage-path", str(tmp / "results")],
                          cwd=tmp, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_evaluate_adds_columns_and_mlflow_metrics_once(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from search import evaluate

    def run_evaluate(*args: str) -> str:  # in-process: a subprocess would only add torch's import
        capsys.readouterr()
        assert evaluate.main(["--name", "ev", "--storage-path", str(tmp_path / "results"), *args, *QUICK]) == 0
        return capsys.readouterr().out

    sets = [a for k, v in SETS.items() for a in ("--set", f"{k}={v}")]
    _run(tmp_path, "search.pareto", "--name", "ev", "--trials", "3", "--epochs", "2", "--subset-train", "300",
         "--subset-test", "100", "--num-cpus", "2", "--quiet", "--tracking-uri",
         mlflow_uri(tmp_path), *sets)
    exp = tmp_path / "results" / "ev"
    front = pd.read_parquet(exp / "pareto.parquet")
    assert len(front) >= 1
    first = front["trial_id"].iloc[0]
    # first run: one trial only; second run: the whole front (resumes, re-evaluates nothing)
    p1 = run_evaluate("--trials", first)
    assert "1 to go" in p1
    p2 = run_evaluate()
    assert "1 already evaluated" in p2 and f"{len(front) - 1} to go" in p2, p2
    p3 = run_evaluate()
    assert "0 to go" in p3 and "new metrics on 0 child run(s)" in p3, p3
    assert "test_aa_acc" in p3  # the front is printed again with the new columns

    front = pd.read_parquet(exp / "pareto.parquet")
    trials = pd.read_parquet(exp / "trials.parquet")
    cols = ["test_aa_acc", "test_square_acc", "test_eot_pgd_acc", "test_worst_acc", "test_strong_clean_acc",
            "test_strong_eps", "flag_above_clean", "flag_steps", "flag_eps", "flag_large_eps", "flag_blackbox",
            "flag_transfer", "flag_eot", "flag_aa", "sanity_flags"]
    for c in cols:
        assert c in front and c in trials, c
    assert front["test_aa_acc"].notna().all() and front["test_apgd_acc"].isna().all()
    assert (front["test_strong_n"] == 100).all()
    assert (front["test_strong_eps"] == 0.1).all()  # the trial's own eps: digits' default, not 8/255
    for _, r in front.iterrows():
        assert r["test_worst_acc"] <= r["test_aa_acc"] <= r["test_strong_clean_acc"], r["trial_id"]
        assert r["test_worst_acc"] <= min(r["test_square_acc"], r["test_eot_pgd_acc"], r["test_strong_pgd_acc"])
        # the sweep's own PGD (test_robust_acc) on the same 100 images at the same eps
        assert r["test_aa_acc"] <= r["test_robust_acc"], (r["trial_id"], r["test_aa_acc"], r["test_robust_acc"])
    on_front = set(front["trial_id"])
    assert set(trials[trials["test_aa_acc"].notna()]["trial_id"]) == on_front
    assert len(trials) == 3 and trials["trial_id"].is_unique

    sweep = json.loads((exp / "brsearch" / "sweep.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    children = client.search_runs([sweep["experiment_id"]],
                                  filter_string=f"tags.mlflow.parentRunId = '{sweep['parent_run_id']}'")
    assert len(children) == 3
    for run in children:
        tid = run.data.tags["ray_trial_id"]
        hist = client.get_metric_history(run.info.run_id, "test_aa_acc")
        if tid in on_front:
            assert len(hist) == 1, (tid, hist)  # three evaluate runs, one value
            assert math.isclose(hist[0].value, float(front.set_index("trial_id").loc[tid, "test_aa_acc"]))
            assert run.data.tags["sanity.flag_steps"] in ("true", "false")
            assert run.data.tags["sanity.flag_transfer"] == "n/a"  # no transfer source in a sweep
            assert "sanity_flags" in run.data.tags
        else:
            assert hist == []
    parent = client.get_run(sweep["parent_run_id"])
    assert parent.data.metrics["strong_n_evaluated"] == len(front)
    # 1 after the first run, then the front's size (a new value), then nothing new
    n_points = len(client.get_metric_history(parent.info.run_id, "strong_n_evaluated"))
    assert n_points == (1 if len(front) == 1 else 2)

    # --resume-logging logs the stored tables as they are: the strong columns survive it
    _run(tmp_path, "search.pareto", "--name", "ev", "--resume-logging", "--tracking-uri", mlflow_uri(tmp_path))
    again = pd.read_parquet(exp / "pareto.parquet")
    assert again["test_aa_acc"].notna().all() and list(again["trial_id"]) == list(front["trial_id"])

    # fewer APGD iterations are not AutoAttack-rand: they land under another name
    run_evaluate("--trials", first, "--aa-steps", "3", "--aa-eot", "2", "--subset-test", "20", "--no-mlflow")
    row = pd.read_parquet(exp / "pareto.parquet").set_index("trial_id").loc[first]
    assert row["test_apgd_acc"] <= row["test_strong_clean_acc"] and math.isnan(row["test_aa_acc"])


def test_bad_input_is_one_line(tmp_path, capsys):
    from search import evaluate

    with pytest.raises(SystemExit) as e:
        evaluate.main(["--name", "nope", "--storage-path", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no finished sweep" in err[0]
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--name", "x", "--aa-eot", "0"])
    assert e.value.code == 2 and "--aa-eot=0" in capsys.readouterr().err
