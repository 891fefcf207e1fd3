"""Nothing lost: faults injected for real into `python -m search.pareto` sweeps.

Real subprocesses, a real local Ray (and a `ray.cluster_utils.Cluster`), real sqlite MLflow
stores (and a real `mlflow server`), real Optuna storage; no mocks. Trials are tiny (depth 8,
width 4, 300 digits images) so the whole file runs in a few minutes on 2 CPU cores.

Set BRSEARCH_RELIABILITY_LOG=/path/file.jsonl to append each fault's measurements (time to
recover, what was lost) as one JSON line; docs/reliability.md is made from those lines.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _mlflow_store import mlflow_db, mlflow_uri
from _study import sweep_study

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "depth=8", "--set", "width=4", "--subset-train", "300", "--subset-test", "100",
        "--set", "attack_steps=2", "--set", "proxy_eval_size=64", "--set", "cw=false"]
# for the faults injected mid-trial: epochs of ~1 s on an idle 2-core machine (a few s under load)
# instead of ~0.2 s, so the fault lands between checkpoints rather than after the trial ended
SLOWER = ["--set", "depth=14", "--set", "width=16", "--subset-train", "1500", "--subset-test", "100",
          "--set", "attack_steps=3", "--set", "proxy_eval_size=64", "--set", "cw=false"]
# a define-by-run space: trial numbers 1, 4, ... get a learning rate that makes the loss NaN in
# epoch 2 (deterministically, on digits), the others train normally
DIVERGE_SPACE = '''"""lr 1e8 for every third trial: its loss is NaN in epoch 2 (after one checkpoint)."""


def space(trial):
    return {"lr": 1e8 if trial.number % 3 == 1 else 0.05}
'''


# --- plumbing ----------------------------------------------------------------------------------

def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0", **extra)
    return env


def record(fault: str, **fields) -> None:
    """One measurement line: printed (pytest -s shows it) and appended to $BRSEARCH_RELIABILITY_LOG."""
    line = json.dumps({"fault": fault, **fields}, default=str)
    print(line)
    log = os.environ.get("BRSEARCH_RELIABILITY_LOG")
    if log:
        with open(log, "a") as f:
            f.write(line + "\n")


class Sweep:
    """`python -m search.pareto ARGS` in its own process group, stdout+stderr read line by line
    with arrival times."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "search.pareto", *args], cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env or _env(), start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, pattern: str) -> float | None:
        """Arrival time of the first line matching `pattern`."""
        rx = re.compile(pattern)
        return next((t for t, line in list(self.lines) if rx.search(line)), None)

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            pytest.fail(f"sweep still running after {timeout:.0f}s; output tail:\n{self.text[-4000:]}")
        self._reader.join(timeout=10)
        return rc

    def save(self, path: Path) -> None:
        """The output with seconds since start, for a look after the fact."""
        path.write_text("\n".join(f"{t - self.t0:8.2f}  {line}" for t, line in list(self.lines)))

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def group_members(pgid: int) -> list[str]:
    """Command names of the live processes in a process group."""
    out = subprocess.run(["ps", "-eo", "pgid=,stat=,comm="], capture_output=True, text=True).stdout
    return [parts[2] for parts in (ln.split(None, 2) for ln in out.splitlines())
            if len(parts) == 3 and parts[0] == str(pgid) and not parts[1].startswith("Z")]


def snapshot(exp_dir: Path) -> dict[str, tuple[str, int]] | None:
    """Tune's latest experiment snapshot (what Tuner.restore will see): trial id -> (status, the
    training_iteration of its latest registered checkpoint, 0 if none). None while there is no
    snapshot or it is being written."""
    from ray import cloudpickle

    files = sorted(exp_dir.glob("experiment_state-*.json"))
    if not files:
        return None
    try:
        data = json.loads(files[-1].read_text())
        out = {}
        for trial_json, meta_json in data["trial_data"]:
            t, meta = json.loads(trial_json), json.loads(meta_json)
            manager = cloudpickle.loads(bytes.fromhex(meta["checkpoint_manager"]["value"]))
            latest = manager.latest_checkpoint_result
            out[t["trial_id"]] = (t["status"], int(latest.metrics["training_iteration"]) if latest else 0)
        return out
    except (ValueError, KeyError, OSError, EOFError, AttributeError):
        return None


def sql(db: Path, query: str) -> list[tuple]:
    """A read-only query on a sqlite file another process is writing (retried while locked)."""
    for _ in range(50):
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
            try:
                return con.execute(query).fetchall()
            finally:
                con.close()
        except sqlite3.OperationalError:
            time.sleep(0.1)
    return []


def results_of(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def mlflow_runs(tracking_uri: str, parent: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("brsearch")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    parents = [r for r in runs if r.data.tags.get("brsearch.kind") == "sweep"]
    return client, parents, children


def optuna_trials(exp_dir: Path, name: str):
    return sweep_study(exp_dir, name).get_trials(deepcopy=False)


def study_trials(exp_dir: Path, name: str) -> list:
    """The trials the study file holds; none while the study was never written."""
    try:
        return optuna_trials(exp_dir, name)
    except KeyError:
        return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- 1. the driver is killed mid-sweep, then --resume ---------------------------------------------

@pytest.mark.slow
@pytest.mark.long
def test_driver_sigkill_then_resume(tmp_path):
    """SIGKILL the driver while a trial is between checkpoints, after another finished; resume.
    Nothing finished is lost or repeated (trials.parquet, Optuna, MLflow), the interrupted trial
    continues from its checkpoint, and the sweep ends with the requested trials under one parent."""
    name, trials, epochs = "crash", 4, 3
    args = ["--name", name, "--trials", str(trials), "--epochs", str(epochs), "--max-concurrent", "2",
            "--storage-path", str(tmp_path / "results"), "--tracking-uri", mlflow_uri(tmp_path),
            *SLOWER]
    exp_dir = tmp_path / "results" / name
    journal = exp_dir / "brsearch" / "optuna.journal"

    first = Sweep(args, tmp_path)
    pgid = first.proc.pid
    try:
        # Kill when Tune's last snapshot (what a restore sees) holds a finished trial and a running
        # one with a checkpoint, and every trial Optuna has handed out (so no orphan in the window).
        deadline, snap = time.monotonic() + 300, None
        while time.monotonic() < deadline and first.proc.poll() is None:
            snap = snapshot(exp_dir)
            if snap and journal.exists():
                done = [t for t, (s, it) in snap.items() if s == "TERMINATED" and it == epochs]
                mid = [t for t, (s, it) in snap.items() if s == "RUNNING" and 1 <= it < epochs]
                try:
                    asked = len(optuna_trials(exp_dir, name))
                except KeyError:  # the journal is there, the study not yet
                    asked = None
                if done and mid and asked == len(snap):
                    os.kill(first.proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.05)
        else:
            pytest.fail(f"no kill point reached (sweep rc={first.proc.poll()}); output:\n{first.text[-3000:]}")
        t_kill = time.monotonic()
        assert first.wait(30) == -signal.SIGKILL
        time.sleep(2)
        survivors = group_members(pgid)  # Ray fate-shares raylet/GCS/workers with the driver

        snap = snapshot(exp_dir)  # final now: nothing writes it any more
        done_before = sorted(t for t, (s, it) in snap.items() if s == "TERMINATED")
        interrupted = {t: it for t, (s, it) in snap.items() if s == "RUNNING" and it >= 1}
        asked = {t.user_attrs["ray_trial_id"] for t in optuna_trials(exp_dir, name) if "ray_trial_id" in t.user_attrs}
        orphans = asked - set(snap)  # asked after the last snapshot
        epochs_left = trials * epochs - sum(it for _, it in snap.values())

        # resume while the agents of the killed instance may still linger: it must not matter
        t_resume, wall_resume = time.monotonic(), time.time()
        second = Sweep([*args, "--resume"], tmp_path)
        rc = second.wait(400)
        resume_s = time.monotonic() - t_resume
        first.save(tmp_path / "first.log")
        second.save(tmp_path / "second.log")
        assert rc == 0, second.text[-4000:]
    finally:
        first.kill_group()  # whatever of the killed driver's Ray instance is left

    # the interrupted trials continued from their checkpoints
    for tid, it in interrupted.items():
        assert re.search(rf"trial {tid}: resumed after epoch {it}\b", second.text), second.text[-3000:]
        history = results_of(exp_dir / f"trial_{tid}")
        assert history[-1]["training_iteration"] == epochs
        assert history[-1]["iterations_since_restore"] < history[-1]["training_iteration"]
        # epoch numbering continues after the restore (Ray's result.json may keep only the results
        # since the restore; the full per-epoch history is in MLflow, checked below)
        after = [r for r in history if r["iterations_since_restore"] < r["training_iteration"]]
        assert after and all(r["epoch"] == it + r["iterations_since_restore"] for r in after), history
        # its newest checkpoint holds every epoch's report, from before the kill and after it
        newest = max((exp_dir / f"trial_{tid}").glob("checkpoint_*"))
        reports = json.loads((newest / "reports.json").read_text())
        assert [r["epoch"] for r in reports] == list(range(1, epochs + 1)), (tid, reports)
    # the finished ones were not run again
    for tid in done_before:
        history = results_of(exp_dir / f"trial_{tid}")
        assert [r["iterations_since_restore"] for r in history] == list(range(1, epochs + 1))

    # trials.parquet: the requested trials, each once, all completed
    df = pd.read_parquet(exp_dir / "trials.parquet")
    assert len(df) == trials and df["trial_id"].is_unique
    assert set(df["status"]) == {"completed"}
    assert set(done_before) | set(interrupted) <= set(df["trial_id"])
    assert not orphans & set(df["trial_id"])

    # Optuna: every trial finished, none RUNNING, one COMPLETE per Tune trial
    states = Counter(t.state.name for t in optuna_trials(exp_dir, name))
    assert states.get("RUNNING", 0) == 0 and states["COMPLETE"] == trials
    assert states.get("FAIL", 0) == len(orphans)  # reconciled: "orphaned by a crash"
    complete_ids = [t.user_attrs["ray_trial_id"] for t in optuna_trials(exp_dir, name) if t.state.name == "COMPLETE"]
    assert sorted(complete_ids) == sorted(df["trial_id"])

    # MLflow: one parent, one FINISHED child per trial, nothing RUNNING, no metric logged twice
    sweep_json = json.loads((exp_dir / "brsearch" / "sweep.json").read_text())
    client, parents, children = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", sweep_json["parent_run_id"])
    assert [p.info.status for p in parents] == ["FINISHED"]
    by_trial = {c.data.tags["ray_trial_id"]: c for c in children}
    assert len(by_trial) == len(children)
    # an orphan's run exists if the killed driver's background logger had sent it before the kill
    assert set(df["trial_id"]) <= set(by_trial) <= set(df["trial_id"]) | orphans
    assert all(c.info.status != "RUNNING" for c in children)
    for tid in df["trial_id"]:
        assert by_trial[tid].info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(by_trial[tid].info.run_id, "epoch")]
        assert sorted(steps) == list(range(1, epochs + 1)), (tid, steps)
    for tid in orphans & set(by_trial):  # started after the last snapshot: ended, and said so
        assert by_trial[tid].info.status == "KILLED" and by_trial[tid].data.tags["brsearch.status"] == "lost"

    # the training left after the crash, as time on 2 slots: what a resume ideally costs
    work = sum(r.get("time_this_iter_s", 0) for d in exp_dir.glob("trial_*") for r in results_of(d)
               if r.get("timestamp", 0) >= int(wall_resume))
    resumed_at = [second.first(rf"trial {tid}: resumed after epoch") for tid in interrupted]
    record("driver SIGKILL + --resume", finished_before=len(done_before), interrupted=len(interrupted),
           orphans=len(orphans), lost_finished=0, duplicated=0, epochs_left=epochs_left,
           resume_wall_s=round(resume_s, 1), training_left_on_2_slots_s=round(work / 2, 1),
           trial_running_again_s=round(min(t for t in resumed_at if t) - t_resume, 1) if any(resumed_at) else None,
           since_kill_s=round(time.monotonic() - t_kill, 1), survivors=sorted(set(survivors)))


# a driver that dies right after telling Optuna a trial's outcome, before Tune snapshots it: the
# fault is planted in the real driver (the searcher's tell), everything else is `search.pareto`
CRASH_AFTER_TELL = """
import json, os, signal, sys
from pathlib import Path
from ray.tune.execution.tune_controller import TuneController
from search.optimizer import ParetoSearch
exp = Path(sys.argv[1])
tell, checkpoint = ParetoSearch.on_trial_complete, TuneController.checkpoint
# each snapshot's copy into the storage finishes before the loop goes on, so the kill lands after
# a tell, never inside Tune's own copy of its state files (a fault of its own, not this test's)
TuneController.checkpoint = lambda self, force=False, wait=False: checkpoint(self, force=force, wait=True)


def unfinished_in_snapshot(searcher, trial_id):
    files = sorted(exp.glob("experiment_state-*.json"))
    try:
        status = {json.loads(t)["trial_id"]: json.loads(t)["status"]
                  for t, _ in json.loads(files[-1].read_text())["trial_data"]}
    except (IndexError, ValueError, KeyError, OSError):
        return False
    asked = {t.user_attrs.get("ray_trial_id") for t in searcher.study.get_trials(deepcopy=False)}
    return status.get(trial_id) in ("RUNNING", "PENDING") and asked <= set(status)  # no orphans


def crash_after_tell(self, trial_id, result=None, error=False):
    tell(self, trial_id, result, error)
    if trial_id in self.pruned and unfinished_in_snapshot(self, trial_id):
        print(f"CRASH after telling {trial_id}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


ParetoSearch.on_trial_complete = crash_after_tell
from search.pareto import main
sys.exit(main(sys.argv[2:]))
"""
OPTUNA_STATE = {"completed": "COMPLETE", "stopped": "PRUNED", "failed": "FAIL"}


@pytest.mark.slow
@pytest.mark.long
def test_resume_after_a_tell_past_the_snapshot_agrees_with_optuna(tmp_path):
    """The driver dies right after the searcher was told that MO-ASHA stopped a trial, while
    Tune's last snapshot still has that trial running. The study is written with Tune's
    snapshots, so Optuna too has it running; --resume runs it again, it is told once when it
    ends, and every trial's Optuna state agrees with trials.parquet."""
    name, epochs = "told", 3
    args = ["--name", name, "--trials", "8", "--epochs", str(epochs), "--max-concurrent", "2",
            "--scheduler", "moasha", "--sampler", "random", "--storage-path", str(tmp_path / "results"),
            "--tracking-uri", mlflow_uri(tmp_path), *TINY]
    exp_dir = tmp_path / "results" / name
    # a snapshot at every step of Tune's loop, so the first stop told after a step that asked for
    # no new trial meets a snapshot that holds every asked trial (with Tune's 10-s "auto" period
    # new trials are asked between snapshots, and the fault may never be reached)
    first = subprocess.Popen([sys.executable, "-c", CRASH_AFTER_TELL, str(exp_dir), *args], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**_env(), "TUNE_GLOBAL_CHECKPOINT_S": "0"}, start_new_session=True)
    try:
        out, _ = first.communicate(timeout=600)
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # the killed driver's Ray instance
        except (ProcessLookupError, PermissionError):
            pass
    crashed = re.search(r"CRASH after telling (\w+)", out)
    assert first.returncode == -signal.SIGKILL and crashed, out[-3000:]
    tid = crashed.group(1)
    assert snapshot(exp_dir)[tid][0] in ("RUNNING", "PENDING")
    told = {t.user_attrs["ray_trial_id"]: t.state.name for t in optuna_trials(exp_dir, name)}
    assert told[tid] == "RUNNING"  # the tell is written with Tune's next snapshot: it died with the driver

    second = Sweep([*args, "--resume"], tmp_path)
    rc = second.wait(600)
    second.save(tmp_path / "second.log")
    assert rc == 0, second.text[-4000:]
    assert "optuna tell failed" not in second.text and "marking FAIL" not in second.text, second.text[-4000:]
    assert len(results_of(exp_dir / f"trial_{tid}")) >= 1  # it did run again

    df = pd.read_parquet(exp_dir / "trials.parquet").set_index("trial_id")
    trials = {t.user_attrs["ray_trial_id"]: t for t in optuna_trials(exp_dir, name)}
    assert {k: OPTUNA_STATE[v] for k, v in df["status"].items()} == {k: trials[k].state.name for k in df.index}
    assert set(trials) == set(df.index)  # no Optuna trial outside trials.parquet
    for k in df.index[df["status"] == "completed"]:  # and the values the sampler learned are the table's
        assert trials[k].values == pytest.approx([df.loc[k, m] for m in ("clean_acc", "robust_acc", "channel_sparsity")])


def planted(patch: str) -> str:
    """A `python -c` script: `patch` plants a fault in the driver, then `search.pareto ARGS` runs."""
    return ("import os, signal, sys, time\nfrom ray.tune.execution.tune_controller import TuneController\n"
            "from search.optimizer import ParetoSearch\n" + patch + "\nfrom search.pareto import main\n"
            "sys.exit(main(sys.argv[1:]))\n")


# the driver dies at the first result it gets
KILL_AT_THE_FIRST_RESULT = """
result = ParetoSearch.on_trial_result


def kill_at_the_first_result(self, trial_id, res):
    result(self, trial_id, res)
    print(f"CRASH at {trial_id} epoch {res.get('epoch')}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


ParetoSearch.on_trial_result = kill_at_the_first_result
"""


def planted_crash(script: str, args: list[str], cwd: Path) -> tuple[subprocess.Popen, str]:
    """`search.pareto ARGS` with a fault planted by `script` (python -c), run until it kills
    itself; its Ray instance is killed after it. Returns the process and its output."""
    first = subprocess.Popen([sys.executable, "-c", script, *args], cwd=cwd, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True)
    try:
        out, _ = first.communicate(timeout=300)
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return first, out


def crash_a_sweep(script: str, name: str, trials: int, concurrent: int, tmp_path: Path) -> tuple[list[str], Path, str]:
    """A tiny sweep of 2-epoch trials run under a planted fault until the driver kills itself;
    returns its command line (for the --resume), its experiment folder and the killed run's output."""
    args = ["--name", name, "--trials", str(trials), "--epochs", "2", "--max-concurrent", str(concurrent),
            "--storage-path", str(tmp_path / "results"), "--tracking-uri", mlflow_uri(tmp_path), *TINY]
    first, out = planted_crash(script, args, tmp_path)
    assert first.returncode == -signal.SIGKILL and "CRASH" in out, out[-3000:]
    return args, tmp_path / "results" / name, out


def finished_sweep_children(exp_dir: Path, tmp_path: Path) -> dict:
    """The ended sweep's child runs by trial id, after checking its one parent run FINISHED."""
    sweep_json = json.loads((exp_dir / "brsearch" / "sweep.json").read_text())
    _, parents, children = mlflow_runs(mlflow_uri(tmp_path), sweep_json["parent_run_id"])
    assert [p.info.status for p in parents] == ["FINISHED"]
    return {c.data.tags["ray_trial_id"]: c for c in children}


# a driver stopped before Tune's first experiment snapshot: Tune's snapshots are planted away
# (as when the first upload to s3:// never finished) and the driver is killed once a trial has a
# checkpointed epoch, with tuner.pkl, the study, MLflow runs and trial folders already written
CRASH_BEFORE_SNAPSHOT = planted("TuneController.checkpoint = lambda self, force=False, wait=False: None\n"
                                + KILL_AT_THE_FIRST_RESULT)


@pytest.mark.slow
@pytest.mark.long
def test_resume_of_a_sweep_stopped_before_tunes_first_snapshot(tmp_path):
    """With no experiment snapshot, Ray's restore runs an experiment of one trial (it drops
    num_samples), so every --resume ran one trial and exited 130. The resume now starts the
    trials again under the same parent run and study: the sweep ends with every trial once, the
    killed driver's Optuna trials FAIL and its MLflow runs ended as lost."""
    name, trials = "early", 3
    args, exp_dir, _ = crash_a_sweep(CRASH_BEFORE_SNAPSHOT, name, trials, 2, tmp_path)
    assert (exp_dir / "tuner.pkl").exists() and snapshot(exp_dir) is None
    assert not study_trials(exp_dir, name)  # the study is written with Tune's snapshots: none yet

    second = Sweep([*args, "--resume"], tmp_path)
    rc = second.wait(400)
    second.save(tmp_path / "second.log")
    assert rc == 0, second.text[-4000:]
    assert "stopped before Tune's first experiment snapshot" in second.text

    df = pd.read_parquet(exp_dir / "trials.parquet")
    assert len(df) == trials and df["trial_id"].is_unique and set(df["status"]) == {"completed"}
    assert Counter(t.state.name for t in optuna_trials(exp_dir, name)) == {"COMPLETE": trials}
    by_trial = finished_sweep_children(exp_dir, tmp_path)
    assert {t for t, c in by_trial.items() if c.info.status == "FINISHED"} == set(df["trial_id"])
    for tid in set(by_trial) - set(df["trial_id"]):  # the killed driver's trials, logged live
        assert by_trial[tid].info.status == "KILLED" and by_trial[tid].data.tags["brsearch.status"] == "lost"


# a trial that ends after Tune's last snapshot, then the driver dies: snapshots are planted away
# from the first trial's end on, and the driver is killed right after the next trial's end was
# told to Optuna, so Optuna has it COMPLETE and the snapshot Tune restores has never heard of it
CRASH_AFTER_AN_UNSNAPSHOTTED_END = """
import os, signal, sys, time
from ray.tune.execution.tune_controller import TuneController
from search.optimizer import ParetoSearch
save, tell, suggest = TuneController.save_to_dir, ParetoSearch.on_trial_complete, ParetoSearch.suggest
held = {"ids": set(), "frozen": False, "ended": None}


def save_until_frozen(self):
    if not held["frozen"]:
        save(self)
        held["ids"] = {t.trial_id for t in self.get_trials()}


def crash_after_an_unknown_end(self, trial_id, result=None, error=False):
    tell(self, trial_id, result, error)
    if not held["frozen"]:
        held["frozen"] = True
    elif trial_id not in held["ids"]:
        held["ended"] = trial_id


def crash_at_the_next_ask(self, trial_id):
    if held["ended"]:  # the ended trial's MLflow run had time to be logged FINISHED
        time.sleep(3)
        print(f"CRASH after {held['ended']} ended unknown to the snapshot", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return suggest(self, trial_id)


TuneController.save_to_dir = save_until_frozen
ParetoSearch.on_trial_complete = crash_after_an_unknown_end
ParetoSearch.suggest = crash_at_the_next_ask
from search.pareto import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.long
def test_a_trial_that_ended_after_the_last_snapshot_leaves_no_trace_in_optuna(tmp_path):
    """A trial Tune started after its last snapshot ended (told to the searcher) before the driver
    died. The study is written with Tune's snapshots, so neither Tune nor Optuna holds it: the
    resume runs another trial in its place and every store agrees (before, Optuna kept it
    COMPLETE while no table did). Its MLflow run, logged live to its end, is ended as lost."""
    name, trials = "unsnap", 3
    args, exp_dir, out = crash_a_sweep(CRASH_AFTER_AN_UNSNAPSHOTTED_END, name, trials, 1, tmp_path)
    crashed = re.search(r"CRASH after (\w+) ended", out)
    tid = crashed.group(1)
    assert tid not in snapshot(exp_dir)
    assert tid not in {t.user_attrs.get("ray_trial_id") for t in study_trials(exp_dir, name)}
    parent = json.loads((exp_dir / "brsearch" / "sweep.json").read_text())["parent_run_id"]
    live = {c.data.tags["ray_trial_id"]: c.info.status for c in mlflow_runs(mlflow_uri(tmp_path), parent)[2]}
    assert live.get(tid) == "FINISHED"  # logged live to its end before the kill

    second = Sweep([*args, "--resume"], tmp_path)
    rc = second.wait(400)
    second.save(tmp_path / "second.log")
    assert rc == 0, second.text[-4000:]

    df = pd.read_parquet(exp_dir / "trials.parquet").set_index("trial_id")
    assert len(df) == trials and df.index.is_unique and set(df["status"]) == {"completed"} and tid not in df.index
    trials_by_id = {t.user_attrs["ray_trial_id"]: t.state.name for t in optuna_trials(exp_dir, name)}
    assert trials_by_id == {k: "COMPLETE" for k in df.index}
    by_trial = finished_sweep_children(exp_dir, tmp_path)
    assert {t for t, c in by_trial.items() if c.info.status == "FINISHED"} == set(df.index)
    assert by_trial[tid].info.status == "KILLED" and by_trial[tid].data.tags["brsearch.status"] == "lost"


# the resumed driver's searcher does not hear of one trial's end, as when Tune's concurrency
# limiter, restored from a state older than the snapshot's trials, forwards only those it lists
DROP_ONE_END = """
import sys
from search.optimizer import ParetoSearch
tell, dropped = ParetoSearch.on_trial_complete, []


def drop_the_first_end(self, trial_id, result=None, error=False):
    if not dropped:
        dropped.append(trial_id)
        print(f"DROPPED the end of {trial_id}", flush=True)
        return
    tell(self, trial_id, result, error)


ParetoSearch.on_trial_complete = drop_the_first_end
from search.pareto import main
sys.exit(main(sys.argv[1:]))
"""
KILL_AT_A_RESULT = planted(KILL_AT_THE_FIRST_RESULT)


@pytest.mark.slow
@pytest.mark.long
def test_a_trial_end_the_resumed_searcher_missed_is_told_at_the_end(tmp_path):
    """After a --resume, a trial ends without the searcher hearing of it (planted: its first
    end is dropped). Optuna would keep it RUNNING while the table says completed; the resumed
    sweep's end tells Optuna from Tune's trials, with one line."""
    name, trials = "missed", 3
    args, exp_dir, _ = crash_a_sweep(KILL_AT_A_RESULT, name, trials, 2, tmp_path)
    second = subprocess.run([sys.executable, "-c", DROP_ONE_END, *args, "--resume"], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=400)
    text = second.stdout + second.stderr
    assert second.returncode == 0, text[-4000:]
    dropped = re.search(r"DROPPED the end of (\w+)", text).group(1)
    assert re.search(r"Optuna set to Tune's trials at the end \(1 ended trial\(s\) told", text), text[-3000:]
    df = pd.read_parquet(exp_dir / "trials.parquet").set_index("trial_id")
    assert len(df) == trials and set(df["status"]) == {"completed"} and dropped in df.index
    states = {t.user_attrs["ray_trial_id"]: t.state.name for t in optuna_trials(exp_dir, name) if t.state.name != "FAIL"}
    assert states == {k: "COMPLETE" for k in df.index}


# --- 2. a worker node is lost mid-trial -----------------------------------------------------------

def test_worker_node_lost_mid_trial(tmp_path):
    """A two-node Cluster (head without CPUs + a worker); the worker is removed while trials run
    on it after their first checkpoint, and a new one joins. The trials restart from their last
    checkpoint (--max-failures) on the new node and the sweep completes."""
    from ray.cluster_utils import Cluster

    name, trials, epochs = "nodeloss", 3, 4
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    sweep = None
    try:
        lost = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        db = mlflow_db(tmp_path)
        args = ["--name", name, "--address", cluster.address, "--trials", str(trials), "--epochs", str(epochs),
                "--max-concurrent", "2", "--max-failures", "2", "--storage-path", str(tmp_path / "results"),
                "--tracking-uri", f"sqlite:///{db}", *SLOWER]
        sweep = Sweep(args, tmp_path)
        # the driver has processed an epoch-1 result (and its checkpoint) of a running trial
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and sweep.proc.poll() is None:
            if db.exists():
                rows = sql(db, "select m.run_uuid, max(m.value) from metrics m join tags t on t.run_uuid = m.run_uuid "
                               "and t.key = 'brsearch.status' and t.value = 'running' where m.key = 'epoch' "
                               "group by m.run_uuid")
                if any(1 <= v <= epochs - 2 for _, v in rows):  # two epochs left to lose
                    break
            time.sleep(0.05)
        else:
            pytest.fail(f"no trial reached a checkpoint (rc={sweep.proc.poll()}):\n{sweep.text[-3000:]}")
        time.sleep(0.5)  # the driver registers the checkpoint one actor call after the result
        t_lost = time.monotonic()
        cluster.remove_node(lost, allow_graceful=False)  # SIGKILL: raylet, object store, trial workers
        replacement = cluster.add_node(num_cpus=2)
        rc = sweep.wait(400)
        sweep.save(tmp_path / "sweep.log")
        assert rc == 0, sweep.text[-4000:]
    finally:
        if sweep is not None:
            sweep.kill_group()
        cluster.shutdown()

    exp_dir = tmp_path / "results" / name
    df = pd.read_parquet(exp_dir / "trials.parquet")
    assert len(df) == trials and set(df["status"]) == {"completed"}, df[["trial_id", "status", "reason"]]
    restarted = []
    for tid in df["trial_id"]:
        history = results_of(exp_dir / f"trial_{tid}")
        assert [r["epoch"] for r in history][-1] == epochs
        last = history[-1]
        if last["iterations_since_restore"] < last["training_iteration"]:
            restarted.append(tid)
            assert re.search(rf"trial {tid}: resumed after epoch [1-9]", sweep.text)
            if "node_id" in last:
                assert last["node_id"] == replacement.node_id != lost.node_id
    assert restarted, "no trial was restored from a checkpoint:\n" + sweep.text[-3000:]
    # MLflow: one FINISHED child per trial, no epoch logged twice
    sweep_json = json.loads((exp_dir / "brsearch" / "sweep.json").read_text())
    client, parents, children = mlflow_runs(f"sqlite:///{db}", sweep_json["parent_run_id"])
    assert len(children) == trials and {c.info.status for c in children} == {"FINISHED"}
    for c in children:
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "epoch")]
        assert sorted(steps) == list(range(1, epochs + 1))
    back = [sweep.first(rf"trial {tid}: resumed after epoch") for tid in restarted]
    record("worker node lost", trials=trials, restarted=len(restarted), lost=0,
           trial_running_again_s=round(min(t for t in back if t) - t_lost, 1) if any(back) else None,
           sweep_done_after_loss_s=round(time.monotonic() - t_lost, 1))


# --- 3. a diverging trial, among healthy ones; 6. credentials ------------------------------------

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server`, bound to the loopback interface as the docs say."""
    d = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", mlflow_uri(d, "server.db"),
                             "--artifacts-destination", str(d / "artifacts"), "--workers", "1"],
                            cwd=d, stdout=open(d / "server.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=_env())
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (d / "server.log").read_text()[-2000:]
            try:
                import urllib.request

                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start: " + (d / "server.log").read_text()[-2000:])
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a graceful stop takes ~15 s; it holds only tmp files
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def diverged_sweep(tmp_path_factory, mlflow_server):
    """3 trials, one of them diverging; logged to the server through a URI with credentials, with
    a credential in a --set value too."""
    d = tmp_path_factory.mktemp("diverge")
    (d / "diverge_space.py").write_text(DIVERGE_SPACE)
    uri = f"http://alice:s3cret@127.0.0.1:{mlflow_server}"
    args = ["--name", "div", "--space", str(d / "diverge_space.py"), "--trials", "3", "--epochs", "2",
            "--max-concurrent", "2", "--storage-path", str(d / "results"), "--tracking-uri", uri, *TINY,
            "--set", "data_root=https://bob:hunter2@data.example/digits", "--quiet"]
    sweep = Sweep(args, d)
    rc = sweep.wait(400)
    return {"dir": d, "exp": d / "results" / "div", "rc": rc, "out": sweep.text, "args": args, "uri": uri,
            "plain_uri": f"http://127.0.0.1:{mlflow_server}"}


def test_diverging_trial_fails_alone(diverged_sweep):
    s = diverged_sweep
    assert s["rc"] == 0, s["out"][-4000:]
    df = pd.read_parquet(s["exp"] / "trials.parquet")
    assert len(df) == 3
    bad = df[df["config.lr"] == 1e8]
    assert len(bad) == 1
    tid = bad["trial_id"].iloc[0]
    reason = bad["reason"].iloc[0]
    assert bad["status"].iloc[0] == "failed" and "DivergedError" in reason and "loss is nan" in reason
    assert not bad["pareto"].iloc[0]
    assert set(df[df["trial_id"] != tid]["status"]) == {"completed"}, "the sweep went on"
    assert tid not in set(pd.read_parquet(s["exp"] / "pareto.parquet")["trial_id"])
    # the terminal says which and why
    assert re.search(rf"\[\d/3\] {tid} failed: DivergedError: loss is nan", s["out"]), s["out"][-3000:]
    # failed once, not retried (a retry would diverge again)
    assert s["out"].count(f"Trial task failed for trial trainable_{tid}") == 1
    # Optuna: FAIL with the reason; the others COMPLETE
    ot = {t.user_attrs.get("ray_trial_id"): t for t in optuna_trials(s["exp"], "div")}
    assert ot[tid].state.name == "FAIL" and "DivergedError" in ot[tid].user_attrs["brsearch_reason"]
    assert sorted(t.state.name for t in ot.values()) == ["COMPLETE", "COMPLETE", "FAIL"]
    # MLflow: the child is FAILED with the reason, off the front
    sweep_json = json.loads((s["exp"] / "brsearch" / "sweep.json").read_text())
    _, parents, children = mlflow_runs(s["plain_uri"], sweep_json["parent_run_id"])
    run = next(c for c in children if c.data.tags["ray_trial_id"] == tid)
    assert run.info.status == "FAILED" and run.data.tags["pareto"] == "false"
    assert "DivergedError: loss is nan" in run.data.tags["brsearch.reason"]
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED", "FINISHED"]
    record("diverging trial (lr=1e8: NaN loss in epoch 2)", trials=3, failed=1, retries=0, others_completed=2,
           lost=0)


def test_credentials_never_logged(diverged_sweep):
    """user:password@ in the tracking URI and in a --set value reaches no MLflow param, tag or
    artifact, nor sweep.json."""
    from search.redact import redact

    s = diverged_sweep
    secrets = ("s3cret", "hunter2")
    sweep_json = (s["exp"] / "brsearch" / "sweep.json").read_text()
    assert not any(x in sweep_json for x in secrets), sweep_json
    parent = json.loads(sweep_json)["parent_run_id"]
    client, parents, children = mlflow_runs(s["plain_uri"], parent)
    assert len(children) == 3
    seen_params = 0
    for run in [*parents, *children]:
        text = json.dumps({"params": run.data.params, "tags": run.data.tags, "name": run.info.run_name})
        assert not any(x in text for x in secrets), text
        seen_params += len(run.data.params)
        dst = s["dir"] / "downloaded" / run.info.run_id
        client.download_artifacts(run.info.run_id, "", str(dst))
        for f in dst.rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                assert not any(x.encode() in data for x in secrets), f
    models = client.search_logged_models([parents[0].info.experiment_id])  # the completed trials' models
    assert models
    for m in models:
        text = json.dumps({"params": m.params, "tags": m.tags, "name": m.name})
        assert not any(x in text for x in secrets), text
    assert parents[0].data.params["tracking_uri"] == f"http://***@127.0.0.1:{s['plain_uri'].rsplit(':', 1)[1]}"
    assert all(c.data.params["data_root"] == "https://***@data.example/digits" for c in children)
    assert (s["dir"] / "downloaded" / parent / "space.json").exists()
    # a URI that a path resolution squashed to one slash keeps no password either
    assert redact("/home/u/https:/bob:hunter2@data.example/x") == "/home/u/https:/***@data.example/x"
    assert redact("s3://bucket/data?X-Amz-Signature=abc&token=xyz") == "s3://bucket/data?X-Amz-Signature=***&token=***"


# --- 4. bad input: checked before any work starts -----------------------------------------------

BAD_SPACES = {
    "unknown.yaml": "params:\n  warp_factor: {type: float, low: 0.1, high: 1.0}\n",
    "inverted.yaml": "params:\n  lr: {type: float, low: 0.2, high: 0.02, log: true}\n",
    "empty.yaml": "params:\n  lr: {type: float, low: 0.1, high: 0.1}\n",
    "bits.yaml": "params:\n  bits: {type: categorical, choices: [1, 2, 64]}\n",
}


def _bad_cases(tmp: Path, stored: dict) -> dict[str, tuple[list[str], dict[str, str], list[str]]]:
    """case -> (argv, extra env, words the one-line message must contain)."""
    afile = tmp / "inputs" / "file.txt"
    empty = tmp / "inputs" / "empty-data"
    sp = tmp / "inputs"
    return {
        "unknown parameter (--set)": (["--set", "warp_factor=3"], {}, ["'warp_factor'", "unknown parameter", "accepted"]),
        "unknown parameter (space file)": (["--space", str(sp / "unknown.yaml")], {}, ["'warp_factor'", "accepted"]),
        "inverted range": (["--space", str(sp / "inverted.yaml")], {}, ["'lr'", "inverted", "low < high"]),
        "empty range": (["--space", str(sp / "empty.yaml")], {}, ["'lr'", "empty", "low < high"]),
        "unsupported bit width (--set)": (["--set", "bits=16"], {}, ["bits=16", "not supported", "accepted"]),
        "unsupported bit width (space file)": (["--space", str(sp / "bits.yaml")], {}, ["bits=64", "accepted"]),
        "unknown dataset": (["--dataset", "imagenet"], {}, ["'imagenet'", "accepted"]),
        "data missing, no download": (["--dataset", "cifar10", "--data-root", str(empty)], {},
                                      ["'cifar10'", "not found", "--download"]),
        "Ray address unreachable": (["--address", "127.0.0.1:1"], {}, ["127.0.0.1:1", "cannot reach", "accepted"]),
        "RAY_ADDRESS unreachable": ([], {"RAY_ADDRESS": "127.0.0.1:1"}, ["RAY_ADDRESS", "cannot reach"]),
        "tracking URI not writable": (["--tracking-uri", f"sqlite:///{afile}/sub/mlflow.db"], {},
                                      ["--tracking-uri", "not writable", "is a file", "accepted"]),
        "tracking server unreachable": (["--tracking-uri", "http://127.0.0.1:1"], {}, ["cannot reach", "accepted"]),
        "storage path not writable (under a file)": (["--storage-path", f"{afile}/sub"], {},
                                                     ["--storage-path", "not writable", "is a file", "accepted"]),
        "storage path not writable (/proc)": (["--storage-path", "/proc/brsearch-results"], {},
                                              ["--storage-path", "not writable", "accepted"]),
        "--resume of an unknown name": (["--resume", "--name", "never-ran"], {}, ["'never-ran'", "accepted"]),
        "--resume, stored space holds redacted credentials": (
            ["--resume", "--name", "div", "--storage-path", stored["storage"], "--tracking-uri", stored["uri"]], {},
            ["credentials", "accepted"]),
        "--resume with another space": (
            ["--resume", "--name", "div", "--space", stored["space"], "--epochs", "4", "--storage-path",
             stored["storage"], "--tracking-uri", stored["uri"], *TINY, "--set", stored["set"]], {},
            ["differ", "stored sweep", "new --name"]),
    }


def test_bad_input_one_line_exit_2_nothing_written(tmp_path, diverged_sweep):
    inputs = tmp_path / "inputs"
    (inputs / "empty-data").mkdir(parents=True)
    (inputs / "file.txt").write_text("a regular file\n")
    for fname, text in BAD_SPACES.items():
        (inputs / fname).write_text(text)
    s = diverged_sweep
    stored = {"space": str(s["dir"] / "diverge_space.py"), "storage": str(s["dir"] / "results"),
              "uri": s["uri"], "set": "data_root=https://bob:hunter2@data.example/digits"}
    before_div = sorted((str(p), p.stat().st_mtime_ns) for p in (s["dir"] / "results").rglob("*"))

    procs = {}
    for i, (case, (argv, env, _)) in enumerate(_bad_cases(tmp_path, stored).items()):
        cwd = tmp_path / f"case{i}"
        cwd.mkdir()
        procs[case] = (cwd, time.monotonic(), subprocess.Popen(
            [sys.executable, "-m", "search.pareto", *argv], cwd=cwd, env=_env(**env),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    problems, timings, messages = [], {}, {}
    for case, (_argv, _extra, words) in _bad_cases(tmp_path, stored).items():
        cwd, t0, p = procs[case]
        try:
            out, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            p.kill()
            problems.append(f"{case}: still running after 240 s")
            continue
        timings[case] = round(time.monotonic() - t0, 1)
        lines = err.strip().splitlines()
        if p.returncode != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or out.strip():
            problems.append(f"{case}: rc={p.returncode} stdout={out[-300:]!r} stderr={err[-600:]!r}")
            continue
        messages[case] = lines[0]
        missing = [w for w in words if w not in lines[0]]
        if missing:
            problems.append(f"{case}: message lacks {missing}: {lines[0]}")
        written = [str(f.relative_to(cwd)) for f in cwd.rglob("*")]
        if written:
            problems.append(f"{case}: wrote {written}")
    # nothing written anywhere else either: inputs untouched, no storage dir/db under them
    assert sorted(str(p.relative_to(inputs)) for p in inputs.rglob("*")) == sorted(
        ["empty-data", "file.txt", *BAD_SPACES])
    assert not Path("/proc/brsearch-results").exists()
    after_div = sorted((str(p), p.stat().st_mtime_ns) for p in (s["dir"] / "results").rglob("*"))
    assert after_div == before_div, (set(after_div) ^ set(before_div), problems)
    assert not problems, "\n".join(problems)
    record("bad input", cases=len(timings), exit_code=2, written=0, seconds=timings, messages=messages)


# --- 5. atomic results --------------------------------------------------------------------------

def _frames(n: int):
    from search.results import front_frame

    df = pd.DataFrame({"trial_id": [f"t{i}" for i in range(n)], "trial_name": [f"trainable_t{i}" for i in range(n)],
                       "status": ["completed"] * n, "reason": [""] * n,
                       "clean_acc": [0.1 * i for i in range(n)], "robust_acc": [0.05 * i for i in range(n)],
                       "channel_sparsity": [0.5 - 0.1 * i for i in range(n)], "pareto": [True] * n})
    return df, front_frame(df)


def test_atomic_results_survive_a_crash_mid_write(tmp_path):
    from search.results import write_tables
    from trainables.fileio import atomic_path

    out = tmp_path / "sweep"
    write_tables(out, *_frames(3))
    good = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(good) == {"trials.parquet", "trials.csv", "pareto.parquet", "pareto.csv"}
    target = out / "trials.parquet"
    new_bytes = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(_frames(5)[0]), new_bytes)
    half = new_bytes.getvalue().to_pybytes()
    half = half[: len(half) // 2]

    # (a) the writer raises half-way: the old file stays, no temporary file is left
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(half)
            raise RuntimeError("disk full")
    assert target.read_bytes() == good["trials.parquet"] and len(pq.read_table(target)) == 3
    assert sorted(p.name for p in out.iterdir()) == sorted(good)

    # (b) a real writer fails half-way: pyarrow's CSV writer rejects a list column after the
    # Parquet files of the same call were written
    df, front = _frames(4)
    df["bad"] = [[1, 2]] * 4
    with pytest.raises(pa.ArrowException):
        write_tables(out, df, front)
    assert (out / "trials.csv").read_bytes() == good["trials.csv"]
    assert len(pq.read_table(out / "trials.parquet")) == 4  # that one was complete: it was replaced
    assert sorted(p.name for p in out.iterdir()) == sorted(good)

    # (c) the writing process is SIGKILLed half-way: the old file stays; the stale temporary file
    # is removed by the next write
    code = (f"import os, signal\nfrom trainables.fileio import atomic_path\n"
            f"with atomic_path({str(target)!r}) as tmp:\n"
            f"    f = open(tmp, 'wb'); f.write({half!r}); f.flush(); os.fsync(f.fileno())\n"
            f"    os.kill(os.getpid(), signal.SIGKILL)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO)
    assert p.returncode == -signal.SIGKILL
    assert len(pq.read_table(target)) == 4
    assert len(list(out.glob(".trials.parquet.tmp-*"))) == 1
    write_tables(out, *_frames(5))
    assert len(pq.read_table(target)) == 5 and not list(out.glob(".*tmp-*"))
    record("crash mid-write of results", cases=3, previous_file_intact=True, temp_left=0)


# --- 6. safe defaults ---------------------------------------------------------------------------

def test_no_mlflow_server_instructions_bind_all_interfaces():
    """cluster configs and docs never start the MLflow server (or `mlflow ui`) on a public
    interface; tests/test_cluster_config.py covers the dashboard, Ray client and security group."""
    files = [REPO / "cluster.yaml", REPO / "cluster.local.yaml", REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    found = 0
    for f in files:
        if not f.exists():
            continue
        text = f.read_text().replace("\\\n", " ")
        for m in re.finditer(r"mlflow (server|ui)\b[^\n`']*", text):
            found += 1
            cmd = m.group(0)
            host = re.search(r"(--host|-h)[ =]+(\S+)", cmd)
            assert host is None or host.group(2) in ("127.0.0.1", "localhost"), f"{f.name}: {cmd}"
    assert found, "no mlflow server/ui instructions found"


def test_a_resume_goes_on_while_the_tracking_server_is_away(tmp_path, capsys):
    """A new sweep refuses an unreachable tracking server; a --resume says so in one line and goes
    on (its logging is queued until the server answers), so an outage never blocks a resume. Here
    the resumed sweep does not exist, so the next check refuses it: the tracking check passed."""
    from search.driver import Flags, prepare
    from trainables.config import ConfigError

    common = ["--storage-path", str(tmp_path / "r"), "--tracking-uri", "http://127.0.0.1:1"]
    with pytest.raises(ConfigError, match="cannot reach 127.0.0.1:1"):
        prepare(Flags.parse(["--name", "new", *common]))
    with pytest.raises(ConfigError, match="no sweep named 'gone'"):
        prepare(Flags.parse(["--name", "gone", "--resume", *common]))
    err = [ln for ln in capsys.readouterr().err.splitlines() if "tracking-uri" in ln]
    assert len(err) == 1 and "cannot reach 127.0.0.1:1 now" in err[0] and "the logging waits" in err[0]
