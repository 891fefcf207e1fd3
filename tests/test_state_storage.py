"""The sweep's state lives on its storage: a sweep on `s3://` is interrupted, its
driver-local state deleted, and `--resume` from another working directory (and another state
cache: another machine) finishes it with nothing lost or duplicated. S3 is moto's threaded server
on loopback, reached through pyarrow's S3 filesystem (the client path users hit); Ray, Optuna and
MLflow are real. Plus fast unit tests of the storage choices.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _mlflow_store import mlflow_uri
from _study import sweep_study

from search.storage import SweepLocation, join_uri, open_study_storage, study_spec_from_flag

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--subset-train", "200", "--subset-test", "50", "--epochs", "1", "--quiet", "--num-cpus", "2",
        "--set", "depth=8", "--set", "width=4", "--set", "attack_steps=2", "--set", "proxy_eval_size=32",
        "--set", "cw=false", "--set", "eval_attack.steps=2"]
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Moto:
    """moto's S3 server on a fixed loopback port, stopped and started again at will: its objects
    live in this process, so they are still there when it is back (an outage, not a data loss)."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def moto_s3(monkeypatch):
    """A bucket on a real S3 API on 127.0.0.1; yields the storage URI of a folder in it, a
    pyarrow filesystem on it, and the server."""
    pytest.importorskip("moto")
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    moto = _Moto()
    moto.start()
    try:
        import pyarrow.fs as pafs

        # allow_delayed_open: small objects go up in one PutObject; pyarrow 25 rejects moto's answer
        # to CompleteMultipartUpload (an empty ETag), so multipart uploads fail against moto
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{moto.port}", scheme="http", access_key="testing",
                               secret_key="testing", region="us-east-1", allow_bucket_creation=True,
                               allow_delayed_open=True)
        fs.create_dir("sweeps")
        yield (f"s3://sweeps/results?endpoint_override=127.0.0.1:{moto.port}&scheme=http&allow_delayed_open=true",
               fs, moto)
    finally:
        moto.stop()


@pytest.fixture
def s3(moto_s3):
    """The storage URI of a folder in a bucket on loopback S3, and a pyarrow filesystem on it."""
    yield moto_s3[:2]


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0", BRSEARCH_STATE_CACHE=str(cache), **CREDS)
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _read(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


@pytest.mark.slow
def test_s3_sweep_resumes_from_elsewhere_after_local_state_is_gone(s3, tmp_path, monkeypatch):
    import optuna
    import pandas as pd
    from mlflow.tracking import MlflowClient

    storage, fs = s3
    name, here, there = "s3r", tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    tracking = mlflow_uri(tmp_path)
    cmd = [sys.executable, "-m", "search.pareto", "--name", name, "--trials", "3", "--max-concurrent", "1",
           "--seed", "3", "--storage-path", storage, "--tracking-uri", tracking, *TINY]
    out = here / "out.log"
    with open(out, "w") as fo:
        proc = subprocess.Popen(cmd, cwd=here, env=_env(tmp_path / "cache-here"), stdout=fo,
                                stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 900  # a loaded 2-core machine: minutes per tiny trial
            while "[1/3]" not in out.read_text(errors="replace"):
                assert proc.poll() is None, out.read_text()[-3000:]
                assert time.monotonic() < deadline, out.read_text()[-3000:]
                time.sleep(0.3)
            os.kill(proc.pid, signal.SIGINT)
            rc = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
    log = out.read_text()
    assert rc == 130, log[-3000:]
    assert "1 at once (1 CPU, 0 GPU each" in log
    hint = [ln for ln in log.splitlines() if "continue with: python -m search.pareto" in ln]
    assert len(hint) == 1, log[-3000:]
    exp = f"sweeps/results/{name}"
    first = pd.read_parquet(io.BytesIO(_read(fs, f"{exp}/trials.parquet")))
    assert 1 <= (first["status"] == "completed").sum() < 3, first[["trial_id", "status"]]
    # the state is on S3, with the resources the sweep asked for
    record = json.loads(_read(fs, f"{exp}/brsearch/sweep.json"))
    assert (record["cpus_per_trial"], record["gpus_per_trial"], record["max_concurrent"]) == (1.0, 0.0, 1)
    assert b'"study_name"' in _read(fs, f"{exp}/brsearch/optuna.journal")  # Optuna's journal (JSON lines)

    # a new sweep of that name is refused, in one line, before anything runs
    again = subprocess.run(cmd, cwd=there, env=_env(tmp_path / "cache-there"), capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr[-2000:]
    assert f"sweep {name!r} already exists" in again.stderr

    # the driver's machine is gone: its local state with it
    shutil.rmtree(tmp_path / "cache-here")
    resume = shlex.split(hint[0].split("continue with: python ", 1)[1])  # as a shell would
    with open(there / "out.log", "w") as fo:
        rc2 = subprocess.run([sys.executable, *resume], check=False, cwd=there, env=_env(tmp_path / "cache-there"),
                             stdout=fo, stderr=subprocess.STDOUT, timeout=900).returncode
    log2 = (there / "out.log").read_text()
    assert rc2 == 0, log2[-4000:]
    assert "1 at once (1 CPU, 0 GPU each" in log2  # the stored resources

    trials = pd.read_parquet(io.BytesIO(_read(fs, f"{exp}/trials.parquet")))
    assert len(trials) == 3 and trials["trial_id"].is_unique, trials[["trial_id", "status"]]
    assert (trials["status"] == "completed").all(), trials[["trial_id", "status", "reason"]]
    assert set(first.loc[first["status"] == "completed", "trial_id"]) <= set(trials["trial_id"])  # not re-run

    journal = tmp_path / "optuna-from-s3.journal"
    journal.write_bytes(_read(fs, f"{exp}/brsearch/optuna.journal"))
    study = sweep_study(tmp_path, name, journal)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["ray_trial_id"] for t in done) == sorted(trials["trial_id"])
    assert not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))

    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("brsearch").experiment_id], max_results=100)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) - len(children) == 1
    assert sorted(r.data.tags["ray_trial_id"] for r in children) == sorted(trials["trial_id"])

    # the post-sweep tools read the sweep from S3 too, on a machine with nothing cached: the
    # strong evaluation writes its columns and its record back to S3, and a rerun from yet another
    # machine finds the record there and evaluates nothing again; the exporter takes a trial
    from search import evaluate, export

    quick = ["--subset-test", "16", "--aa-steps", "1", "--aa-eot", "1", "--square-queries", "5",
             "--eot-samples", "1", "--eot-steps", "1", "--pgd-steps", "2", "--threads", "1", "--quiet"]
    tid = trials["trial_id"].iloc[0]
    for machine in ("eval-a", "eval-b"):
        monkeypatch.setenv("BRSEARCH_STATE_CACHE", str(tmp_path / machine))
        assert evaluate.main(["--name", name, "--storage-path", storage, "--trials", tid, *quick]) == 0
    after = pd.read_parquet(io.BytesIO(_read(fs, f"{exp}/trials.parquet")))
    assert after.set_index("trial_id").loc[tid, "test_strong_n"] == 16
    # one APGD iteration is not AutoAttack-rand's protocol: the column is test_apgd_acc
    assert after["test_apgd_acc"].notna().sum() == 1 and after["test_aa_acc"].isna().all() and len(after) == 3
    saved = json.loads(_read(fs, f"{exp}/brsearch/strong_eval.json"))
    assert [list(v["trials"]) for v in saved.values()] == [[tid]]
    hist = client.get_metric_history(next(r.info.run_id for r in children if r.data.tags["ray_trial_id"] == tid),
                                     "test_apgd_acc")
    assert len(hist) == 1  # two evaluate runs, logged once
    monkeypatch.setenv("BRSEARCH_STATE_CACHE", str(tmp_path / "export"))
    assert export.main(["--name", name, "--trial", tid, "--storage-path", storage,
                        "--out", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / f"{name}-{tid}.brpk").stat().st_size > 0


def _run_until(cmd: list[str], cwd: Path, env: dict[str, str], seen: str, sig: int) -> tuple[int, str]:
    """Start the sweep in its own process group, wait until its output shows `seen`, then send
    `sig` to the whole group (SIGKILL: the driver's machine gone, Ray's processes with it)."""
    out = cwd / "out.log"
    with open(out, "w") as fo:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fo, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 900  # a loaded 2-core machine: minutes per tiny trial
            while seen not in out.read_text(errors="replace"):
                assert proc.poll() is None, out.read_text()[-3000:]
                assert time.monotonic() < deadline, out.read_text()[-3000:]
                time.sleep(0.3)
            os.killpg(proc.pid, sig) if sig == signal.SIGKILL else os.kill(proc.pid, sig)
            rc = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return rc, out.read_text()


@pytest.mark.slow
@pytest.mark.long
def test_s3_sweep_killed_resumes_from_another_directory_either_way(s3, tmp_path):
    """The driver's process group SIGKILLed on `s3://` storage; from another working directory (so
    the default --data-root resolves elsewhere) the original command line plus --resume continues
    it, and interrupted again, the command its message prints finishes it from a third: every
    trial finished once, none repeated, in trials.parquet and in the Optuna study."""
    import optuna
    import pandas as pd

    storage, fs = s3
    name = "s3any"
    dirs = [tmp_path / d for d in ("one", "two", "three")]
    for d in dirs:
        d.mkdir()
    cmd = [sys.executable, "-m", "search.pareto", "--name", name, "--trials", "3", "--max-concurrent", "1",
           "--seed", "5", "--storage-path", storage, "--tracking-uri", mlflow_uri(tmp_path), *TINY]
    rc, log = _run_until(cmd, dirs[0], _env(tmp_path / "cache-one"), "[1/3]", signal.SIGKILL)
    assert rc == -signal.SIGKILL, log[-3000:]
    exp = f"sweeps/results/{name}"

    rc, log = _run_until([*cmd, "--resume"], dirs[1], _env(tmp_path / "cache-two"), "[2/3]", signal.SIGINT)
    assert rc == 130, log[-3000:]
    assert "differ from the stored sweep" not in log
    assert "the data moved" not in log  # digits reads no files: nothing to say about ./data
    hint = [ln for ln in log.splitlines() if "continue with: python -m search.pareto" in ln]
    assert len(hint) == 1, log[-3000:]
    second = pd.read_parquet(io.BytesIO(_read(fs, f"{exp}/trials.parquet")))
    done_before = set(second.loc[second["status"] == "completed", "trial_id"])
    assert len(done_before) >= 2, second[["trial_id", "status"]]

    resume = shlex.split(hint[0].split("continue with: python ", 1)[1])  # as a shell would
    with open(dirs[2] / "out.log", "w") as fo:
        rc = subprocess.run([sys.executable, *resume], check=False, cwd=dirs[2], env=_env(tmp_path / "cache-three"),
                            stdout=fo, stderr=subprocess.STDOUT, timeout=900).returncode
    log = (dirs[2] / "out.log").read_text()
    assert rc == 0, log[-4000:]

    trials = pd.read_parquet(io.BytesIO(_read(fs, f"{exp}/trials.parquet")))
    assert len(trials) == 3 and trials["trial_id"].is_unique, trials[["trial_id", "status"]]
    assert (trials["status"] == "completed").all(), trials[["trial_id", "status", "reason"]]
    assert done_before <= set(trials["trial_id"])
    journal = tmp_path / "optuna-from-s3.journal"
    journal.write_bytes(_read(fs, f"{exp}/brsearch/optuna.journal"))
    study = sweep_study(tmp_path, name, journal)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["ray_trial_id"] for t in done) == sorted(trials["trial_id"])  # each once
    assert not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))


def _study_matches(tmp_path: Path, name: str, journal: bytes, trials) -> None:
    """Each trial of the table finished once in the Optuna study, and none is left RUNNING."""
    import optuna

    path = tmp_path / f"{name}-optuna.journal"
    path.write_bytes(journal)
    study = sweep_study(tmp_path, name, path)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["ray_trial_id"] for t in done) == sorted(trials["trial_id"])
    assert not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))


@pytest.mark.slow
@pytest.mark.long
def test_s3_away_for_a_minute_does_not_end_the_sweep(moto_s3, tmp_path):
    """The object store stops while a sweep on it runs, and is back a minute later: uploads (the
    trials' checkpoints, the driver's state) wait for it, and the sweep ends with every trial
    finished once."""
    import pandas as pd

    storage, fs, moto = moto_s3
    name = "s3away"
    cmd = [sys.executable, "-m", "search.pareto", "--name", name, "--trials", "3", "--max-concurrent", "1",
           "--seed", "7", "--storage-path", storage, "--tracking-uri", mlflow_uri(tmp_path), *TINY, "--epochs", "3"]
    env = {**_env(tmp_path / "cache"), "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # snapshots (uploads) during the outage
    out = tmp_path / "out.log"
    with open(out, "w") as fo:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=fo, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 900
            while "[1/3]" not in out.read_text(errors="replace"):
                assert proc.poll() is None, out.read_text()[-3000:]
                assert time.monotonic() < deadline, out.read_text()[-3000:]
                time.sleep(0.3)
            moto.stop()
            time.sleep(60)
            assert proc.poll() is None, out.read_text()[-3000:]  # the sweep waits
            moto.start()
            rc = proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    log = out.read_text()
    assert rc == 0, log[-4000:]
    assert "brsearch: storage unreachable" in log and "storage reachable again" in log, log[-4000:]
    exp = f"sweeps/results/{name}"
    trials = pd.read_parquet(io.BytesIO(_read(fs, f"{exp}/trials.parquet")))
    assert len(trials) == 3 and trials["trial_id"].is_unique, trials[["trial_id", "status"]]
    assert (trials["status"] == "completed").all(), trials[["trial_id", "status", "reason"]]
    _study_matches(tmp_path, name, _read(fs, f"{exp}/brsearch/optuna.journal"), trials)


@pytest.mark.slow
def test_a_torn_checkpoint_is_detected_on_resume(tmp_path):
    """The driver's process group killed, then the checkpoint the stored experiment names cut in
    half (a crash mid-write): `--resume` says so in one line and the trial goes on from its last
    good checkpoint (or from the start when there is none) to finish once."""
    import pandas as pd
    from ray.tune import ExperimentAnalysis

    name, results = "torn", tmp_path / "results"
    chatty = [a for a in TINY if a != "--quiet"]  # the trial's own lines reach the driver's output
    cmd = [sys.executable, "-m", "search.pareto", "--name", name, "--trials", "1", "--seed", "1",
           "--storage-path", str(results), "--tracking-uri", mlflow_uri(tmp_path), *chatty, "--epochs", "4"]
    env = {**_env(tmp_path / "cache"), "TUNE_GLOBAL_CHECKPOINT_S": "0"}  # a snapshot at every step

    def named() -> Path | None:
        try:
            t = ExperimentAnalysis(str(results / name)).trials
        except Exception:  # noqa: BLE001 - not written yet, or being written
            return None
        return Path(t[0].checkpoint.path) if t and t[0].checkpoint else None

    out = tmp_path / "out.log"
    with open(out, "w") as fo:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=fo, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 900
            while (ck := named()) is None or ck.name < "checkpoint_000001":
                assert proc.poll() is None, out.read_text()[-3000:]
                assert time.monotonic() < deadline, out.read_text()[-3000:]
                time.sleep(0.5)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    ck = named()
    state = ck / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])

    resume = [sys.executable, "-m", "search.pareto", "--name", name, "--storage-path", str(results), "--resume"]
    proc = subprocess.run(resume, cwd=tmp_path, env=_env(tmp_path / "cache"), capture_output=True, text=True,
                          timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    said = [ln for ln in log.splitlines() if f"{ck.name} is unreadable" in ln]
    assert len(said) == 1 and ("resuming from checkpoint_" in said[0] or "starting over" in said[0]), log[-4000:]
    trials = pd.read_parquet(results / name / "trials.parquet")
    assert len(trials) == 1 and (trials["status"] == "completed").all(), trials[["trial_id", "status", "reason"]]
    _study_matches(tmp_path, name, (results / name / "brsearch" / "optuna.journal").read_bytes(), trials)


# --- fast unit tests ---------------------------------------------------------------------------------

def test_join_uri_keeps_the_query_last():
    assert join_uri("s3://b/p?endpoint_override=h:1&scheme=http", "n", "brsearch") == \
        "s3://b/p/n/brsearch?endpoint_override=h:1&scheme=http"
    assert join_uri("gs://b/p/", "n") == "gs://b/p/n"


def test_study_storage_choice(tmp_path, monkeypatch):
    local = SweepLocation(str(tmp_path), "a")
    assert local.study_spec() == {"journal": str(tmp_path / "a" / "brsearch" / "optuna.journal")}
    (tmp_path / "a" / "brsearch").mkdir(parents=True)
    (tmp_path / "a" / "brsearch" / "optuna.db").touch()  # a sweep started before the journal: kept
    assert local.study_spec() == {"sqlite": str(tmp_path / "a" / "brsearch" / "optuna.db")}
    monkeypatch.setenv("BRSEARCH_STATE_CACHE", str(tmp_path / "cache"))
    remote = SweepLocation("s3://b/r?endpoint_override=h:1", "a")
    assert remote.study_spec() == {"mirror": "s3://b/r/a/brsearch?endpoint_override=h:1"}
    assert remote.state_dir.parent.parent == tmp_path / "cache"
    assert SweepLocation("s3://b/r?endpoint_override=h:1", "a", "postgresql://u@db/optuna").study_spec() == \
        {"url": "postgresql://u@db/optuna"}
    assert study_spec_from_flag(str(tmp_path / "s.journal")) == {"journal": str(tmp_path / "s.journal")}
    with pytest.raises(ValueError, match="--study-storage redis://x"):
        study_spec_from_flag("redis://x")


@pytest.mark.parametrize("kind", ["journal", "sqlite", "mirror"])
def test_study_storage_pickles_as_its_spec(tmp_path, monkeypatch, kind):
    """Tune pickles the searcher with its study: unpickled elsewhere (another cache here), the
    storage opens the state at the new place, which is where --resume restored it."""
    import optuna

    monkeypatch.setenv("BRSEARCH_STATE_CACHE", str(tmp_path / "one"))
    spec = {"journal": {"journal": str(tmp_path / "s.journal")}, "sqlite": {"sqlite": str(tmp_path / "s.db")},
            "mirror": {"mirror": "s3://b/r/n/brsearch"}}[kind]
    study = optuna.create_study(study_name="n", storage=open_study_storage(spec), directions=["maximize"] * 2)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=3)
    blob = pickle.dumps(study)
    if kind == "mirror":  # another machine: the mirror was restored into another cache
        src = next((tmp_path / "one").iterdir())
        shutil.copytree(src, tmp_path / "two" / src.name)
        shutil.rmtree(tmp_path / "one")
        monkeypatch.setenv("BRSEARCH_STATE_CACHE", str(tmp_path / "two"))
    again = pickle.loads(blob)
    assert len(again.get_trials(deepcopy=False)) == 3
    again.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=1)
    assert len(optuna.load_study(study_name="n", storage=open_study_storage(spec)).trials) == 4


def test_a_paced_journal_is_written_at_flush_and_read_at_once(tmp_path):
    """The sweep's study is written when Tune snapshots the searcher (SnapshotPacedJournal): this
    process reads every ask and tell at once, the file holds them only after a flush, in order,
    and the storage pickles as its paced spec."""
    import optuna

    from search.storage import PACED

    path = tmp_path / "optuna.journal"
    paced = open_study_storage({"journal": str(path), PACED: "1"})
    study = optuna.create_study(study_name="s", storage=paced, directions=["maximize"])
    t = study.ask()
    study.tell(t, t.suggest_float("x", 0, 1))
    assert [x.state.name for x in study.get_trials()] == ["COMPLETE"]  # the sampler sees it now

    def on_disk() -> list:
        try:
            return optuna.load_study(study_name="s", storage=open_study_storage({"journal": str(path)})).get_trials()
        except KeyError:
            return []

    assert on_disk() == []
    paced.flush()
    assert [x.state.name for x in on_disk()] == ["COMPLETE"]
    t2 = study.ask()
    study.tell(t2, t2.suggest_float("x", 0, 1))
    assert len(on_disk()) == 1 and len(study.get_trials()) == 2
    paced.flush()
    assert [(x.number, x.params, x.values) for x in on_disk()] == [(x.number, x.params, x.values) for x in study.get_trials()]
    again = pickle.loads(pickle.dumps(paced))
    assert again.brsearch_spec[PACED] and len(optuna.load_study(study_name="s", storage=again).get_trials()) == 2


def test_a_torn_last_journal_record_is_cut_off(tmp_path):
    """A driver killed inside an append leaves a last line without its newline: without the cut,
    the next record is appended onto it and the journal no longer loads."""
    import optuna

    path = tmp_path / "optuna.journal"
    study = optuna.create_study(study_name="n", storage=open_study_storage({"journal": str(path)}), directions=["maximize"] * 2)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=2)
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"op_code":4,"worker_id":"w","study_id":0,"dat')  # killed mid-write
    again = optuna.load_study(study_name="n", storage=open_study_storage({"journal": str(path)}))
    again.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=1)
    assert path.read_bytes().startswith(whole)
    assert len(optuna.load_study(study_name="n", storage=open_study_storage({"journal": str(path)})).trials) == 3


def test_resume_reuses_the_stored_resources(tmp_path):
    """--resume takes resources and concurrency from sweep.json; the same command again (its
    --max-concurrent above --trials was stored capped) is accepted, another concurrency refused."""
    from search.driver import Flags, adopt_stored
    from trainables.config import ConfigError

    SweepLocation(str(tmp_path), "r").write_record(
        {"name": "r", "trials": 3, "cpus_per_trial": 4.0, "gpus_per_trial": 1.0, "max_concurrent": 3})
    flags, _ = adopt_stored(Flags.parse(["--name", "r", "--resume", "--storage-path", str(tmp_path)]))
    assert (flags.cpus_per_trial, flags.gpus_per_trial, flags.max_concurrent) == (4.0, 1.0, 3)
    adopt_stored(Flags.parse(["--name", "r", "--resume", "--storage-path", str(tmp_path), "--max-concurrent", "8"]))
    with pytest.raises(ConfigError, match="--max-concurrent 2 differs"):
        adopt_stored(Flags.parse(["--name", "r", "--resume", "--storage-path", str(tmp_path), "--max-concurrent", "2"]))


def _plan_in(cwd: Path, monkeypatch, *argv: str):
    from search.driver import Flags, prepare

    monkeypatch.chdir(cwd)
    return prepare(Flags.parse(["--name", "w", "--storage-path", str(cwd / "res"), *argv]))


def test_a_sweep_is_its_space_and_data_not_where_the_data_sits(tmp_path, monkeypatch):
    """The default --data-root ./data resolves against the working directory: the same flags from
    another directory are the same sweep; another pinned value or other data is not."""
    from search.driver import data_moved, place, same_sweep

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    flags = ["--dataset", "mnist", "--download", "--epochs", "2", "--subset-train", "100"]
    a, b = (_plan_in(tmp_path / d, monkeypatch, *flags) for d in ("a", "b"))
    assert a.space.fixed["data_root"] != b.space.fixed["data_root"]
    stored = json.loads(json.dumps(a.record()))
    assert same_sweep(stored, b.space)
    assert data_moved(stored["data_place"], place(b.space)) == \
        f"data_root {tmp_path / 'a' / 'data'} -> {tmp_path / 'b' / 'data'}"
    assert data_moved(stored["data_place"], place(a.space)) is None
    other = _plan_in(tmp_path / "b", monkeypatch, *flags[:-1], "200")
    assert not same_sweep(stored, other.space)
    assert not same_sweep(stored, b.space.pin({"epochs": 3}))
    # a sweep recorded with the place in its fingerprint (and a space redacted in sweep.json)
    assert same_sweep({"fingerprint": a.space.fingerprint()}, a.space)
    assert not same_sweep({"fingerprint": a.space.fingerprint()}, b.space.pin({"epochs": 3}))
    # digits reads no files: no line about its data root
    d = _plan_in(tmp_path / "a", monkeypatch)
    assert data_moved(d.record()["data_place"], {**place(d.space), "data_root": "/elsewhere"}) is None


def test_a_folder_dataset_is_its_listing(tmp_path, monkeypatch):
    """The same images at another mount point are the same data; another listing is not."""
    from search.driver import data_identity

    for copy in ("one", "two"):
        for split, n in (("train", 3), ("test", 2)):
            for cls in ("cat", "dog"):
                folder = tmp_path / copy / "cifar" / split / cls
                folder.mkdir(parents=True)
                for i in range(n):
                    (folder / f"{i}.png").write_bytes(b"x")
    one, two = (data_identity(f"folder:{tmp_path / c / 'cifar'}") for c in ("one", "two"))
    assert one == two and one.startswith("folder:")
    (tmp_path / "two" / "cifar" / "test" / "dog" / "9.png").write_bytes(b"x")
    assert data_identity(f"folder:{tmp_path / 'two' / 'cifar'}") != one
    assert data_identity(f"folder:{tmp_path / 'nowhere'}") is None  # a head without the data
    assert data_identity("cifar10") == "cifar10"


def test_resume_with_a_new_data_root_moves_the_stored_space(tmp_path, monkeypatch):
    """`--name X --resume --data-root D` keeps the stored space and pins the new place in it."""
    from search.driver import Flags, adopt_stored, same_sweep

    a = _plan_in(tmp_path, monkeypatch, "--dataset", "mnist", "--download")
    SweepLocation(str(tmp_path / "res"), "w").write_record(a.record())
    flags, space = adopt_stored(Flags.parse(["--name", "w", "--resume", "--storage-path", str(tmp_path / "res"),
                                             "--data-root", str(tmp_path / "moved")]))
    assert space is not None and space.fixed["data_root"] == str(tmp_path / "moved")
    assert space.fixed["dataset"] == "mnist" and space.fixed["download"] is True
    assert same_sweep(a.record(), space)


def _checkpoints(trial: Path, n: int) -> list[Path]:
    import torch

    out = []
    for i in range(n):
        d = trial / f"checkpoint_{i:06d}"
        d.mkdir(parents=True)
        torch.save({"epoch": i + 1}, d / "state.pt")
        out.append(d)
    return out


def test_a_torn_checkpoint_falls_back_to_the_last_good_one(tmp_path):
    """A checkpoint file cut short (a crash mid-write) or gone: the trial's newest readable
    checkpoint before it, and the reason; none readable: None, so the trial starts over."""
    from ray import tune

    from trainables.tune import readable_state

    cks = _checkpoints(tmp_path / "trial_a", 3)
    state, used, why = readable_state(tune.Checkpoint(str(cks[2])))
    assert (state["epoch"], used, why) == (3, "checkpoint_000002", "")
    whole = (cks[2] / "state.pt").read_bytes()
    (cks[2] / "state.pt").write_bytes(whole[: len(whole) // 2])
    state, used, why = readable_state(tune.Checkpoint(str(cks[2])))
    assert (state["epoch"], used) == (2, "checkpoint_000001") and why, why
    shutil.rmtree(cks[1])  # pruned, or never written: the one before it
    state, used, _ = readable_state(tune.Checkpoint(str(cks[2])))
    assert (state["epoch"], used) == (1, "checkpoint_000000")
    (cks[0] / "state.pt").write_bytes(b"")
    state, used, why = readable_state(tune.Checkpoint(str(cks[0])))
    assert state is None and why


def test_the_keeper_keeps_the_newest_and_what_recent_snapshots_name(tmp_path):
    """Tune keeps every checkpoint (no forced snapshots); the keeper deletes a trial's old ones
    but never one that one of the last experiment snapshots names (the stored state may be that
    one), and after a restore (pickled, then its saved state) it goes on pruning."""
    from types import SimpleNamespace

    from ray import tune

    from search.storage import CheckpointKeeper

    keeper = CheckpointKeeper(keep=2, snapshots=2)
    trial = SimpleNamespace(trial_id="a")  # the keeper reads only the id of Tune's Trial
    cks = _checkpoints(tmp_path / "trial_a", 8)

    def saved(i: int) -> None:
        keeper.on_checkpoint(iteration=i, trials=[trial], trial=trial, checkpoint=tune.Checkpoint(str(cks[i])))
        keeper.on_experiment_end(trials=[trial])  # waits for the deletions

    def left() -> list[int]:
        return sorted(int(p.name[-6:]) for p in (tmp_path / "trial_a").iterdir())

    saved(0)
    saved(1)
    state = keeper.get_state()  # a snapshot names checkpoint 1
    saved(2)
    saved(3)
    assert left() == [1, 2, 3, 4, 5, 6, 7]  # 0 gone; 1 named by a recent snapshot
    keeper.get_state()  # names 3
    keeper.get_state()  # names 3: the snapshot naming 1 is no longer among the last two
    saved(4)
    assert left() == [3, 4, 5, 6, 7]
    # a restore from the first snapshot: Tuner.restore unpickles the callbacks, then hands them
    # the state that snapshot saved; the trial goes on from checkpoint 1, and Tune writes its next
    # checkpoints under the same names again
    keeper = pickle.loads(pickle.dumps(CheckpointKeeper(keep=2, snapshots=2)))
    keeper.set_state(state)
    shutil.rmtree(tmp_path / "trial_a")
    cks = _checkpoints(tmp_path / "trial_a", 4)
    saved(2)
    assert left() == [1, 2, 3]  # 0, which the restored state knew, pruned
    saved(3)
    assert left() == [2, 3]
