"""A sweep on a real autoscaler: Ray's fake multi-node provider launches
"GPU worker" nodes on demand (GPUs are logical, so trials run with device=cpu). The head declares
no CPU and no GPU (as cluster.yaml's head: trials never run there); the only worker type has
1 CPU and 1 GPU, min_workers 0, max_workers 2. `python -m search.pareto` runs with NO resource
flags: every trial must ask for a GPU, run on a launched worker, and 2 must run at once. Then a
sweep on a data set no worker has: each trial fails alone with a one-line reason.

The cluster gets its own --temp-dir, port and token, and is stopped by killing exactly its own
processes (plain `ray stop` would stop every Ray instance on the machine), whatever happens.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from _mlflow_store import mlflow_uri

from search.driver import (
    ResourceRequest,
    capacity,
    default_per_trial,
    node_types_from_config,
    plan_resources,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--subset-train", "200", "--subset-test", "50", "--epochs", "1", "--quiet", "--set", "device=cpu",
        "--set", "depth=8", "--set", "width=4", "--set", "attack_steps=2", "--set", "proxy_eval_size=32",
        "--set", "cw=false", "--set", "eval_attack.steps=2"]


def fake_cluster_config(gcs_address: str) -> dict:
    return {
        "cluster_name": "brsearch-fake", "max_workers": 2,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0, "GPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default", "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_of(marks: list[str]) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(m in cmd for m in marks):
            out.append(int(p.name))
    return out


def stop_cluster(marks: list[str]) -> None:
    """Kill this cluster's processes only (SIGTERM, then SIGKILL)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        pids = _pids_of(marks)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline and _pids_of(marks):
            time.sleep(0.2)


@pytest.fixture
def fake_cluster(tmp_path):
    import ray._private.services

    temp_dir = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: Ray's socket paths must fit
    port = _free_port()
    ip = ray._private.services.get_node_ip_address()
    address = f"{ip}:{port}"
    cfg_path = tmp_path / "fake-cluster.yaml"
    cfg_path.write_text(yaml.safe_dump(fake_cluster_config(address)))
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(16), PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    marks = [temp_dir, f"--gcs-address={address}", f"--port={port}"]
    try:
        start = subprocess.run(
            ["ray", "start", "--head", "--num-cpus", "0", "--num-gpus", "0", f"--port={port}", f"--temp-dir={temp_dir}",
             "--include-dashboard=false", f"--autoscaling-config={cfg_path}", "--disable-usage-stats"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
        yield {"address": address, "env": env, "config": cfg_path, "temp_dir": temp_dir}
    finally:
        stop_cluster(marks)
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_sweep_on_an_autoscaling_cluster_asks_for_gpus_and_grows(fake_cluster, tmp_path):
    import pandas as pd
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
    from ray.tune import ExperimentAnalysis

    proc = subprocess.run(
        [sys.executable, "-m", "search.pareto", "--address", fake_cluster["address"], "--name", "auto",
         "--trials", "3", "--seed", "0", "--storage-path", str(tmp_path / "results"),
         # a fresh worker per trial: with 3-second trials, a reused one would run every trial on
         # the first node before the fake provider brings the second up (longer trials spread)
         "--no-reuse-actors", "--tracking-uri", mlflow_uri(tmp_path), *TINY],
        cwd=tmp_path, env=fake_cluster["env"], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "2 at once (1 CPU, 1 GPU each" in proc.stdout, proc.stdout[-3000:]
    exp = tmp_path / "results" / "auto"
    trials = pd.read_parquet(exp / "trials.parquet")
    assert len(trials) == 3 and (trials["status"] == "completed").all(), trials[["trial_id", "status", "reason"]]
    nodes = set(trials["node_id"])
    assert FAKE_HEAD_NODE_ID not in nodes and all(n.startswith("fffff") for n in nodes), nodes  # launched workers
    assert len(nodes) == 2, nodes  # both workers the cluster can grow to were launched
    for t in ExperimentAnalysis(str(exp)).trials:  # every trial asked for a GPU
        assert t.placement_group_factory.required_resources == {"CPU": 1.0, "GPU": 1.0}, t.placement_group_factory
    # as many at once as the cluster can grow to: the autoscaler saw both trials' placement groups
    # pending together and queued both workers in one launch. (Whether the trials' run intervals
    # then overlap depends on how fast the fake provider brings the second node up against a
    # 3-second trial, so that is not asserted: CI once ran them back to back on two nodes.)
    monitor = "".join(f.read_text(errors="replace")
                      for f in Path(fake_cluster["temp_dir"]).glob("session_latest/logs/monitor.*"))
    assert "2+ pending placement groups" in monitor or "Queue 2 new nodes" in monitor, monitor[-3000:]
    record = json.loads((exp / "brsearch" / "sweep.json").read_text())
    assert (record["cpus_per_trial"], record["gpus_per_trial"], record["max_concurrent"]) == (1.0, 1.0, 2)
    assert "fake-cluster.yaml" in record["source"]

    # a data set the workers do not have: each trial fails alone, with one line saying where
    nodata = subprocess.run(
        [sys.executable, "-m", "search.pareto", "--address", fake_cluster["address"], "--name", "nodata",
         "--trials", "2", "--max-failures", "0", "--dataset", "mnist", "--data-root", str(tmp_path / "no-data"),
         "--storage-path", str(tmp_path / "results"), "--tracking-uri", mlflow_uri(tmp_path), *TINY],
        check=False, cwd=tmp_path, env=fake_cluster["env"], capture_output=True, text=True, timeout=1500)
    failed = pd.read_parquet(tmp_path / "results" / "nodata" / "trials.parquet")
    assert nodata.returncode == 1 and len(failed) == 2, nodata.stdout[-3000:] + nodata.stderr[-3000:]
    assert (failed["status"] == "failed").all(), failed[["trial_id", "status", "reason"]]
    for reason in failed["reason"]:
        assert "\n" not in reason and "DataError: dataset 'mnist' not found" in reason and "on node" in reason, reason


# --- the arithmetic, fast ----------------------------------------------------------------------------

def test_resources_from_node_types():
    aws = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = node_types_from_config(aws)
    assert default_per_trial(types) == (4.0, 1.0)  # g5.xlarge: 4 CPU with its one GPU
    assert capacity(types, 4.0, 1.0, aws["max_workers"]) == 4  # 4 workers x 1 trial, none on the head
    assert capacity(types, 1.0, 0.0, aws["max_workers"]) == 16
    r = plan_resources(ResourceRequest(None, None, None, 100), [], aws, "x")
    assert (r.cpus_per_trial, r.gpus_per_trial, r.max_concurrent) == (4.0, 1.0, 4)
    r = plan_resources(ResourceRequest(None, 0.5, None, 3), [], aws, "x")
    assert (r.gpus_per_trial, r.max_concurrent) == (0.5, 3)  # capped at the trial count
    # the global max_workers caps all worker types together
    cfg = {"max_workers": 3, "head_node_type": "h", "available_node_types": {
        "h": {"resources": {"CPU": 8}}, "a": {"resources": {"CPU": 2, "GPU": 2}, "max_workers": 2},
        "b": {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 5}}}
    t = node_types_from_config(cfg)
    assert capacity(t, 1.0, 1.0, 3) == 2 * 2 + 1  # two 2-GPU nodes, then one 1-GPU node
    assert capacity(t, 1.0, 0.0, 3) == 8 + 3 * 4  # the head's 8, then three of the roomiest type (b)
    with pytest.raises(ValueError, match="can ever hold"):
        plan_resources(ResourceRequest(1, 4, None, 3), [], cfg, "x")


def test_resources_without_autoscaler_come_from_the_nodes():
    nodes = [{"Alive": True, "NodeManagerAddress": "h", "Resources": {"CPU": 2.0, "node:__internal_head__": 1.0}},
             {"Alive": True, "NodeManagerAddress": "w", "Resources": {"CPU": 8.0, "GPU": 2.0}},
             {"Alive": False, "NodeManagerAddress": "x", "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    r = plan_resources(ResourceRequest(None, None, None, 10), nodes, None, "x")
    assert (r.cpus_per_trial, r.gpus_per_trial, r.max_concurrent) == (4.0, 1.0, 2)
    r = plan_resources(ResourceRequest(None, None, 1, 10), nodes, None, "x")
    assert r.max_concurrent == 1
