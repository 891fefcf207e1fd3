"""Objectives a user chooses (`--objectives`, 2 to 4, each with its direction), the footprint
metrics every trial reports (size_kib, latency_ms), and sweeps that build on sweeps
(`--warm-start`).

Real components: the trainable's own loop, real onnxruntime, real local Ray through the CLI in a
subprocess, the real Optuna journal, a real sqlite MLflow store. The fronts are checked against
a plain O(n^2) definition written here, with each objective's direction applied by hand.
"""
from __future__ import annotations

import subprocess

import pytest
from test_sweep import TINY, _cmd, _env, _explain, mlflow_runs, run_cli, split_runs

from trainables.config import TrainConfig
from trainables.contract import (
    LATENCY_MS,
    LATENCY_SPREAD_MS,
    LATENCY_THREADS,
    MAXIMIZE,
    MINIMIZE,
    SIZE_KIB,
    ObjectiveError,
    parse_objectives,
)


def _tiny_cfg(**kw) -> TrainConfig:
    kw.setdefault("epochs", 1)
    cfg = TrainConfig(dataset="digits", batch_size=64, subset_train=200, subset_test=50, width=4,
                      proxy_eval_size=32, cw=False, eval_draws=1, **kw)
    cfg.train_attack.steps = 1
    cfg.eval_attack.steps = 1
    cfg.validate()
    return cfg


@pytest.mark.parametrize("bits", [1, 2, 32])
def test_every_run_reports_the_exact_size_of_its_packed_file_and_its_latency(tmp_path, bits):
    from trainables.export import packed_file, write_packed
    from trainables.loop import Hooks, train

    reports = []

    class Keep(Hooks):
        def report(self, metrics, checkpoint, final):
            reports.append((dict(metrics), checkpoint, final))

    cfg = _tiny_cfg(latency="every", latency_runs=5)
    cfg.quant.bits = bits
    train(cfg, Keep())
    metrics, ck, final = reports[-1]
    assert final
    written = write_packed(ck["quantized_model"], cfg, tmp_path / "m.brpk")  # what search.pick writes: no meta
    assert written["meta"] == {}
    assert metrics[SIZE_KIB] * 1024 == (tmp_path / "m.brpk").stat().st_size  # exact, not an estimate
    assert metrics[SIZE_KIB] * 1024 == len(packed_file(ck["quantized_model"], cfg)[1])
    assert metrics[LATENCY_MS] > 0 and metrics[LATENCY_SPREAD_MS] >= 0 and metrics[LATENCY_THREADS] == 1


def test_fewer_bits_make_a_smaller_file_and_latency_follows_the_mode():
    from trainables.loop import Hooks, train

    class Keep(Hooks):
        def __init__(self):
            self.seen = []

        def report(self, metrics, checkpoint, final):
            self.seen.append(dict(metrics))

    sizes = {}
    for bits, mode in ((1, "off"), (4, "end")):
        hooks = Keep()
        cfg = _tiny_cfg(latency=mode, epochs=2, latency_runs=3)
        cfg.quant.bits = bits
        train(cfg, hooks)
        seen = hooks.seen
        assert all(SIZE_KIB in m for m in seen)  # every epoch, so MO-ASHA's rungs can rank on it
        assert [LATENCY_MS in m for m in seen] == ([False, False] if mode == "off" else [False, True])
        sizes[bits] = seen[-1][SIZE_KIB]
    assert sizes[1] < sizes[4]


def test_parse_objectives_names_directions_and_refusals():
    assert parse_objectives("clean_acc,robust_acc,size_kib") == (
        ("clean_acc", "robust_acc", "size_kib"), (MAXIMIZE, MAXIMIZE, MINIMIZE))
    assert parse_objectives("robust_acc:max, latency_ms:min")[1] == (MAXIMIZE, MINIMIZE)
    for bad, says in (("clean_acc,accuracy", "unknown objective 'accuracy'"), ("size_kib:max,clean_acc", "unknown direction 'max'"),
                      ("clean_acc", "2 to 4"), ("clean_acc,clean_acc", "given twice"),
                      ("clean_acc,robust_acc,channel_sparsity,size_kib,latency_ms", "2 to 4"),
                      ("clean_acc,size_kib:down", "unknown direction 'down'")):
        with pytest.raises(ObjectiveError, match=says) as e:
            parse_objectives(bad)
        assert "\n" not in str(e.value) and "accepted" in str(e.value) or "2 to 4" in says or "twice" in says


@pytest.mark.parametrize("args,says", [
    (["--objectives", "clean_acc,bytes"], "--objectives: unknown objective 'bytes'"),
    (["--objectives", "size_kib:max,clean_acc"], "unknown direction 'max' for size_kib"),
    (["--max-size-kib", "0"], "--max-size-kib 0.0; accepted: a number > 0"),
    (["--warm-start", "nope"], "--warm-start nope: no sweep of that name"),
])
def test_bad_objective_and_warm_start_flags_fail_in_one_line_and_write_nothing(tmp_path, args, says):
    proc = subprocess.run(_cmd(tmp_path, "--name", "x", *args), cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, _explain(proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and says in lines[0], proc.stderr
    assert not (tmp_path / "results" / "x").exists() and not (tmp_path / "mlflow.db").exists()


def _minded(points: dict[str, tuple[float, ...]], directions: tuple[str, ...]) -> set[str]:
    """The non-dominated set by definition, each objective in its own direction (independent of
    search.front)."""
    def better_eq(a, b, d):
        return a >= b if d == MAXIMIZE else a <= b

    keep = set()
    for i, a in points.items():
        if not any(all(better_eq(bv, av, d) for av, bv, d in zip(a, b, directions))
                   and any(bv != av for av, bv in zip(a, b)) for j, b in points.items() if j != i):
            keep.add(i)
    return keep


def _trials(tmp, name):
    import pyarrow.parquet as pq

    return pq.read_table(tmp / "results" / name / "trials.parquet").to_pylist()


def _study(tmp, name):
    import optuna

    from search.storage import SweepLocation, open_study_storage

    loc = SweepLocation(str(tmp / "results"), name)
    return optuna.load_study(study_name=name, storage=open_study_storage(loc.study_spec()))


@pytest.mark.slow
def test_a_size_objective_sweep_then_warm_started_sweeps(tmp_path):
    """`--objectives clean_acc,size_kib`: every trial reports its size, the front is the
    non-dominated set with size minimized, Optuna and MLflow know the directions. Then a sweep
    `--warm-start`ed from it imports its finished trials (not re-run, labelled), and its first
    proposal differs from a cold start's with the same seed: TPE fits on the imported trials."""
    common = [*TINY, "--epochs", "1", "--sampler", "tpe", "--objectives", "clean_acc,size_kib", "--max-concurrent", "2"]
    proc = run_cli(tmp_path, "--name", "a", "--trials", "4", *common, "--set", "bits=1", "--register", "m")
    assert proc.returncode == 0, _explain(proc)
    rows = _trials(tmp_path, "a")
    done = [r for r in rows if r["status"] == "completed"]
    assert len(done) == 4 and all(r[SIZE_KIB] > 0 and r[LATENCY_MS] > 0 for r in done)
    feasible = {r["trial_id"]: (r["clean_acc"], r[SIZE_KIB]) for r in done if r["feasible"]}
    assert {r["trial_id"] for r in rows if r["pareto"]} == _minded(feasible, (MAXIMIZE, MINIMIZE))
    assert [d.name for d in _study(tmp_path, "a").directions] == ["MAXIMIZE", "MINIMIZE"]
    parents, children = split_runs(mlflow_runs(tmp_path))
    assert parents[0].data.params["objectives"] == "clean_acc,size_kib" and len(children) == 4
    assert all(SIZE_KIB in c.data.metrics for c in children)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    front = [r for r in rows if r["pareto"]]
    smallest = min(front, key=lambda r: r[SIZE_KIB])[SIZE_KIB]
    best = client.get_model_version_by_alias("m", "best-size-kib")
    assert best.tags["brsearch.trial_id"] in {r["trial_id"] for r in front if r[SIZE_KIB] == smallest}

    # a conflicting space is refused before anything is written
    proc = run_cli(tmp_path, "--name", "bad", "--trials", "1", *common, "--set", "bits=1", "--set", "width=8",
                   "--warm-start", "a")
    assert proc.returncode == 2 and "--warm-start a: its space conflicts" in proc.stderr, _explain(proc)
    assert not (tmp_path / "results" / "bad").exists()

    # the warm start searches bits too: the old sweep's pinned bits=1 answers that parameter
    warm = run_cli(tmp_path, "--name", "warm", "--trials", "1", *common, "--warm-start", "a", "--seed", "3")
    assert warm.returncode == 0, _explain(warm)
    assert "--warm-start a: 4 finished trial(s) imported" in warm.stderr
    cold = run_cli(tmp_path, "--name", "cold", "--trials", "1", *common, "--seed", "3")
    assert cold.returncode == 0, _explain(cold)
    study = _study(tmp_path, "warm")
    imported = [t for t in study.trials if t.user_attrs.get("brsearch.imported_from") == "a"]
    own = [t for t in study.trials if "brsearch.imported_from" not in t.user_attrs]
    assert len(imported) == 4 and len(own) == 1
    assert sorted(t.user_attrs["brsearch.source_trial"] for t in imported) == sorted(r["trial_id"] for r in done)
    first_cold = [t for t in _study(tmp_path, "cold").trials][0]
    assert own[0].params != first_cold.params
    table = _trials(tmp_path, "warm")
    assert sorted(r["trial_id"] for r in table if r.get("imported_from") == "a") == sorted(r["trial_id"] for r in done)
    assert sum(1 for r in table if r.get("imported_from") is None) == 1  # one trial ran; none re-ran
    assert len(split_runs(mlflow_runs(tmp_path))[1]) == 4 + 1 + 1  # a's, warm's and cold's children


def test_latency_is_measured_when_the_exporter_merges_identical_pruned_weights():
    """Two conv layers pruned to all zeros are one initializer in the exported graph, which the QDQ
    rewrite cannot name: the trial still gets its latency (the float-weight graph is timed)."""
    import torch

    from trainables import onnx_export as ox
    from trainables.export import model_from_state_dict, packed_file
    from trainables.footprint import latency
    from trainables.loop import Hooks, train

    got = []

    class Keep(Hooks):
        def report(self, metrics, checkpoint, final):
            got.append(checkpoint)

    cfg = _tiny_cfg(latency="off")
    cfg.quant.bits = 2
    train(cfg, Keep())
    sd = dict(got[-1]["quantized_model"])
    for k in ("members.0.blocks.0.conv1.weight", "members.0.blocks.0.conv2.weight"):
        sd[k] = torch.zeros_like(sd[k])
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(RuntimeError, match="lacks the weights"):  # the case this guards
        ox.onnx_bytes(model_from_state_dict(sd, cfg), x, qdq=ox.weight_codes(model_from_state_dict(sd, cfg),
                                                                            packed_file(sd, cfg)[0]))
    assert latency(sd, cfg, x, runs=3)[LATENCY_MS] > 0
