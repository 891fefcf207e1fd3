"""benchmarks/replay.py and benchmarks/record_curves.py: the recorded-curves benchmark's
bookkeeping on a synthetic recording (the simulated clock, draws without replacement, ERT, the
oracle, the last JSON line), and a real recording of two tiny configurations."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _recording(path: Path, configs: int = 24, epochs: int = 6, seconds: float = 2.0) -> Path:
    """Curves of `configs` configurations of the digits space: every epoch takes `seconds`; a third
    end sparse; accuracies rise with the learning rate, so the front is a few known configs."""
    rc = _load("record_curves")
    from search.optimizer import load_space

    rows = []
    for k, p in enumerate(rc.draw_configs(load_space("digits"), configs, 0)):
        q = 0.5 + 2 * p["lr"]
        sparse = 0.6 * (k % 3 == 0)
        for e in range(1, epochs + 1):
            rows.append({"config_id": k, "config_hash": str(k), "max_epochs": epochs, "epoch": e,
                         "clean_acc": q * e / epochs, "robust_acc": q * e / epochs / 2,
                         "channel_sparsity": sparse * e / epochs, "epoch_time_s": seconds, "report_s": seconds,
                         "final": e == epochs, "diverged": False, **{"p_" + n: v for n, v in p.items()}})
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def test_replay_clock_budget_and_draws_without_replacement(tmp_path):
    rp = _load("replay")
    from search.front import Floors
    from search.optimizer import load_space

    curves, epochs = rp.load(_recording(tmp_path / "c.parquet"))
    assert len(curves) == 24 and epochs == 6
    floors, space = Floors.for_sweep("digits"), load_space("digits")
    front = rp.pool_front(curves, floors)
    # FIFO, 2 workers, every epoch 2 s, a budget of 30 s: each worker completes 2 trials (12 s
    # each), the fifth and sixth end at 36 s, past the budget
    fifo = rp.replay(curves, epochs, "fifo", "random", 0, 2, 30.0, floors, front, space)
    assert fifo.completed == 4 and fifo.started == 6 and not fifo.stopped
    assert [t for t, _ in fifo.curve[1:]] == [12.0, 12.0, 24.0, 24.0][:len(fifo.curve) - 1]
    for method in ("moasha", "asha", "oracle"):
        run = rp.replay(curves, epochs, method, "tpe", 1, 3, 60.0, floors, front, space)
        assert len(set(run.configs)) == len(run.configs) == run.started  # without replacement
        assert run.stopped and run.completed + len(run.stopped) <= run.started
    oracle = rp.replay(curves, epochs, "oracle", "random", 0, 2, 1e9, floors, front, space)
    assert oracle.started == 24 and set(oracle.configs) == set(range(24))  # the pool, once
    assert set(oracle.stopped) == set(range(24)) - front  # stops exactly the trials off the front
    assert oracle.curve[-1][1] == pytest.approx(rp.hypervolume_of(curves, front, floors))


def test_ert_counts_unreached_runs_as_time_spent():
    rp = _load("replay")
    hit, miss = rp.Run(curve=[(0.0, 0.0), (3.0, 0.5)]), rp.Run(curve=[(0.0, 0.0), (5.0, 0.1)])
    assert rp.ert([hit, miss], 0.5, 10.0) == pytest.approx((3 + 10) / 1)
    assert rp.ert([miss], 0.5, 10.0) == math.inf
    assert rp.auc(hit, 10.0, 1.0) == pytest.approx(0.5 * 7 / 10)


@pytest.mark.slow
def test_replay_cli_ends_with_one_json_line(tmp_path):
    rec = _recording(tmp_path / "c.parquet")
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "replay.py"), "--recording", str(rec),
                          "--seeds", "3", "--sampler", "random", "--workers", "2", "--seed", "5"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"ert_speedup", "ert_speedup_ci_low", "auc_ratio", "seeds"} <= set(last) and last["seeds"] == 3
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "replay.py"), "--recording", str(rec),
                          "--methods", "fifo", "hyperband"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "hyperband" in bad.stderr


@pytest.mark.slow
def test_record_curves_records_every_epoch_and_resumes(tmp_path):
    out = tmp_path / "curves.parquet"
    cmd = [sys.executable, str(REPO / "benchmarks" / "record_curves.py"), "--epochs", "2", "--workers", "1",
           "--out", str(out), "--set", "depth=8", "width=4", "subset_train=200", "subset_test=50",
           "attack_steps=1", "proxy_eval_size=32", "cw=false", "eval_draws=1"]
    first = subprocess.run([*cmd, "--configs", "1"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run([*cmd, "--configs", "2"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert second.returncode == 0 and "1 of 2 configs recorded, 1 to run" in second.stdout, second.stdout
    df = pd.read_parquet(out)
    assert sorted(df.groupby("config_id")["epoch"].apply(list)) == [[1, 2], [1, 2]]
    assert df["final"].tolist().count(True) == 2 and (df["report_s"] > 0).all()
    assert np.isfinite(df[["clean_acc", "robust_acc", "channel_sparsity"]].to_numpy()).all()
    assert {"p_lr", "p_bits", "p_group_lasso"} <= set(df.columns)


def test_syne_tune_rule_as_shipped_stops_a_trial_that_dominates_its_rung():
    """Syne Tune 0.16's bracket reads NonDominatedPriority's argsort as priorities: a vector that
    dominates its whole rung is stopped; with the argsort turned into ranks it continues."""
    pytest.importorskip("syne_tune")
    rp = _load("replay")
    rung = [[0.5, 0.5], [0.4, 0.4], [0.3, 0.3], [0.9, 0.9]]
    for patched, want in ((False, True), (True, False)):
        rule = rp.SyneTuneRule(27, patched)
        assert [rule.stop(str(i), 1, np.array(v)) for i, v in enumerate(rung)][-1] is want
