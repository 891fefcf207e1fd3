"""End to end: a real small MO-ASHA sweep (the CLI in a subprocess, tiny trials on digits).

Checks what MO-ASHA promises about early-stopped trials and the sweep's hypervolume:

* a trial MO-ASHA stopped is `stopped` in trials.parquet, PRUNED in the Optuna study (never
  COMPLETE with low-fidelity values), off the front (ours and Optuna's) and tagged
  `brsearch.status=stopped` in MLflow;
* the parent MLflow run has a `hypervolume` metric with one point per completed trial, logged
  against the epochs consumed so far, ending at the hypervolume of the completed trials, and a
  `plots/hypervolume.png`.

With 6 trials, 2 at once, 3 epochs and reduction factor 6 the only rung is at epoch 1, and a
trial continues there iff its normalised rank is <= 1/6: the first arrival always continues,
arrivals 2 to 5 only if they come first at the rung, the sixth if it comes first or second.
With reduction factor 3, one run in six stopped no trial (with three objectives most newcomers
are non-dominated, and the order in which two parallel trials reach the rung varies), and with 2
one run did; the fixture asserts that some trial was stopped rather than passing vacuously.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from _mlflow_store import mlflow_db
from _study import sweep_study

NAME = "eff"
EPOCHS = 3
TRIALS = 6
SWEEP_ARGS = [
    "--name", NAME, "--scheduler", "moasha", "--seed", "0",  # the default sampler with moasha
    # epsnet: with crowding every extreme of a front ties at an infinite distance, and in a rung
    # of <= 6 three-objective vectors nearly every newcomer is one, so hardly any trial stops
    "--tie-break", "epsnet",
    "--trials", str(TRIALS), "--epochs", str(EPOCHS), "--max-concurrent", "2", "--num-cpus", "2",
    "--grace-period", "1", "--reduction-factor", "6",
    "--subset-train", "300", "--subset-test", "100",
    "--set", "depth=8", "--set", "width=4", "--set", "attack_steps=2", "--set", "proxy_eval_size=64",
    "--set", "cw=false", "--quiet",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("moasha-sweep")
    storage, db = root / "results", mlflow_db(root)
    cmd = [sys.executable, "-m", "search.pareto", *SWEEP_ARGS,
           "--storage-path", str(storage), "--tracking-uri", f"sqlite:///{db}"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"sweep failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    import pandas as pd

    exp = storage / NAME
    trials = pd.read_parquet(exp / "trials.parquet")
    front = pd.read_parquet(exp / "pareto.parquet")
    stopped = set(trials.loc[trials["status"] == "stopped", "trial_id"])
    completed = set(trials.loc[trials["status"] == "completed", "trial_id"])
    assert stopped, f"no trial was stopped early, the checks below would be vacuous:\n{trials}"
    assert completed, f"no trial completed:\n{trials}"
    return {"root": root, "exp": exp, "db": db, "trials": trials, "front": front,
            "stopped": stopped, "completed": completed}


def test_stopped_trials_in_trials_parquet(sweep):
    df = sweep["trials"]
    assert len(df) == TRIALS
    assert set(df["status"]) <= {"completed", "stopped"}, df[["trial_id", "status", "reason"]]
    stopped = df[df["status"] == "stopped"]
    # stopped at a rung (epoch 1 or 2), never before the grace period, never at the full budget
    assert stopped["epoch"].between(1, EPOCHS - 1).all(), stopped[["trial_id", "epoch"]]
    assert stopped["reason"].str.startswith("stopped after epoch").all()
    assert not stopped["pareto"].any()
    assert (df.loc[df["status"] == "completed", "epoch"] == EPOCHS).all()
    assert set(sweep["front"]["trial_id"]) <= sweep["completed"]
    assert not set(sweep["front"]["trial_id"]) & sweep["stopped"]


def test_stopped_trials_are_pruned_in_optuna(sweep):
    from optuna.trial import TrialState

    study = sweep_study(sweep["exp"], NAME)
    state = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    assert set(state) == sweep["stopped"] | sweep["completed"]
    for tid in sweep["stopped"]:
        assert state[tid].state == TrialState.PRUNED, (tid, state[tid].state, state[tid].values)
        assert state[tid].values is None
    rows = sweep["trials"].set_index("trial_id")
    for tid in sweep["completed"]:
        assert state[tid].state == TrialState.COMPLETE
        row = rows.loc[tid]
        # Optuna gets the objectives, measured on the validation split ...
        assert state[tid].values == pytest.approx([row["clean_acc"], row["robust_acc"], row["channel_sparsity"]])
    # ... never the test split, which is reported beside them as test_* (and differs from them)
    test_values = {tid: [rows.loc[tid, "test_clean_acc"], rows.loc[tid, "test_robust_acc"]] for tid in sweep["completed"]}
    assert all(v is not None and all(x == x for x in v) for v in test_values.values())
    assert any(state[tid].values[:2] != pytest.approx(v) for tid, v in test_values.items())
    # Optuna's own front (public Study.best_trials, feasible trials only) holds no stopped trial
    # and is exactly our front: same floors (constraints), same dominance
    best = {t.user_attrs["ray_trial_id"] for t in study.best_trials}
    assert not best & sweep["stopped"]
    assert best == set(sweep["front"]["trial_id"])


def _client(sweep):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{sweep['db']}")
    exp = client.get_experiment_by_name("brsearch")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = [r for r in runs if r.data.tags.get("brsearch.kind") == "sweep"]
    assert len(parent) == 1
    children = {r.data.tags["ray_trial_id"]: r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    return client, parent[0], children


def test_stopped_trials_tagged_in_mlflow(sweep):
    _, _, children = _client(sweep)
    assert set(children) == sweep["stopped"] | sweep["completed"]
    for tid in sweep["stopped"]:
        tags = children[tid].data.tags
        assert tags["brsearch.status"] == "stopped"
        assert tags["brsearch.reason"].startswith("stopped after epoch")
        assert tags["pareto"] == "false"
        assert children[tid].info.status == "FINISHED"
    for tid in sweep["completed"]:
        assert children[tid].data.tags["brsearch.status"] == "completed"


def test_parent_hypervolume_against_epochs_consumed(sweep):
    from search.front import Floors, feasible_mask, hypervolume

    client, parent, _ = _client(sweep)
    hist = sorted(client.get_metric_history(parent.info.run_id, "hypervolume"), key=lambda m: (m.step, m.timestamp))
    assert len(hist) == len(sweep["completed"])  # recomputed whenever a trial completes
    steps = [m.step for m in hist]
    values = [m.value for m in hist]
    df = sweep["trials"]
    consumed = int(df["epoch"].sum())  # every reported epoch of every trial
    assert steps == sorted(steps) and steps[0] >= EPOCHS and steps[-1] <= consumed
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))  # the front only grows
    done = df[df["status"] == "completed"][["clean_acc", "robust_acc", "channel_sparsity"]]
    floors = Floors.for_sweep("digits")  # reference (0.1, 0, 0); trials at chance do not count
    keep = feasible_mask(done.to_dict("records"), floors)
    assert values[-1] == pytest.approx(hypervolume(done.to_numpy(float)[keep], floors.reference()))
    assert values[-1] >= 0 and math.isfinite(values[-1])
    params = parent.data.params
    assert float(params["floor_clean_acc"]) == pytest.approx(0.1) and float(params["floor_robust_acc"]) == 0.0
    assert "chance 1/10" in parent.data.tags["brsearch.floor"]
    # the parquet's feasible column is the same floor, and the front only holds feasible trials
    assert (df["feasible"] == ((df["status"] == "completed") & (df["clean_acc"] > 0.1))).all()
    assert df.loc[df["pareto"], "feasible"].all()
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/hypervolume.png" in plots


# --------------------------------------------------------------- the benchmark's bookkeeping


def _bench():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "search_efficiency.py"
    spec = importlib.util.spec_from_file_location("search_efficiency", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_budget_fraction_on_synthetic_curves():
    b = _bench()
    setting = b.Setting("t", "t", epochs=2, full_trials=5, grace_period=1, reduction_factor=2, flags=())
    assert setting.budget == 10
    curve = [[0, 0.0], [2, 0.1], [6, 0.3], [12, 0.5]]  # the last point is past the budget
    assert b.hv_at(curve, 10) == 0.3 and b.hv_at(curve, 1) == 0.0
    assert b.first_reach(curve, 0.3, 10) == pytest.approx(0.6)
    assert b.first_reach(curve, 0.5, 10) is None  # reached only after the budget
    runs = [
        {"method": "random", "seed": 0, "curve": [[0, 0.0], [4, 0.2], [10, 0.4]]},
        {"method": "random", "seed": 1, "curve": [[0, 0.0], [2, 0.2]]},
        {"method": b.MOASHA, "seed": 0, "curve": [[0, 0.0], [3, 0.35]]},
        {"method": b.MOASHA, "seed": 1, "curve": [[0, 0.0], [5, 0.1]]},
    ]
    for r in runs:
        r.update(trials_started=5, completed=5, stopped=0, wall_s=1.0)
    s = b.summarize(setting, runs)
    assert s["target_hv"] == pytest.approx(0.3)  # mean of random's finals 0.4 and 0.2
    rnd, mo = s["methods"]["random"], s["methods"][b.MOASHA]
    assert rnd["budget_fraction"] == [1.0, None] and rnd["budget_fraction_mean"] == pytest.approx(1.0)
    assert mo["budget_fraction"] == [pytest.approx(0.3), None]
    assert mo["budget_fraction_mean"] == pytest.approx(0.65) and mo["lower_bound"] and mo["reached"] == 1
    assert mo["final_hv_mean"] == pytest.approx(0.225)
    # seeds redrawn: (0, 0) -> target 0.4, both 1.0; (1, 1) -> 0.2, random 0.2 and MO-ASHA 1.0;
    # mixed -> 0.3, random 1.0 and MO-ASHA 0.65 (the run above)
    assert mo["budget_fraction_interval"] == (pytest.approx(0.65), 1.0)
    assert rnd["budget_fraction_interval"] == (pytest.approx(0.2), 1.0)
    with pytest.raises(SystemExit, match="--full-trials 0: give a positive count"):
        b.main(["--quick", "--full-trials", "0"])


def test_benchmark_variants_get_their_own_key_and_flags():
    """--full-trials and --set make a variant of a setting with its own cache key; its --set comes
    after the setting's own, so it wins; a bad option is refused in one line before any sweep."""
    b = _bench()
    args = b.build_parser().parse_args(["--quick", "--full-trials", "24", "--set", "batch_size=16"])
    (v,) = b.variants([b.DIGITS], args)
    assert v.key == "digits-24t-batch_size16" and v.budget == 24 * b.DIGITS.epochs
    assert v.flags[:len(b.DIGITS.flags)] == b.DIGITS.flags and v.flags[-2:] == ("--set", "batch_size=16")
    from search.driver import build_parser
    from search.optimizer import parse_sets
    sets = build_parser().parse_args(list(v.flags)).set
    assert parse_sets(sets)["batch_size"] == 16
    assert b.variants([b.DIGITS], b.build_parser().parse_args(["--quick"])) == [b.DIGITS]
    for bad, msg in (("batch_size=0", "batch_size=0; accepted: an integer >= 1"),
                     ("batchsize=16", "--set 'batchsize': unknown parameter")):
        with pytest.raises(SystemExit, match=msg):
            b.main(["--quick", "--set", bad])


def test_rung_replay_spends_the_same_budget_and_stops_trials(tmp_path):
    """benchmarks/rung_replay.py on a synthetic pool: FIFO completes budget / epochs trials;
    MO-ASHA spends the same epochs on more trials, so it completes fewer; the oracle finds at least
    FIFO's hypervolume; a pool mixing trial lengths is refused."""
    import importlib.util
    import json
    import random

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "rung_replay.py"
    spec = importlib.util.spec_from_file_location("rung_replay", path)
    rr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rr)
    rng = random.Random(0)
    results = []
    for t in range(10):
        acc, sparse = rng.uniform(0.3, 0.9), rng.choice([0.0, 0.0, 0.3])
        results += [{"trial_id": f"t{t}", "epoch": e, "values": [acc * e / 4, acc * e / 8, sparse * (e > 1)]}
                    for e in range(1, 5)]
    (tmp_path / "a.json").write_text(json.dumps({"run": {"results": results}}))
    pool = rr.load_pool([str(tmp_path / "a.json")])
    assert len(pool) == 10 and len(pool[0]) == 4
    fifo = rr.replay(pool, 48, random.Random(1), None)
    assert len(fifo) - 1 == 12 and fifo[-1][0] == 48  # 12 completions, the last at the budget
    moasha = rr.replay(pool, 48, random.Random(1), (1, 3, "crowding"))
    assert max(c for c, _ in moasha) <= 48 and len(moasha) - 1 < 12  # stopped trials spent epochs
    # the oracle stops after epoch 1 exactly the trials that end dense: it completes only sparse
    # ones, every sparse one of FIFO's 12 among them (same draw order), so its hypervolume is no lower
    assert [rr.useless(t) for t in pool] == [t[-1][2] == 0 for t in pool]
    oracle = rr.replay(pool, 48, random.Random(1), "oracle")
    assert max(c for c, _ in oracle) <= 48 and oracle[-1][1] >= fifo[-1][1] > 0
    assert rr.first_reach([(0, 0.0), (12, 0.1), (24, 0.3)], 0.3, 48) == 0.5
    assert rr.first_reach([(0, 0.0), (12, 0.1)], 0.3, 48) == 1.0
    results.append({"trial_id": "short", "epoch": 1, "values": [0.5, 0.2, 0.0]})
    (tmp_path / "b.json").write_text(json.dumps({"run": {"results": results}}))
    with pytest.raises(SystemExit, match="mixes trials"):
        rr.load_pool([str(tmp_path / "b.json")])
