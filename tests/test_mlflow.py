"""MLflow from the driver: a tracking server that goes away, the runs-view link,
the parent's summary, the background queue.

The outage tests use a real `mlflow server` on 127.0.0.1 (sqlite store), stopped with SIGKILL and
started again on the same store; the sweep is the real CLI on local Ray with tiny trials.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
from _mlflow_store import mlflow_uri

from search.results import sweep_summary
from search.tracking import BackgroundQueue, is_transient, runs_view_url, server_probe, ui_command

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--subset-train", "300", "--subset-test", "100", "--epochs", "2", "--quiet"]
for _k, _v in {"depth": "8", "width": "4", "attack_steps": "2", "proxy_eval_size": "64", "cw": "false",
               "eval_attack.steps": "2"}.items():
    TINY += ["--set", f"{_k}={_v}"]
SHORT_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


# --- fast unit tests -----------------------------------------------------------------------------

def test_runs_view_link():
    assert runs_view_url("sqlite:////tmp/x/mlflow.db", "3") == \
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert ui_command("sqlite:////tmp/x/mlflow.db") == \
        "mlflow ui --backend-store-uri sqlite:////tmp/x/mlflow.db --host 127.0.0.1 --port 5000"
    # a server's own address, without credentials
    assert runs_view_url("https://bob:pw@mlflow.example:8443/", "7") == \
        "https://mlflow.example:8443/#/experiments/7/runs?workflowType=machine_learning"
    assert runs_view_url("http://10.0.0.5:5000/mlflow", "1") == \
        "http://10.0.0.5:5000/mlflow/#/experiments/1/runs?workflowType=machine_learning"
    assert ui_command("http://10.0.0.5:5000") is None


def test_sweep_summary_per_bit_width():
    rows = [  # validation objectives, test accuracy of the same trial, two bit widths
        {"trial_id": "a", "status": "completed", "clean_acc": 0.9, "robust_acc": 0.3, "channel_sparsity": 0.1,
         "test_clean_acc": 0.88, "test_robust_acc": 0.28, "time_total_s": 1800.0, "config.bits": 2},
        {"trial_id": "b", "status": "completed", "clean_acc": 0.7, "robust_acc": 0.5, "channel_sparsity": 0.2,
         "test_clean_acc": 0.69, "test_robust_acc": 0.47, "time_total_s": 1800.0, "config.bits": 2},
        {"trial_id": "c", "status": "completed", "clean_acc": 0.6, "robust_acc": 0.2, "channel_sparsity": 0.5,
         "test_clean_acc": 0.61, "test_robust_acc": 0.19, "time_total_s": 3600.0, "config.bits": 1},
        {"trial_id": "d", "status": "failed", "clean_acc": float("nan"), "robust_acc": float("nan"),
         "channel_sparsity": float("nan"), "test_clean_acc": None, "test_robust_acc": None,
         "time_total_s": 3600.0, "config.bits": 1},
        {"trial_id": "e", "status": "stopped", "clean_acc": 0.99, "robust_acc": 0.99, "channel_sparsity": 0.9,
         "test_clean_acc": None, "test_robust_acc": None, "time_total_s": 0.0, "config.bits": 4},
    ]
    df = pd.DataFrame(rows)
    front = df[df["trial_id"].isin(["a", "b", "c"])]
    m, tags = sweep_summary(df, front, (0.0, 0.0, 0.0), cpus_per_trial=2, gpus_per_trial=0.5,
                            floors={"clean_acc": 0.5, "robust_acc": None})
    assert m["best_clean_acc.2bit"] == 0.9 and m["test_clean_acc.best_clean.2bit"] == 0.88
    assert m["best_robust_acc.2bit"] == 0.5 and m["test_robust_acc.best_robust.2bit"] == 0.47
    assert m["best_clean_acc.1bit"] == 0.6 and m["best_robust_acc.1bit"] == 0.2
    assert not any(k.endswith(".4bit") for k in m), "a stopped trial is no bit width's best"
    assert (m["n_completed"], m["n_failed"], m["n_stopped"], m["front_size"]) == (3, 1, 1, 3)
    assert math.isclose(m["cpu_hours"], 2 * 3.0) and math.isclose(m["gpu_hours"], 0.5 * 3.0)
    assert m["hypervolume"] > 0 and m["floor.clean_acc"] == 0.5 and "floor.robust_acc" not in m
    assert tags["floor"] == "clean_acc>=0.5" and tags["front_trials"] == "a,b,c"


@pytest.mark.parametrize("args, message", [
    (["--resume-logging"], "--resume-logging needs --name"),
    (["--mlflow-wait", "-1"], "--mlflow-wait -1.0; accepted: seconds >= 0"),
    (["--register", "bad name"], "--register 'bad name'; accepted"),
    (["--name", "nothing-here", "--resume-logging"], "no sweep named 'nothing-here'"),
])
def test_new_flags_refuse_bad_input_in_one_line(tmp_path, monkeypatch, capsys, args, message):
    from search.driver import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--storage-path", str(tmp_path / "results"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "results").exists() and not (tmp_path / "m.db").exists()


def test_background_queue_retries_in_order_and_never_blocks():
    """Transient failures keep the operation at the head and retry it; later operations wait
    behind it; a permanent error drops only its operation; submit returns at once meanwhile."""
    done: list[str] = []
    failures = {"a": 3}
    lines: list[str] = []

    def op(name: str) -> None:
        if failures.get(name, 0) > 0:
            failures[name] -= 1
            raise ConnectionRefusedError("server away")
        if name == "bad":
            raise ValueError("rejected")
        done.append(name)

    q = BackgroundQueue(first_backoff_s=0.05, max_backoff_s=0.1, announce=lines.append)
    t0 = time.perf_counter()
    for name in ("a", "bad", "b", "c"):
        q.submit(op, name)
    assert time.perf_counter() - t0 < 0.05
    assert q.close(patience_s=10) == 0
    assert done == ["a", "b", "c"] and q.dropped == ["op"]
    assert q.outages == 1 and any("unavailable" in ln for ln in lines) and any("reachable again" in ln for ln in lines)
    assert is_transient(ConnectionRefusedError()) and not is_transient(ValueError())


def test_background_queue_gives_up_when_nothing_gets_through():
    q = BackgroundQueue(first_backoff_s=0.05, max_backoff_s=0.1, announce=lambda s: None)

    def never(_: int) -> None:
        raise TimeoutError("no reply")

    for i in range(3):
        q.submit(never, i)
    t0 = time.monotonic()
    assert q.close(patience_s=0.5) == 3
    assert time.monotonic() - t0 < 5


def test_server_probe_sees_any_http_answer(tmp_path):
    """The outage probe: any HTTP answer (a 404 here) means the server is back, a closed port
    means it is not, a database store has no server to probe; credentials are not sent."""
    import http.server

    seen: list[str] = []

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            seen.append(self.path + " " + str(self.headers.get("Authorization")))
            self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        assert server_probe(f"http://alice:s3cret@127.0.0.1:{port}/mlflow")() is True
        assert seen == ["/mlflow/health None"]
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert server_probe(f"http://127.0.0.1:{port}")() is False
    assert server_probe(f"sqlite:///{tmp_path / 'mlflow.db'}") is None


def test_background_queue_retries_as_soon_as_the_probe_answers():
    """A server away past the longest backoff: the retry follows its return within a probe period,
    not after the backoff."""
    state = {"up": False, "calls": 0}

    def op() -> None:
        state["calls"] += 1
        if not state["up"]:
            raise ConnectionRefusedError("server away")

    q = BackgroundQueue(first_backoff_s=30, max_backoff_s=30, announce=lambda s: None,
                        probe=lambda: state["up"], probe_every_s=0.05)
    q.submit(op)
    deadline = time.monotonic() + 10
    while q.down_since is None and time.monotonic() < deadline:
        time.sleep(0.01)
    state["up"] = True
    t0 = time.monotonic()
    assert q.close(patience_s=5) == 0
    assert time.monotonic() - t0 < 2 and state["calls"] == 2


def test_epochs_a_crash_lost_are_replayed_after_a_later_one_was_logged(tmp_path):
    """A driver killed while the server was away loses the epochs it buffered (1, 2); the resumed
    trial logs epoch 3 live; the end's replay (from the stored results) must still send 1 and 2,
    and nothing twice."""
    from mlflow.tracking import MlflowClient

    from search.tracking import SweepLogger, SweepRun, child_runs, result_metrics, start_parent_run

    uri = mlflow_uri(tmp_path)
    client = MlflowClient(uri)
    exp = client.create_experiment("gap")
    parent = start_parent_run(client, exp, "gap", {}, {})
    logger = SweepLogger(SweepRun(uri, exp, parent, "gap"), log_models=False)

    def result(step: int) -> list:
        return result_metrics({"epoch": step, "clean_acc": 0.1 * step, "timestamp": 1_700_000_000 + step}, step)

    logger.trial_started("t1", "trial_t1", {"bits": 2})
    logger.trial_result("t1", 3, result(3))  # live, after the resume
    for step in (1, 2, 3):  # the replay
        logger.trial_result("t1", step, result(step))
    assert logger.close(patience_s=30) == 0
    run_id = child_runs(client, SweepRun(uri, exp, parent, "gap"))["t1"].info.run_id
    for key in ("epoch", "clean_acc"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3], key


def _result_row(step: int, clean_acc: float, epochs: int) -> dict:
    """One result as Tune stores it (result.json, a snapshot's last result, a checkpoint's reports)."""
    return {"epoch": step, "max_epochs": epochs, "clean_acc": clean_acc, "robust_acc": 0.05 * step,
            "channel_sparsity": 0.0, "timestamp": 1_700_000_000 + step, "training_iteration": step}


class _StoredTrial(SimpleNamespace):
    """What the replay reads of a Tune trial that ExperimentAnalysis loaded."""

    def __str__(self) -> str:
        return f"trial_{self.trial_id}"


def _replay_twice(tmp_path: Path, name: str, last_result: dict, stored: list[dict], storage: Any = None) -> tuple:
    """Replay one finished trial `t1` (its stored result.json rows, the snapshot's last result, the
    storage of its checkpoints) into a fresh sweep run, twice: a second replay sends nothing again.
    Returns the client and the trial's run id."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from search.tracking import SweepLogger, SweepRun, child_runs, replay, start_parent_run

    uri = mlflow_uri(tmp_path)
    client = MlflowClient(uri)
    exp = client.create_experiment(name)
    run = SweepRun(uri, exp, start_parent_run(client, exp, name, {}, {}), name)
    trial = _StoredTrial(trial_id="t1", status="TERMINATED", config={"bits": 2}, checkpoint=None,
                         last_result=last_result, storage=storage)
    analysis = SimpleNamespace(trials=[trial], trial_dataframes={"t1": pd.DataFrame(stored)})
    for _ in range(2):
        logger = SweepLogger(run, log_models=False)
        replay(logger, analysis, None)
        assert logger.close(patience_s=30) == 0
    return client, child_runs(client, run)["t1"].info.run_id


def test_the_replay_sends_a_last_result_that_only_tunes_snapshot_holds(tmp_path):
    """Tune stages each trial's result.json and uploads it with its snapshots: a driver killed
    while the server was away can leave the stored results one epoch short, while the snapshot's
    last result has that epoch. The replay sends it from there, once."""
    client, run_id = _replay_twice(tmp_path, "short", _result_row(3, 0.3, 3),
                                   [_result_row(1, 0.1, 3), _result_row(2, 0.2, 3)])  # the stored result.json
    for key in ("epoch", "clean_acc"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3], key


def test_the_replay_sends_epochs_only_the_trials_checkpoint_holds(tmp_path):
    """A trial continued after a driver crash starts a fresh result.json, so the epochs before the
    crash are only in the reports its newest checkpoint holds (older checkpoints pruned, a newer
    one torn): the replay sends them from there, once, and leaves epochs Tune has alone."""
    import pyarrow.fs as pafs

    trial_dir = tmp_path / "exp" / "trial_t1"
    for n, upto in ((1, 2), (2, 3)):  # checkpoint_000001 holds epochs 1-2, checkpoint_000002 1-3
        (trial_dir / f"checkpoint_{n:06d}").mkdir(parents=True)
        (trial_dir / f"checkpoint_{n:06d}" / "reports.json").write_text(
            json.dumps([_result_row(s, 0.1 * s, 4) for s in range(1, upto + 1)]))
    (trial_dir / "checkpoint_000003").mkdir()
    (trial_dir / "checkpoint_000003" / "reports.json").write_text('[{"epoch": 1, "clea')  # torn

    storage = SimpleNamespace(storage_filesystem=pafs.LocalFileSystem(), trial_fs_path=str(trial_dir))
    client, run_id = _replay_twice(tmp_path, "cont", _result_row(4, 0.4, 4),
                                   [_result_row(3, 0.33, 4), _result_row(4, 0.4, 4)],  # since the restore
                                   storage)
    got = {m.step: m.value for m in client.get_metric_history(run_id, "clean_acc")}
    assert len(client.get_metric_history(run_id, "clean_acc")) == 4
    assert got == {1: pytest.approx(0.1), 2: pytest.approx(0.2), 3: 0.33, 4: 0.4}  # 3: Tune's, not the checkpoint's


# --- a real tracking server that goes away ------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1 over one sqlite store; `kill` is SIGKILL to its process group."""

    def __init__(self, tmp: Path, port: int) -> None:
        self.tmp, self.port, self.proc = tmp, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 300) -> None:
        with open(self.tmp / "server.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", mlflow_uri(self.tmp),
                 "--artifacts-destination", str(self.tmp / "mlartifacts"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=_env())
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert self.proc.poll() is None, (self.tmp / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        raise AssertionError(f"mlflow server not up after {timeout} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path, _free_port())
    try:
        yield s
    finally:
        s.kill()


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0", **SHORT_HTTP)
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _state(uri: str, experiment: str = "brsearch") -> dict:
    """What the store holds: parents, children by trial id with metric-history steps, models."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {}
    for r in runs:
        if "mlflow.parentRunId" in r.data.tags:
            tid = r.data.tags["ray_trial_id"]
            assert tid not in children, f"two runs for trial {tid}"
            children[tid] = {"run": r, "steps": {k: sorted(m.step for m in c.get_metric_history(r.info.run_id, k))
                                                 for k in ("epoch", "clean_acc", "robust_acc")}}
    models = list(c.search_logged_models([exp.experiment_id], max_results=1000))
    return {"client": c, "exp": exp, "parents": parents, "children": children, "models": models}


@pytest.mark.slow
def test_tracking_server_outage_neither_stops_nor_stalls_the_sweep(tmp_path, server, monkeypatch):
    """The server is killed after the first trial and stays away: the other trials start and
    finish, the sweep ends normally (exit 0) and says in one line what was not logged; with the
    server back, `--resume-logging` sends exactly what is missing (run twice: no duplicates)."""
    server.start()
    cmd = [sys.executable, "-m", "search.pareto", "--name", "out", "--trials", "3", "--max-concurrent", "1",
           "--num-cpus", "2", "--seed", "0", *TINY, "--storage-path", str(tmp_path / "results"),
           "--tracking-uri", server.uri, "--mlflow-wait", "3"]
    with open(tmp_path / "sweep.err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=err, text=True)
    out: list[str] = []
    killed_at = None
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith("[1/3]") and killed_at is None:
                server.kill()
                killed_at = len(out)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout, stderr = "".join(out), (tmp_path / "sweep.err").read_text()
    assert proc.returncode == 0, f"{stdout[-3000:]}\n{stderr[-3000:]}"
    after = "".join(out[killed_at:])
    # trials went on while the server was away, and the driver said why logging lagged
    assert "[2/3]" in after and "[3/3]" in after and "completed" in after, after
    assert "mlflow: tracking unavailable" in after
    unsent = [ln for ln in stderr.splitlines() if "not sent" in ln]
    assert len(unsent) == 1 and "--resume-logging" in unsent[0], stderr[-3000:]
    trials = pd.read_parquet(tmp_path / "results" / "out" / "trials.parquet")
    assert (trials["status"] == "completed").all() and len(trials) == 3

    server.start()
    before = _state(server.uri)
    assert len(before["children"]) < 3 or before["parents"][0].info.status == "RUNNING", "something was not sent"
    replay = [sys.executable, "-m", "search.pareto", "--name", "out", "--storage-path", str(tmp_path / "results"),
              "--resume-logging"]
    for attempt in range(2):  # the second replay (in this process: no second start-up) finds nothing missing
        if attempt == 0:
            p = subprocess.run(replay, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
                               check=False)
            assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        else:
            from search.driver import main

            for k, v in SHORT_HTTP.items():
                monkeypatch.setenv(k, v)
            monkeypatch.chdir(tmp_path)
            assert main(replay[3:]) == 0
        st = _state(server.uri)
        assert len(st["parents"]) == 1 and st["parents"][0].info.status == "FINISHED"
        parent = st["parents"][0]
        assert set(st["children"]) == set(trials["trial_id"])
        for tid, ch in st["children"].items():
            assert ch["run"].info.status == "FINISHED" and ch["run"].data.tags["brsearch.status"] == "completed"
            for k, steps in ch["steps"].items():
                assert steps == [1, 2], (attempt, tid, k, steps)  # every epoch, each once
            assert ch["run"].data.tags.get("pareto") in ("true", "false")
        assert sorted(m.tags["brsearch.trial_id"] for m in st["models"]) == sorted(trials["trial_id"])
        n_completed = sorted(m.value for m in st["client"].get_metric_history(parent.info.run_id, "n_completed"))
        assert n_completed == [1.0, 2.0, 3.0], n_completed
        assert parent.data.metrics["front_size"] == trials["pareto"].sum()


@pytest.mark.slow
def test_buffered_logging_is_sent_once_when_the_server_returns(tmp_path, server, monkeypatch):
    """The live path: with no server listening, the driver's logger keeps taking work without
    blocking and retries; once the server is up it sends all of it, once, in order. (The store is
    prepared through sqlite directly, so one server start suffices.)"""
    for k, v in SHORT_HTTP.items():
        monkeypatch.setenv(k, v)
    from mlflow.tracking import MlflowClient

    from search.tracking import SweepLogger, SweepRun, result_metrics, start_parent_run

    db = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = db.create_experiment("live", artifact_location="mlflow-artifacts:/live")
    parent = start_parent_run(db, exp, "live", {}, {})
    logger = SweepLogger(SweepRun(server.uri, exp, parent, "live"), log_models=False)

    def result(step: int) -> list:
        return result_metrics({"epoch": step, "clean_acc": 0.1 * step, "timestamp": 1_700_000_000 + step}, step)

    t0 = time.perf_counter()
    for tid, bits in (("t1", 2), ("t2", 1)):
        logger.trial_started(tid, f"trial_{tid}", {"bits": bits})
        for step in (1, 2):
            logger.trial_result(tid, step, result(step))
        logger.trial_result(tid, 2, result(2))  # a repeated report (e.g. rerun after a crash)
        logger.trial_finished(SimpleNamespace(trial_id=tid, config={"bits": bits}, last_result={"epoch": 2}, checkpoint=None),
                              "completed", "")
    assert time.perf_counter() - t0 < 0.1, "queueing must not wait for the server"
    deadline = time.monotonic() + 60
    while logger.queue.down_since is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert logger.queue.down_since is not None and logger.queue.sent == 0
    server.start()
    assert logger.close(patience_s=120) == 0
    assert logger.queue.down_since is None  # it said the server was back
    st = _state(server.uri, "live")
    assert set(st["children"]) == {"t1", "t2"}
    for tid, ch in st["children"].items():
        assert ch["steps"]["epoch"] == [1, 2] and ch["steps"]["clean_acc"] == [1, 2], (tid, ch["steps"])
        assert ch["run"].info.status == "FINISHED" and ch["run"].data.params["bits"] in ("1", "2")


@pytest.mark.slow
def test_a_returning_server_is_used_at_once(tmp_path, server, monkeypatch):
    """The server is killed (SIGKILL) while results keep coming and started again on the same
    store. The logger's retry backoff is set longer than the outage (60 s, the default caps it at
    15 s) so that only the probe can explain a prompt resend: the buffered operations reach the
    server within seconds of its return, and the sweep's end a few seconds later, with a short
    wait, leaves nothing to replay (the sweep-scale case: back 30 s before the end, 60 s wait)."""
    for k, v in SHORT_HTTP.items():
        monkeypatch.setenv(k, v)
    from mlflow.tracking import MlflowClient

    from search.tracking import SweepLogger, SweepRun, result_metrics, start_parent_run

    db = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = db.create_experiment("back", artifact_location="mlflow-artifacts:/back")
    parent = start_parent_run(db, exp, "back", {}, {})
    server.start()
    logger = SweepLogger(SweepRun(server.uri, exp, parent, "back"), log_models=False)
    logger.queue.first_backoff_s = logger.queue.max_backoff_s = 60.0
    logger.trial_started("t1", "trial_t1", {"bits": 2})
    deadline = time.monotonic() + 60
    while logger.queue.sent == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert logger.queue.sent == 1
    server.kill()
    for step in range(1, 6):
        logger.trial_result("t1", step, result_metrics({"epoch": step, "clean_acc": 0.01 * step,
                                                         "timestamp": 1_700_000_000 + step}, step))
        time.sleep(1)
    assert logger.queue.down_since is not None and logger.queue.sent == 1
    server.start()  # returns once /health answers (20 to 40 s on a loaded 2-core machine)
    MlflowClient(server.uri).get_experiment(exp)  # and once its store answers (its first use takes seconds)
    t_up = time.monotonic()
    while logger.queue.sent == 1 and time.monotonic() - t_up < 60:
        time.sleep(0.05)
    lag = time.monotonic() - t_up
    time.sleep(max(0.0, 8 - lag))  # the sweep ends 8 s after the server's return ...
    left = logger.close(patience_s=1)  # ... and waits 1 s at most
    assert lag < 8, f"the returning server was first used {lag:.1f} s after it answered"
    assert left == 0, f"{left} operations left for --resume-logging; first sent {lag:.1f} s after the return"
    st = _state(server.uri, "back")
    assert st["children"]["t1"]["steps"]["epoch"] == [1, 2, 3, 4, 5]
