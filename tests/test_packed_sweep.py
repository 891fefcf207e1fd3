"""Several trials per GPU: a sweep with fractional GPUs end to end, on Ray's logical GPUs.

A real local Ray cluster (`ray.cluster_utils.Cluster`) whose one node declares 2 CPUs and one
GPU; this machine has no CUDA, so trials pin `device=cpu` and the GPU is only Ray's bookkeeping,
which is what packing is about: with `--gpus-per-trial 0.25` four trials share the one GPU at
once. Plus the refusals of a pinned CUDA device that the trials could not use.
"""
from __future__ import annotations

import subprocess

import pytest
from test_sweep import TINY, _cmd, _env, _explain, mlflow_runs, run_cli, split_runs


@pytest.mark.slow
def test_four_trials_share_one_logical_gpu(tmp_path):
    import pandas as pd
    from ray import tune
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False})
    try:
        proc = run_cli(tmp_path, "--name", "packed", "--trials", "4", "--gpus-per-trial", "0.25",
                       "--cpus-per-trial", "0.5", "--address", cluster.address, "--set", "device=cpu",
                       *TINY, "--epochs", "1", "--subset-train", "120", "--subset-test", "40")
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, _explain(proc)
    assert "4 at once (0.5 CPU, 0.25 GPU each)" in proc.stdout, proc.stdout[-2000:]
    exp = tmp_path / "results" / "packed"
    trials = pd.read_parquet(exp / "trials.parquet")
    assert len(trials) == 4 and (trials["status"] == "completed").all()
    for t in tune.ExperimentAnalysis(str(exp)).trials:  # each trial held a quarter of the GPU
        assert t.placement_group_factory.required_resources == {"CPU": 0.5, "GPU": 0.25}
    # the four ran at the same time: every child run overlaps every other one
    _, children = split_runs(mlflow_runs(tmp_path))
    spans = [(r.info.start_time, r.info.end_time) for r in children]
    assert len(spans) == 4
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans


REFUSED = {
    "no-gpu": (["--set", "device=cuda", "--gpus-per-trial", "0"], ["device=cuda", "no GPU", "--gpus-per-trial"]),
    "index": (["--set", "device=cuda:1", "--gpus-per-trial", "0.25"], ["device=cuda:1", "cuda:0"]),
}


def test_pinned_cuda_without_trial_gpus_is_refused_before_ray(tmp_path):
    procs = {}
    for case, (args, _) in REFUSED.items():
        d = tmp_path / case
        d.mkdir()
        procs[case] = (d, subprocess.Popen(_cmd(d, "--trials", "1", *args), cwd=d, env=_env(),
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for case, (d, p) in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, (case, stderr[-2000:])
        for needle in REFUSED[case][1]:
            assert needle in lines[0], (case, lines[0])
        assert not (d / "results").exists() and not (d / "mlflow.db").exists(), case


def test_device_refusal_rules():
    from search.driver import device_refusal

    assert device_refusal(None, 0) is None
    assert device_refusal("cpu", 0) is None and device_refusal("auto", 0.5) is None
    assert device_refusal("cuda", 0.25) is None and device_refusal("cuda:0", 1) is None
    assert device_refusal("cuda:1", 2) is None
    assert "no GPU" in device_refusal("cuda", 0)
    assert "cuda:0 to cuda:0" in device_refusal("cuda:1", 0.5)
    assert "cuda:0 to cuda:1" in device_refusal("cuda:2", 2)
