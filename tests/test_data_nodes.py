"""Data on every node: trials prepare their data where they run, under a
per-node file lock, so concurrent `--download`s on one node fetch once; a node without the data
fails the trial with one line. (The missing-data trial on a launched worker is in
test_cluster_autoscale.py.)"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainables.config import TrainConfig
from trainables.data import DataError, load_data

ROOT = Path(__file__).resolve().parents[1]

# what a trial's preparation does under the lock: fetch only if nobody has yet
PREPARE = """
import os, sys, time
from trainables.fileio import node_lock
root, log = sys.argv[1], sys.argv[2]
with node_lock(root, "mnist"):
    with open(log, "a") as f: f.write(f"start {os.getpid()}\\n")
    if not os.path.exists(os.path.join(root, "MNIST")):
        time.sleep(0.5)  # the download
        os.makedirs(os.path.join(root, "MNIST"))
        with open(log, "a") as f: f.write("download\\n")
    with open(log, "a") as f: f.write(f"end {os.getpid()}\\n")
"""


def test_concurrent_preparations_on_one_node_download_once(tmp_path):
    root, log = tmp_path / "data", tmp_path / "log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE, str(root), str(log)], env=env) for _ in range(3)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    lines = log.read_text().splitlines()
    assert lines.count("download") == 1, lines
    events = [ln for ln in lines if ln != "download"]
    # never two inside at once: start/end pairs of the same process, one after the other
    assert all(a.split()[0] == "start" and b == "end " + a.split()[1] for a, b in zip(events[::2], events[1::2])), lines
    assert (root / ".mnist.lock").exists()


def test_missing_dataset_is_one_line_naming_the_node(tmp_path):
    cfg = TrainConfig.from_flat({"dataset": "mnist", "data_root": str(tmp_path / "empty"), "download": False})
    with pytest.raises(DataError) as e:
        load_data(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "'mnist' not found" in msg and "on node " in msg and str(tmp_path / "empty") in msg


def test_cluster_driver_leaves_the_data_check_to_the_trials(tmp_path):
    """On a cluster the head runs no trial, so its lack of the data set is no error: the check
    passes on to the address (unreachable here, which is what fails)."""
    from search.driver import Flags, prepare

    args = ["--dataset", "mnist", "--data-root", str(tmp_path / "empty"), "--storage-path", str(tmp_path / "r"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    with pytest.raises(DataError, match="not found"):
        prepare(Flags.parse(args))
    from trainables.config import ConfigError

    with pytest.raises(ConfigError, match="cannot reach the Ray cluster"):
        prepare(Flags.parse([*args, "--address", "127.0.0.1:1"]))
