"""End to end tests of `python -m search.pareto`, plus fast unit tests of search spaces.

Real local Ray, a real sqlite MLflow store and the real Optuna sqlite storage, no mocks. The CLI
runs in a subprocess (as users run it; it also keeps each test's Ray session apart), in a
temporary directory, with tiny trials on the embedded digits data:

* a 4-trial sweep: the printed front == the non-dominated set of trials.parquet (recomputed
  here, independently) == pareto.parquet, and MLflow holds one parent run with its artifacts and
  four finished child runs whose `pareto` tags match the front;
* a sweep on a two-node `ray.cluster_utils.Cluster` runs trials on both nodes;
* a sweep stopped with SIGINT part-way and then `--resume`d ends with exactly the requested
  trials, each logged once under the same parent, and no Optuna trial or MLflow run left RUNNING;
* bad CLI input fails with one `error:` line and exit code 2 before Ray starts or anything is
  written.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _mlflow_store import mlflow_db
from _study import sweep_study

from trainables.config import ConfigError, known_keys

# tiny trials: a depth-8, width-4 EnResNet, 300 training images, 2-step attacks, no CW
TINY_SETS = {"depth": "8", "width": "4", "attack_steps": "2", "proxy_eval_size": "64", "cw": "false",
             "eval_attack.steps": "2"}
TINY = ["--subset-train", "300", "--subset-test", "100", "--epochs", "2", "--quiet"]
for _k, _v in TINY_SETS.items():
    TINY += ["--set", f"{_k}={_v}"]
OBJECTIVES = ("clean_acc", "robust_acc", "channel_sparsity")
ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)  # never join a cluster the test did not start
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _cmd(tmp: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "search.pareto", *args,
            "--storage-path", str(tmp / "results"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"]


def run_cli(tmp: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    mlflow_db(tmp)
    return subprocess.run(_cmd(tmp, *args), cwd=tmp, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


def printed_front(stdout: str) -> list[str]:
    """The trial ids of the front table `search.pareto` prints at the end."""
    lines = stdout.splitlines()
    start = max(i for i, ln in enumerate(lines) if ln.startswith("Pareto front of "))
    out = []
    body = lines[start + 1:]
    assert body and body[0].split()[0] == "trial_id", f"no front table in:\n{stdout[-2000:]}"
    for ln in body[1:]:
        if not ln.strip():
            break
        out.append(ln.split()[0])
    return out


def non_dominated(points: dict[str, tuple[float, ...]]) -> set[str]:
    """Plain O(n^2) definition, all objectives maximised: a is dominated iff some b is >= in every
    objective and > in one. (Independent of search.front on purpose.)"""
    keep = set()
    for i, a in points.items():
        dominated = any(
            all(bv >= av for av, bv in zip(a, b)) and any(bv > av for av, bv in zip(a, b))
            for j, b in points.items() if j != i
        )
        if not dominated:
            keep.add(i)
    return keep


def mlflow_runs(tmp: Path, experiment: str = "brsearch") -> list:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000)


def split_runs(runs: list) -> tuple[list, list]:
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_tiny_keys_exist():
    keys = set(known_keys())
    assert set(TINY_SETS) <= keys, set(TINY_SETS) - keys


# --- a 4-trial sweep ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep4(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("sweep4")
    t0 = time.monotonic()
    proc = run_cli(tmp, "--name", "s4", "--trials", "4", "--max-concurrent", "2", "--num-cpus", "2",
                   "--seed", "0", "--register", "s4-front", *TINY)
    assert proc.returncode == 0, _explain(proc)
    return {"tmp": tmp, "proc": proc, "exp": tmp / "results" / "s4", "wall": time.monotonic() - t0}


@pytest.mark.slow
def test_sweep_front_matches_trials(sweep4):
    import pandas as pd

    exp = sweep4["exp"]
    trials = pd.read_parquet(exp / "trials.parquet")
    pareto = pd.read_parquet(exp / "pareto.parquet")
    assert len(trials) == 4 and trials["trial_id"].is_unique
    assert (trials["status"] == "completed").all(), trials[["trial_id", "status", "reason"]]
    for m in OBJECTIVES:
        assert trials[m].notna().all() and trials[m].between(0, 1).all(), trials[m]
    # the test split, evaluated once per trial, beside the (validation) objectives
    for m in ("test_clean_acc", "test_robust_acc", "test_fgsm_acc"):
        assert trials[m].notna().all() and trials[m].between(0, 1).all(), trials[m]
        assert m in pareto.columns
    done = trials[trials["status"] == "completed"]
    useful = done[done["clean_acc"] > 0.1]  # the floor: trials at chance (1/10) are kept off the front
    assert set(trials.loc[trials["feasible"], "trial_id"]) == set(useful["trial_id"])
    expected = non_dominated({r.trial_id: tuple(float(getattr(r, m)) for m in OBJECTIVES)
                              for r in useful.itertuples()})
    assert expected, "a non-empty set of feasible trials has a non-empty front"
    printed = printed_front(sweep4["proc"].stdout)
    assert len(printed) == len(set(printed))
    assert set(printed) == expected
    assert set(pareto["trial_id"]) == expected and len(pareto) == len(expected)
    assert set(trials.loc[trials["pareto"], "trial_id"]) == expected
    # the front rows carry the same objective values as the trial rows
    merged = pareto.merge(trials, on="trial_id", suffixes=("", "_t"))
    for m in OBJECTIVES:
        assert (merged[m] - merged[f"{m}_t"]).abs().max() < 1e-12
    # CSV copies beside the Parquet files
    assert (exp / "trials.csv").is_file() and (exp / "pareto.csv").is_file()
    # Tune's per-trial result files, and no TensorBoard event files (search.driver.NoTensorBoard)
    assert all((exp / f"trial_{t}" / "result.json").is_file() for t in trials["trial_id"])
    assert not list(exp.glob("trial_*/events.out.tfevents*"))
    # each trial's newest checkpoint holds every report so far, as Tune's result.json has them
    # (the record a replay reads for epochs a crash took out of result.json)
    for t in trials["trial_id"]:
        stored = [json.loads(ln) for ln in (exp / f"trial_{t}" / "result.json").read_text().splitlines()]
        newest = max((exp / f"trial_{t}").glob("checkpoint_*"))
        reports = json.loads((newest / "reports.json").read_text())
        assert [r["epoch"] for r in reports] == [r["epoch"] for r in stored] == [1, 2], t
        for r, s in zip(reports, stored):
            assert all(r[m] == s[m] for m in OBJECTIVES), (t, r, s)
    # the Tune trainable says which node ran it (one local node here)
    assert trials["node_id"].notna().all() and trials["node_id"].nunique() == 1


@pytest.mark.slow
def test_sweep_mlflow_runs(sweep4):
    import pandas as pd
    from mlflow.tracking import MlflowClient

    tmp, exp = sweep4["tmp"], sweep4["exp"]
    trials = pd.read_parquet(exp / "trials.parquet").set_index("trial_id")
    front = set(pd.read_parquet(exp / "pareto.parquet")["trial_id"])
    parents, children = split_runs(mlflow_runs(tmp))
    assert len(parents) == 1, [p.info.run_name for p in parents]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags.get("sweep") == "s4"
    assert len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["ray_trial_id"] for c in children} == set(trials.index)
    for c in children:
        tid = c.data.tags["ray_trial_id"]
        assert c.info.status == "FINISHED", (tid, c.info.status)
        for m in OBJECTIVES:
            assert m in c.data.metrics, (tid, m, sorted(c.data.metrics))
            # the latest value (the final report) is what trials.parquet holds
            assert math.isclose(c.data.metrics[m], trials.loc[tid, m], rel_tol=1e-9, abs_tol=1e-12), (tid, m)
        for m in ("test_clean_acc", "test_robust_acc"):
            assert math.isclose(c.data.metrics[m], trials.loc[tid, m], rel_tol=1e-9, abs_tol=1e-12), (tid, m)
        assert c.data.tags.get("pareto") == ("true" if tid in front else "false"), tid
        assert c.data.tags.get("brsearch.status") == "completed"
        assert c.data.params.get("epochs") == "2"
    # the parent: the front as a table, plots, the result tables, the hypervolume
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    pid = parent.info.run_id
    top = {a.path for a in client.list_artifacts(pid)}
    assert {"plots", "results", "pareto_front.json"} <= top, top
    plots = [a.path for a in client.list_artifacts(pid, "plots")]
    assert any(p.endswith(".png") for p in plots) and any(p.endswith(".html") for p in plots), plots
    results = {Path(a.path).name for a in client.list_artifacts(pid, "results")}
    assert {"trials.parquet", "pareto.parquet"} <= results, results
    assert "hypervolume" in parent.data.metrics
    # against the floor (0.1, 0, 0): only trials above chance with some channel sparsity add volume
    from search.front import Floors, hypervolume

    pts = trials.loc[sorted(front), list(OBJECTIVES)].to_numpy(float)
    assert parent.data.metrics["hypervolume"] == pytest.approx(hypervolume(pts, Floors.for_sweep("digits").reference()))
    assert parent.data.metrics.get("n_pareto") == len(front)
    # (MlflowClient.load_table would search the *default* tracking store: read the file itself)
    table = json.loads(Path(client.download_artifacts(pid, "pareto_front.json", str(tmp / "dl"))).read_text())
    assert set(table["data"][i][table["columns"].index("trial_id")] for i in range(len(table["data"]))) == front


@pytest.mark.slow
def test_sweep_optuna_study(sweep4):
    import optuna

    study = sweep_study(sweep4["exp"], "s4")
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 4 and len(states) == 4
    # optuna-dashboard and load_study show the objectives by name
    assert study.metric_names == list(OBJECTIVES)


@pytest.mark.slow
def test_sweep_logged_models_and_summary(sweep4):
    """Every finished trial's quantized model is an MLflow logged model of its child run, with
    the run's params, its final metrics, a signature and an input example, tagged pareto; the
    parent carries the summary; the sweep prints the runs-view link at start and end."""
    import mlflow
    import pandas as pd
    import torch
    from mlflow.tracking import MlflowClient

    tmp, exp = sweep4["tmp"], sweep4["exp"]
    trials = pd.read_parquet(exp / "trials.parquet").set_index("trial_id")
    front = set(pd.read_parquet(exp / "pareto.parquet")["trial_id"])
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("brsearch")
    parents, children = split_runs(mlflow_runs(tmp))
    run_of = {c.data.tags["ray_trial_id"]: c.info.run_id for c in children}
    models = client.search_logged_models([experiment.experiment_id], order_by=[{"field_name": "metrics.robust_acc", "ascending": False}])
    assert sorted(m.tags["brsearch.trial_id"] for m in models) == sorted(trials.index)
    robust = [next(x.value for x in m.metrics if x.key == "robust_acc") for m in models]
    assert robust == sorted(robust, reverse=True), "the Models view sorts by a final metric"
    for m in models:
        tid = m.tags["brsearch.trial_id"]
        assert m.source_run_id == run_of[tid] and m.status.value == "READY"
        assert m.tags["pareto"] == ("true" if tid in front else "false")
        assert m.params["bits"] == str(trials.loc[tid, "config.bits"]) and m.params["epochs"] == "2"
        final = {x.key: x.value for x in m.metrics}
        for k in OBJECTIVES:
            assert math.isclose(final[k], trials.loc[tid, k], rel_tol=1e-9, abs_tol=1e-12), (tid, k)
        assert {x.step for x in m.metrics} == {2}
    # loadable with MLflow alone, with its signature and input example
    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info(models[0].model_uri)
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 8, 8]
    assert info.saved_input_example_info is not None
    net = mlflow.pytorch.load_model(models[0].model_uri)
    assert net(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    # the parent's summary
    summary = parents[0].data.metrics
    assert summary["front_size"] == len(front) and summary["n_completed"] == 4 and summary["cpu_hours"] > 0
    for bits, group in trials.groupby("config.bits"):
        assert math.isclose(summary[f"best_clean_acc.{int(bits)}bit"], group["clean_acc"].max())
        assert math.isclose(summary[f"best_robust_acc.{int(bits)}bit"], group["robust_acc"].max())
    from search.front import Floors

    assert parents[0].data.tags["floor"] == Floors.for_sweep("digits").describe()  # chance on digits
    # --register: the front in the Model Registry, one version per front trial, with aliases
    versions = client.search_model_versions("name = 's4-front'")
    assert sorted(v.tags["brsearch.trial_id"] for v in versions) == sorted(front)
    aliases = set(client.get_registered_model("s4-front").aliases)
    assert aliases == {f"front-{t}" for t in front} | {"best-clean-acc", "best-robust-acc", "best-channel-sparsity"}
    best = client.get_model_version_by_alias("s4-front", "best-robust-acc").tags["brsearch.trial_id"]
    assert trials.loc[best, "robust_acc"] == trials.loc[list(front), "robust_acc"].max()
    link = f"/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    assert sweep4["proc"].stdout.count(f"open     http://127.0.0.1:5000{link}") == 2


@pytest.mark.slow
def test_reuse_actors_gives_the_same_trials(sweep4, tmp_path):
    """By default later trials run in earlier trials' worker processes; --no-reuse-actors starts a
    fresh one per trial. Wall time changes, results must not (every trial seeds itself; the
    sampler's draws do not depend on timing)."""
    import pandas as pd

    proc = run_cli(tmp_path, "--name", "s4", "--trials", "4", "--max-concurrent", "2", "--num-cpus", "2",
                   "--seed", "0", "--no-reuse-actors", *TINY)
    assert proc.returncode == 0, _explain(proc)

    def outcomes(exp: Path) -> list[tuple]:
        df = pd.read_parquet(exp / "trials.parquet")
        assert (df["status"] == "completed").all(), df[["trial_id", "status", "reason"]]
        cols = sorted(c for c in df.columns if c.startswith("config.") and c != "config.data_root")

        def key(v: object, digits: int) -> str:  # repr: NaN (an unused conditional) compares equal
            return repr(round(float(v), digits)) if isinstance(v, float) else repr(v)

        return sorted(tuple(key(r[c], 9) for c in cols) + tuple(key(r[m], 6) for m in (*OBJECTIVES, "weight_sparsity"))
                      for _, r in df.iterrows())

    assert outcomes(tmp_path / "results" / "s4") == outcomes(sweep4["exp"])

    def worker_pids(exp: Path) -> set[int]:  # Tune stamps every result with the worker's pid
        return {json.loads(f.read_text().splitlines()[-1])["pid"] for f in exp.glob("trial_*/result.json")}

    assert len(worker_pids(sweep4["exp"])) < 4  # reused by default
    assert len(worker_pids(tmp_path / "results" / "s4")) == 4  # a fresh process per trial
    sweep_json = json.loads((tmp_path / "results" / "s4" / "brsearch" / "sweep.json").read_text())
    assert sweep_json["reuse_actors"] is False


# --- stop and resume ---------------------------------------------------------------------------

def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"sweep exited ({proc.returncode}) before printing {text!r}:\n{path.read_text()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no {text!r} within {timeout}s:\n{path.read_text()[-3000:]}")


@pytest.mark.slow
def test_sweep_interrupted_and_resumed(tmp_path):
    import optuna
    import pandas as pd

    name, args = "r", ["--trials", "4", "--max-concurrent", "1", "--num-cpus", "2", "--seed", "1", *TINY]
    out, err = tmp_path / "first.out", tmp_path / "first.err"
    mlflow_db(tmp_path)
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(_cmd(tmp_path, "--name", name, *args), cwd=tmp_path, env=_env(),
                                stdout=fo, stderr=fe, text=True)
        try:
            _wait_for(out, "[1/4]", proc, timeout=300)
            os.kill(proc.pid, signal.SIGINT)  # Tune saves the experiment state and stops
            rc = proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
    first = pd.read_parquet(tmp_path / "results" / name / "trials.parquet")
    assert rc == 130, f"exit {rc}\n{out.read_text()[-3000:]}\n{err.read_text()[-3000:]}"
    hint = [ln for ln in err.read_text().splitlines() if "continue with: python -m search.pareto" in ln]
    assert len(hint) == 1, err.read_text()[-3000:]
    resume_cmd = hint[0].split("continue with: python ", 1)[1].split()
    assert 1 <= (first["status"] == "completed").sum() < 4, first[["trial_id", "status"]]
    # a trial the interrupt caught is neither stopped nor failed, and stays off the front
    assert set(first["status"]) <= {"completed", "interrupted"}, first[["trial_id", "status", "reason"]]
    assert not first.loc[first["status"] == "interrupted", "pareto"].any()
    parents, _ = split_runs(mlflow_runs(tmp_path))
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
    parent_id = parents[0].info.run_id

    # the command the interrupted sweep printed, as is, from another directory: the sweep's flags,
    # space and tracking URI come from the stored sweep
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # a trial count other than the stored one would be ignored by Tune's restore: refused up front
    bad = subprocess.run([sys.executable, *resume_cmd, "--trials", "9"], cwd=elsewhere, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, _explain(bad)
    assert "--trials 9 differs from the stored sweep's 4" in bad.stderr and not any(elsewhere.iterdir())
    assert resume_cmd[:2] == ["-m", "search.pareto"] and "--resume" in resume_cmd, resume_cmd
    proc2 = subprocess.run([sys.executable, *resume_cmd], cwd=elsewhere, env=_env(), capture_output=True,
                           text=True, timeout=400)
    assert proc2.returncode == 0, _explain(proc2)
    assert not (elsewhere / "mlflow.db").exists()

    trials = pd.read_parquet(tmp_path / "results" / name / "trials.parquet")
    assert len(trials) == 4 and trials["trial_id"].is_unique, trials[["trial_id", "status"]]
    assert (trials["status"] == "completed").all(), trials[["trial_id", "status", "reason"]]
    # finished trials were kept, not re-run
    assert set(first.loc[first["status"] == "completed", "trial_id"]) <= set(trials["trial_id"])
    assert set(printed_front(proc2.stdout)) == set(trials.loc[trials["pareto"], "trial_id"])

    study = sweep_study(tmp_path / "results" / name, name)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 4, states
    assert optuna.trial.TrialState.RUNNING not in states, states
    assert {t.user_attrs.get("ray_trial_id") for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.COMPLETE} == set(trials["trial_id"])

    runs = mlflow_runs(tmp_path)
    parents, children = split_runs(runs)
    assert [p.info.run_id for p in parents] == [parent_id]
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 4, sorted(c.data.tags.get("ray_trial_id") for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent_id}
    assert sorted(c.data.tags["ray_trial_id"] for c in children) == sorted(trials["trial_id"])
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    assert all(c.info.status == "FINISHED" for c in children)
    front = set(trials.loc[trials["pareto"], "trial_id"])
    assert {c.data.tags["ray_trial_id"] for c in children if c.data.tags.get("pareto") == "true"} == front

    # resuming with a different pinned value is refused before anything runs
    from search.driver import Flags, prepare

    with pytest.raises(ConfigError, match="differ from the stored sweep"):
        prepare(Flags.parse(["--name", name, "--resume", "--storage-path", str(tmp_path / "results"),
                                           "--epochs", "5"]))


# --- bad input -----------------------------------------------------------------------------------

BAD_SPACE_YAML = """\
params:
  lr: {type: float, low: 0.2, high: 0.02, log: true}
  bits: {type: categorical, choices: [1, 2]}
"""

BAD_INPUTS = {
    "sampler": ["--sampler", "cmaes"],
    "set-unknown-key": ["--set", "no_such_key=1"],
    "set-bad-value": ["--set", "bits=9"],
    "space-inverted-range": ["--space", "bad_space.yaml"],
    "resume-missing": ["--name", "nothing_here", "--resume"],
}


@pytest.mark.slow
def test_bad_cli_input_fails_fast_with_one_line(tmp_path):
    """All cases run at once (each is mostly interpreter start-up and imports)."""
    procs = {}
    for case, args in BAD_INPUTS.items():
        d = tmp_path / case
        d.mkdir()
        (d / "bad_space.yaml").write_text(BAD_SPACE_YAML)
        procs[case] = (d, time.monotonic(), subprocess.Popen(
            _cmd(d, *args), cwd=d, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errors = {}
    for case, (d, t0, p) in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        elapsed = time.monotonic() - t0
        lines = stderr.strip().splitlines()
        assert p.returncode == 2, (case, p.returncode, stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, stderr[-2000:])
        assert elapsed < 30, (case, elapsed)
        assert not (d / "results").exists(), case  # nothing written...
        assert not (d / "mlflow.db").exists(), case
        assert "Ray" not in stdout + stderr, case  # ...and Ray never started
        errors[case] = lines[0]
    # the messages name what was wrong
    assert "cmaes" in errors["sampler"]
    assert "no_such_key" in errors["set-unknown-key"]
    assert "bits" in errors["set-bad-value"]
    assert "inverted range" in errors["space-inverted-range"]
    assert "nothing_here" in errors["resume-missing"]


# --- search spaces (in-process, fast) ------------------------------------------------------------

def test_paper_space_validates():
    from search.optimizer import load_space

    space = load_space("paper")
    space.validate()
    assert {"bits", "lambda0", "lambda_final", "phase2_start", "loss", "alpha", "beta", "group_lasso", "lr"} <= set(space.params)
    # every parameter is sampled in every trial (samplers model them jointly: test_sampler_space.py)
    assert not any(p.get("when") or p.get("allow_zero") for p in space.params.values())
    assert space.params["group_lasso"]["zero_below"] > space.params["group_lasso"]["low"]


CONDITIONAL = {  # a user space with conditional parameters (still supported; see docs/search.md)
    "params": {
        "bits": {"type": "categorical", "choices": [1, 2, 4]},
        "loss": {"type": "categorical", "choices": ["mix", "trades"]},
        "alpha": {"type": "float", "low": 0.0, "high": 0.5, "when": {"loss": "mix"}},
        "beta": {"type": "float", "low": 1.0, "high": 10.0, "log": True, "when": {"loss": "trades"}},
        "group_lasso": {"type": "float", "low": 1e-5, "high": 3.0, "log": True, "allow_zero": True},
        "lr": {"type": "float", "low": 0.02, "high": 0.2, "log": True},
    },
    "fixed": {"group_mode": "prox"},
}


def test_conditional_params_define_by_run():
    import optuna

    from search.optimizer import Space

    space = Space("conditional", CONDITIONAL["params"], CONDITIONAL["fixed"])
    space.validate()
    study = optuna.create_study(directions=["maximize"] * 3, sampler=optuna.samplers.RandomSampler(seed=0))
    seen_losses = set()
    for _ in range(30):
        trial = study.ask()
        cfg = space.suggest(trial)
        seen_losses.add(cfg["loss"])
        assert ("alpha" in cfg) == (cfg["loss"] == "mix"), cfg
        assert ("beta" in cfg) == (cfg["loss"] == "trades"), cfg
        assert ("alpha" in trial.params) == (cfg["loss"] == "mix")  # Optuna saw the same structure
        assert ("beta" in trial.params) == (cfg["loss"] == "trades")
        assert cfg["bits"] in (1, 2, 4)
        assert 0.02 <= cfg["lr"] <= 0.2
        assert cfg["group_lasso"] == 0 or 1e-5 <= cfg["group_lasso"] <= 3.0
        assert cfg["group_mode"] == "prox"  # a fixed value reaches every trial
        study.tell(trial, [0.5, 0.5, 0.5])
    assert seen_losses == {"mix", "trades"}


def test_set_pins_remove_params_from_search():
    import optuna

    from search.optimizer import parse_sets

    pins = parse_sets(["bits=2", "loss=trades", "lr=0.05"])
    assert pins == {"bits": 2, "loss": "trades", "lr": 0.05}
    from search.optimizer import Space

    space = Space("conditional", CONDITIONAL["params"], CONDITIONAL["fixed"]).pin(pins)
    space.validate()
    assert not {"bits", "loss", "lr"} & set(space.params)
    assert {"bits": 2, "loss": "trades", "lr": 0.05}.items() <= space.fixed.items()
    study = optuna.create_study(directions=["maximize"] * 3, sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(5):
        trial = study.ask()
        cfg = space.suggest(trial)
        assert cfg["bits"] == 2 and cfg["loss"] == "trades" and cfg["lr"] == 0.05
        assert "beta" in cfg and "alpha" not in cfg  # the pinned loss still drives the condition
        assert not {"bits", "loss", "lr"} & set(trial.params)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)


@pytest.mark.parametrize("item", ["bits=9", "no_such_key=1", "nokey", "lr=abc", "val_fraction=0"])
def test_bad_sets_are_refused(item):
    from search.optimizer import parse_sets

    with pytest.raises(ConfigError):
        parse_sets([item])


def test_yaml_space_round_trip(tmp_path):
    import yaml

    from search.optimizer import load_space

    paper = load_space("paper")
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"params": paper.params, "fixed": paper.fixed}))
    loaded = load_space(str(path))
    loaded.validate()
    assert loaded.params == paper.params and loaded.fixed == paper.fixed
    assert loaded.fingerprint() == paper.fingerprint()


def test_fingerprint_tracks_the_space():
    from search.optimizer import load_space

    a = load_space("paper")
    b = load_space("paper")
    assert a.fingerprint() == b.fingerprint()
    b.params = {**b.params, "lr": {**b.params["lr"], "high": 0.3}}
    assert a.fingerprint() != b.fingerprint()
    assert a.pin({"bits": 2}).fingerprint() != a.fingerprint()
    assert a.pin({"bits": 2}).fingerprint() != a.pin({"bits": 4}).fingerprint()


@pytest.mark.parametrize("param, message", [
    ({"type": "float", "low": 0.2, "high": 0.02}, "inverted range"),
    ({"type": "float", "low": 0.0, "high": 0.1, "log": True}, "log scale"),
    ({"type": "categorical", "choices": [1, 9]}, "bits"),
    ({"type": "float", "low": 0.1, "high": 0.2, "when": {"loss": "mix"}}, "when"),
])
def test_invalid_spaces_are_refused(tmp_path, param, message):
    import yaml

    from search.optimizer import load_space

    name = "bits" if param["type"] == "categorical" else "lr"
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"params": {name: param}}))
    with pytest.raises(ConfigError, match=message):
        load_space(str(path)).validate()
