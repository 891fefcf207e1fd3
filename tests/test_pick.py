"""`python -m search.pick`: the rules on constructed fronts whose answer is known (fast), and on a
real 4-trial digits sweep (real local Ray, Optuna storage, sqlite MLflow store and registry,
onnxruntime; slow): the pick exports the packed file (exactly the trial's size_kib) and ONNX,
re-checks the test accuracy in onnxruntime against PyTorch, registers one version with its
lineage, and a second identical call adds none; bad input writes and registers nothing; the
parent run carries the front views, and `--compare` plots two sweeps' fronts (both checked in
headless chromium where it is installed)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _browser import chromium, probe
from _mlflow_store import mlflow_uri

from search.posthoc import (
    RuleError,
    accuracy_intervals,
    choose,
    indistinguishable,
    knee_index,
    onnx_recheck,
    parse_rule,
    write_files,
)

ROOT = Path(__file__).resolve().parents[1]
OBJ3 = ("clean_acc", "robust_acc", "channel_sparsity")


# --- the rules, on fronts whose answer is known ---------------------------------------------------
def test_knee_of_a_two_objective_front_is_the_bulge():
    # a straight trade-off from (0, 1) to (1, 0) with one point bulging out at (0.7, 0.6)
    pts = np.array([[0.0, 1.0], [0.25, 0.75], [0.5, 0.5], [0.7, 0.6], [0.9, 0.1], [1.0, 0.0]])
    assert knee_index(pts, ("clean_acc", "robust_acc")) == 3
    # the same front with accuracies in percent and the second objective as bytes to minimize
    as_bytes = np.column_stack([pts[:, 0] * 100, 50 - 40 * pts[:, 1]])
    assert knee_index(as_bytes, ("clean_acc", "size_kib")) == 3
    # moving the bulge inwards onto the line leaves a tie, broken by the lowest row
    flat = pts.copy()
    flat[3] = [0.6, 0.4]
    assert knee_index(flat, ("clean_acc", "robust_acc")) == 0


def test_knee_in_three_objectives_and_degenerate_fronts():
    pts = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0.5], [0.4, 0.3, 0.3]], dtype=float)
    assert knee_index(pts, OBJ3) == 3
    assert knee_index(pts[[4, 0, 1, 2, 3]], OBJ3) == 4  # the row order does not matter
    assert knee_index(pts[:1], OBJ3) == 0
    # two points: the extremes cannot span a plane; the equal-weight normal takes the larger sum
    assert knee_index(np.array([[0.2, 0.9, 0.0], [0.6, 0.6, 0.1]]), OBJ3) == 1


def _front() -> pd.DataFrame:
    return pd.DataFrame({"trial_id": ["a", "b", "c", "d"], "clean_acc": [0.9, 0.8, 0.7, 0.6],
                         "robust_acc": [0.3, 0.5, 0.6, 0.6], "channel_sparsity": [0.0, 0.1, 0.2, 0.3],
                         "size_kib": [40.0, 20.0, 12.0, 12.0]})


def test_where_and_optimize_choose_the_known_trial():
    f = _front()
    rule = parse_rule(False, "robust_acc>=0.5,size_kib<=25", None, "size_kib")
    pos, meeting = choose(f, rule, OBJ3)
    assert meeting == ["b", "c", "d"]
    assert f.iloc[pos]["trial_id"] == "c"  # c and d tie at 12 KiB: c has the higher clean_acc (first objective)
    assert f.iloc[choose(f, parse_rule(False, "size_kib<30", "clean_acc", None), OBJ3)[0]]["trial_id"] == "b"
    assert f.iloc[choose(f, parse_rule(False, None, "robust_acc", None), OBJ3)[0]]["trial_id"] == "c"  # tie: clean_acc
    with pytest.raises(RuleError, match="no front trial meets"):
        choose(f, parse_rule(False, "robust_acc>=0.61", "clean_acc", None), OBJ3)


@pytest.mark.parametrize("flags, message", [
    ((False, None, None, None), "exactly one of"),
    ((True, None, "clean_acc", None), "exactly one of"),
    ((False, "accuracy>=0.5", "clean_acc", None), "unknown metric 'accuracy'"),
    ((False, None, "test_clean_acc", None), "test-split"),
    ((False, "test_robust_acc>=0.5", "clean_acc", None), "test-split"),
    ((False, "robust_acc=>0.5", "clean_acc", None), "cannot read"),
    ((False, None, "size_kib", None), "size_kib is minimized"),
    ((False, None, None, "robust_acc"), "robust_acc is maximized"),
])
def test_bad_rules_are_one_line(flags, message):
    with pytest.raises(RuleError, match=message) as e:
        parse_rule(*flags)
    assert "\n" not in str(e.value)


def test_bootstrap_intervals_and_indistinguishable_trials():
    row = pd.Series({"trial_id": "a", "clean_acc": 0.8, "robust_acc": 0.5})
    (lo, hi), (rlo, rhi) = accuracy_intervals(row, ("clean_acc", "robust_acc"), 400).values()
    half = 1.96 * (0.8 * 0.2 / 400) ** 0.5  # the normal approximation's half width
    assert lo < 0.8 < hi and abs((hi - lo) / 2 - half) < 0.2 * half
    assert rlo < 0.5 < rhi and rhi - rlo > hi - lo  # p = 0.5 is the widest
    f = pd.DataFrame({"trial_id": ["a", "near", "far"], "clean_acc": [0.80, 0.79, 0.60],
                      "robust_acc": [0.50, 0.52, 0.50]})
    assert indistinguishable(f, 0, ("clean_acc", "robust_acc"), 400) == ["near"]
    assert indistinguishable(f, 0, ("clean_acc", "robust_acc"), 20) == ["near", "far"]  # 20 images tell little


def _tiny(seed: int):
    """A 2-bit, depth-8 EnResNet with the test-time noise, as a trial exports it (untrained)."""
    import torch

    from trainables import export as ex
    from trainables.config import QuantConfig, TrainConfig
    from trainables.models import build_model
    from trainables.quant import export_state_dict, quantize_

    torch.manual_seed(seed)
    cfg = TrainConfig(depth=8, width=4, ensemble=1, noise=0.1, dataset="digits")
    cfg.quant = QuantConfig(bits=2)
    model = build_model(8, 4, 1, 10, 1, 0.1)
    sd = export_state_dict(model, quantize_(model, cfg.quant))
    return cfg, sd, ex.model_from_state_dict(sd, cfg)


def test_onnx_recheck_agrees_with_pytorch_and_catches_another_model(tmp_path):
    import torch

    from trainables import export as ex
    from trainables.models import noise

    cfg, sd, ref = _tiny(0)
    line, _, problems = write_files(sd, cfg, ref, tmp_path, "m", meta=None, check=True, onnx=True)
    assert not problems and Path(line["packed"]).stat().st_size == len(ex.packed_file(sd, cfg)[1])
    x = torch.rand(48, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), noise(ref, False):
        y = ref(x).argmax(1)  # labels the noise-free model gets right: the noise makes some of them uncertain
    header = ex.read_header(line["packed"])
    got = onnx_recheck(ref, header, Path(line["onnx"]), x, y, draws=25, batch=16, seed=0, max_draws=200)
    assert got["torch_test_clean_acc_noise_off"] == got["onnx_test_clean_acc_noise_off"] == 1.0
    assert got["noise_off_disagreements"] == 0 and got["test_n"] == 48
    assert 25 <= got["test_draws"] <= 200 and got["torch_test_clean_acc"] < 1.0  # the noise is on
    gap = abs(got["torch_test_clean_acc"] - got["onnx_test_clean_acc"])
    assert gap <= max(0.005, 4 * got["test_diff_se"]), got
    # the ONNX file of another model: told apart on the same images
    cfg2, sd2, ref2 = _tiny(1)
    other, _, _ = write_files(sd2, cfg2, ref2, tmp_path, "other", meta=None, onnx=True)
    bad = onnx_recheck(ref, header, Path(other["onnx"]), x, y, draws=25, batch=16, seed=0, max_draws=25)
    assert abs(bad["torch_test_clean_acc"] - bad["onnx_test_clean_acc"]) > 0.05, bad


# --- a real sweep ----------------------------------------------------------------------------------
SETS = {"depth": "8", "width": "4", "attack_steps": "2", "proxy_eval_size": "64", "cw": "false",
        "eval_attack.steps": "2", "batch_size": "32"}
MODEL = "pick-test"


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@pytest.fixture(scope="module")
def sweep4(tmp_path_factory):
    """A real 4-trial, 1-epoch digits sweep (tiny models) tracked in a sqlite MLflow store."""
    tmp = tmp_path_factory.mktemp("pick-sweep")
    cmd = [sys.executable, "-m", "search.pareto", "--name", "pk", "--trials", "4", "--epochs", "1",
           "--subset-train", "300", "--subset-test", "100", "--quiet", "--num-cpus", "2",
           "--storage-path", str(tmp / "results"), "--tracking-uri", mlflow_uri(tmp)]
    for k, v in SETS.items():
        cmd += ["--set", f"{k}={v}"]
    p = subprocess.run(cmd, cwd=tmp, env=_env(), capture_output=True, text=True, timeout=900, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp


def _pick(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.pick", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=600, check=False)


def _pick_here(args: list[str], capsys) -> tuple[int, str, str]:
    """search.pick in this process (as the subprocess runs it, minus the interpreter start)."""
    from search.pick import main

    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _reported(tmp: Path, trial_id: str) -> dict:
    """The trial's own final report (its final checkpoint's state.pt metrics)."""
    import torch

    from search.storage import SweepLocation

    ck = SweepLocation(str(tmp / "results"), "pk").final_checkpoint(trial_id)
    return torch.load(ck / "state.pt", map_location="cpu", weights_only=False)["metrics"]


@pytest.mark.slow
def test_pick_exports_rechecks_and_registers_once(sweep4, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    tmp = sweep4
    trials = pd.read_parquet(tmp / "results/pk/trials.parquet")
    front = trials[trials["pareto"]]
    x = float(front["robust_acc"].median())
    meets = front[front["robust_acc"] >= x]
    sizes = {t: _reported(tmp, t)["size_kib"] for t in meets["trial_id"]}
    want = min(sorted(sizes), key=lambda t: sizes[t])  # ties: any of them is the smallest
    args = ["--name", "pk", "--storage-path", "results", "--where", f"robust_acc>={x}", "--minimize", "size_kib",
            "--out", "out", "--register", MODEL]
    p = _pick(*args, cwd=tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "95% CI" in p.stdout and "cannot be told apart from" in p.stdout
    pick = json.loads((tmp / "out/pick.json").read_text())
    assert sizes[pick["trial_id"]] == sizes[want]
    packed, onnx = tmp / "out" / pick["files"]["packed"], tmp / "out" / pick["files"]["onnx"]
    assert packed.stat().st_size == pick["size_bytes"] == sizes[pick["trial_id"]] * 1024  # exact, not an estimate
    assert onnx.stat().st_size > 0
    assert abs(pick["torch_test_clean_acc"] - pick["onnx_test_clean_acc"]) <= 0.005, pick
    assert pick["torch_test_clean_acc_noise_off"] == pick["onnx_test_clean_acc_noise_off"]
    assert pick["test_n"] == 100 and pick["noise_off_disagreements"] == 0
    assert set(pick["objectives"]) >= {*OBJ3, "size_kib"} and pick["rule"].startswith("minimize size_kib")
    assert pick["registered"]["created"] is True and pick["registered"]["version"] == "1"

    client = MlflowClient(mlflow_uri(tmp))
    (v,) = client.search_model_versions(f"name = '{MODEL}'")
    sweep = json.loads((tmp / "results/pk/brsearch/sweep.json").read_text())
    parent = client.get_run(sweep["parent_run_id"])
    assert v.tags["brsearch.sweep"] == "pk" and v.tags["brsearch.trial_id"] == pick["trial_id"]
    assert v.tags["brsearch.git_sha"] == parent.data.tags["git_sha"]
    assert v.tags["brsearch.dataset"] == "digits"
    assert json.loads(v.tags["brsearch.config"])["depth"] == 8
    assert json.loads(v.tags["brsearch.objectives"]) == pick["objectives"]
    assert client.get_model_version_by_alias(MODEL, "picked").version == v.version
    assert client.get_run(v.run_id).data.tags["ray_trial_id"] == pick["trial_id"]  # the trial's own run
    import mlflow.onnx

    mlflow.set_tracking_uri(mlflow_uri(tmp))
    assert mlflow.onnx.load_model(f"models:/{MODEL}@picked").SerializeToString() == \
        __import__("onnx").load(str(onnx)).SerializeToString()

    # a second identical call adds no version
    monkeypatch.chdir(tmp)
    rc, out, err = _pick_here(args, capsys)
    assert rc == 0, err
    assert "already registered" in out
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 1


@pytest.mark.slow
def test_pick_knee_without_registry(sweep4, capsys, monkeypatch):
    monkeypatch.chdir(sweep4)
    rc, out, err = _pick_here(["--name", "pk", "--storage-path", "results", "--knee", "--out", "knee"], capsys)
    assert rc == 0, err
    pick = json.loads((sweep4 / "knee/pick.json").read_text())
    trials = pd.read_parquet(sweep4 / "results/pk/trials.parquet")
    front = trials[trials["pareto"]].reset_index(drop=True)
    assert pick["trial_id"] == front.iloc[knee_index(front[list(OBJ3)].to_numpy(float), OBJ3)]["trial_id"]
    assert pick["rule"] == "knee" and "registered" not in pick


@pytest.mark.slow
def test_pick_bad_input_writes_and_registers_nothing(sweep4, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(sweep4)
    base = ["--storage-path", "results", "--out", "bad", "--register", "bad-model"]
    cases = [
        (["--name", "nosuch", "--knee"], "no finished sweep"),
        (["--name", "pk", "--where", "robust_acc>=1.01", "--minimize", "size_kib"], "no front trial meets"),
        (["--name", "pk", "--where", "accuracy>=0.5", "--minimize", "size_kib"], "unknown metric 'accuracy'"),
        (["--name", "pk", "--maximize", "test_clean_acc"], "test-split"),
        (["--name", "pk", "--knee", "--alias", "v1"], "--alias"),
        (["--compare", "pk"], "--compare"),
    ]
    for args, message in cases:
        rc, out, err = _pick_here(args + base, capsys)
        assert rc == 2, (args, out, err)
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (sweep4 / "bad").exists(), args
    assert not MlflowClient(mlflow_uri(sweep4)).search_registered_models("name = 'bad-model'")


@pytest.mark.slow
def test_parent_run_views_and_compare_in_a_browser(sweep4, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    tmp = sweep4
    sweep = json.loads((tmp / "results/pk/brsearch/sweep.json").read_text())
    client = MlflowClient(mlflow_uri(tmp))
    names = {f.path for f in client.list_artifacts(sweep["parent_run_id"], "plots")}
    assert {"plots/pareto_front_3d.html", "plots/parallel_coordinates.html"} <= names
    trials = pd.read_parquet(tmp / "results/pk/trials.parquet")
    shown = int(trials[list(OBJ3)].notna().all(axis=1).sum())
    # a second sweep's files under another name: two fronts in one plot
    shutil.copytree(tmp / "results/pk", tmp / "results/pk2")
    monkeypatch.chdir(tmp)
    rc, out, err = _pick_here(["--compare", "pk,pk2", "--storage-path", "results", "--out", "cmp"], capsys)
    assert rc == 0, err
    if chromium() is None:
        pytest.skip("no chromium (apt-get install chromium): the views were written, not opened")
    n_front = int(trials["pareto"].sum())
    for rel, want in (("plots/pareto_front_3d.html", shown), ("plots/parallel_coordinates.html", shown)):
        local = Path(client.download_artifacts(sweep["parent_run_id"], rel, str(tmp)))
        page = probe(local)
        assert page["errors"] == [], (rel, page["errors"])
        (plot,) = page["plots"]
        assert sum(t["n"] for t in plot["traces"]) == want, (rel, plot)
    page = probe(tmp / "cmp/compare.html")
    assert page["errors"] == []
    counts = {t["name"].split(" (")[0]: t["n"] for t in page["plots"][0]["traces"]}
    # identical fronts: every point of both is on the combined front (no copy dominates its twin)
    assert counts == {"pk": n_front, "pk2": n_front, "combined front": 2 * n_front}
