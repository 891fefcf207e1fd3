"""Unit tests of the trial-outcome mapping and of the MLflow callback on their own (the sweep tests
cover them only end to end). Real Ray `Trial` objects (stubs: no trainable runs), a real Optuna
study and a real sqlite MLflow store; nothing is mocked."""
from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.experiment import Trial

from search.front import DEFAULT_REFERENCE, hypervolume
from search.optimizer import ParetoSearch, load_space
from search.results import trial_outcome
from search.tracking import MLflowSweepCallback, SweepRun, start_parent_run
from trainables.contract import OBJECTIVES

STORAGE: Path
FULL = {"final": True, "epoch": 3, "max_epochs": 3, "clean_acc": 0.8, "robust_acc": 0.4, "channel_sparsity": 0.1}


@pytest.fixture(scope="module", autouse=True)
def _storage(tmp_path_factory):
    global STORAGE
    STORAGE = tmp_path_factory.mktemp("tune")


def _trial(tid: str, config: dict | None = None, results: list[dict] = (), status: str | None = None,
           error: Exception | None = None) -> Trial:
    """A Tune trial object as the controller keeps it: results recorded, status set, an error
    written to the trial's error file the way Tune writes it."""
    from ray.train._internal.storage import StorageContext

    storage = StorageContext(str(STORAGE), "exp", trial_dir_name=tid)
    t = Trial("trainable", config=config or {"lr": 0.1}, trial_id=tid, stub=True, storage=storage)
    for r in results:
        t.update_last_result(dict(r))
    if error is not None:
        Path(t.local_path).mkdir(parents=True, exist_ok=True)
        t.handle_error(error)
    if status:
        t.set_status(status)
    return t


# --- search.results.trial_outcome (trials.parquet status, MLflow tags) -----------------------------

@pytest.mark.parametrize("results, status, expected", [
    ([FULL], Trial.TERMINATED, ("completed", "")),
    ([FULL], Trial.RUNNING, ("completed", "")),  # in Tune's complete callback the status is still RUNNING
    ([{**FULL, "final": False, "epoch": 1}], Trial.TERMINATED, ("stopped", "stopped after epoch 1")),
    ([{**FULL, "epoch": 2}], Trial.TERMINATED, ("stopped", "stopped after epoch 2")),  # final flag, budget short
    ([{"epoch": 1, "diverged": True, "failure_reason": "DivergedError: loss is nan"}], Trial.TERMINATED,
     ("failed", "DivergedError: loss is nan")),
    ([{"epoch": 1, "diverged": True}], Trial.TERMINATED, ("failed", "DivergedError")),
    ([], Trial.TERMINATED, ("failed", "no result")),
], ids=["complete", "complete-while-running", "stopped", "final-short", "diverged", "diverged-no-reason",
        "no-result"])
def test_trial_outcome(results, status, expected):
    assert trial_outcome(_trial("t0", results=results, status=status)) == expected


@pytest.fixture(scope="module")
def ray_session():
    """Tune keeps a trial's error file under the Ray session's directory: errors need a session."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("results, expected", [
    ([{**FULL, "final": False, "epoch": 1}], "ValueError: boom"),  # the error line, not the traceback
    ([FULL], "ValueError: boom"),  # an error after the final report is still a failure
    ([{"epoch": 1, "diverged": True, "failure_reason": "DivergedError: loss is nan"}], "DivergedError: loss is nan"),
], ids=["error", "error-after-final", "diverged"])
def test_trial_outcome_of_an_errored_trial(ray_session, results, expected):
    error = RuntimeError("Traceback (most recent call last):\n  File x, line 1\nValueError: boom")
    t = _trial("err", results=results, status=Trial.ERROR, error=error)
    assert trial_outcome(t) == ("failed", expected)


# --- search.optimizer.ParetoSearch.outcome and what Optuna is told -----------------------------------

@pytest.fixture
def searcher():
    storage = optuna.storages.InMemoryStorage()
    space = load_space("paper")
    s = ParetoSearch(space, optuna.samplers.RandomSampler(seed=0), "unit", storage)
    s.set_search_properties(None, None, {})
    return s


@pytest.mark.parametrize("result, error, state, values, reason", [
    (FULL, False, TrialState.COMPLETE, [0.8, 0.4, 0.1], ""),
    ({**FULL, "final": False, "epoch": 1}, False, TrialState.PRUNED, None, "stopped after epoch 1"),
    ({**FULL, "epoch": 2}, False, TrialState.PRUNED, None, "stopped after epoch 2"),
    ({**FULL, "robust_acc": math.nan}, False, TrialState.FAIL, None, "non-finite objectives"),
    ({**FULL, "clean_acc": math.inf}, False, TrialState.FAIL, None, "non-finite objectives"),
    ({k: v for k, v in FULL.items() if k != "channel_sparsity"}, False, TrialState.FAIL, None, "non-finite objectives"),
    ({"diverged": True, "failure_reason": "DivergedError: x", "epoch": 1}, False, TrialState.FAIL, None,
     "DivergedError: x"),
    (FULL, True, TrialState.FAIL, None, "error"),
    (None, False, TrialState.FAIL, None, "no result"),
    ({}, False, TrialState.FAIL, None, "no result"),
], ids=["complete", "stopped", "final-short", "nan", "inf", "missing", "diverged", "error", "none", "empty"])
def test_searcher_outcome_and_what_optuna_is_told(searcher, result, error, state, values, reason):
    assert searcher.outcome(result, error)[0] == state
    got_values, got_reason = searcher.outcome(result, error)[1:]
    assert got_values == values
    assert got_reason.startswith(reason)
    # the same through Tune's hook: the Optuna trial ends in that state, never RUNNING
    assert searcher.suggest("t1") is not None
    searcher.on_trial_complete("t1", result=result, error=error)
    (ot,) = searcher.study.get_trials(deepcopy=False)
    assert ot.state == state
    assert ot.values == values
    assert ot.user_attrs.get("ray_trial_id") == "t1"
    assert ot.user_attrs.get("brsearch_reason", "") == got_reason
    assert ("t1" in searcher.pruned) == (state == TrialState.PRUNED)
    searcher.on_trial_complete("t1", result=FULL)  # a second call changes nothing
    assert searcher.study.get_trials(deepcopy=False)[0].state == state


def test_searcher_remembers_divergence_reported_before_the_error(searcher):
    """Tune calls on_trial_complete(error=True) without the result: the reason comes from the
    diverged result seen earlier."""
    searcher.suggest("t2")
    searcher.on_trial_result("t2", {"epoch": 1, "diverged": True, "failure_reason": "DivergedError: loss is nan",
                                    **{m: math.nan for m in OBJECTIVES}})
    searcher.on_trial_complete("t2", result=None, error=True)
    (ot,) = searcher.study.get_trials(deepcopy=False)
    assert ot.state == TrialState.FAIL
    assert ot.user_attrs["brsearch_reason"] == "DivergedError: loss is nan"


# --- the MLflow callback on its own, against a real sqlite store -----------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    from search.tracking import get_or_create_experiment

    root = tmp_path_factory.mktemp("mlflow-unit")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = get_or_create_experiment(client, "unit", uri)
    return uri, client, exp


def _callback(store, name: str) -> tuple[MLflowSweepCallback, str]:
    uri, client, exp = store
    parent = start_parent_run(client, exp, name, {"trials": 3, "tracking_token": "hide-me"}, {})
    return MLflowSweepCallback(SweepRun(uri, exp, parent, name)), parent


def _children(client, exp: str, parent: str) -> dict:
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    return {r.data.tags["ray_trial_id"]: r for r in runs}


def test_callback_logs_one_child_per_trial_with_outcome(store):
    _, client, exp = store
    cb, parent = _callback(store, "cb1")
    epoch1 = {**FULL, "final": False, "epoch": 1, "clean_acc": 0.5}
    done = _trial("done", {"lr": 0.1, "api_key": "secret-value",
                           "data_root": "s3://user:pw@bucket/data"}, [epoch1, FULL])
    stopped = _trial("stopped", {"lr": 0.2}, [epoch1])
    failed = _trial("failed", {"lr": 1e8}, [{"epoch": 1, "diverged": True, "failure_reason": "DivergedError: nan"}],
                    status=Trial.ERROR)
    for t in (done, stopped, failed):
        cb.on_trial_start(0, [], t)
    cb.on_trial_result(0, [], done, epoch1)
    cb.on_trial_result(0, [], done, epoch1)  # a repeated epoch (a resumed trial's rerun) is logged once
    cb.on_trial_result(0, [], done, FULL)
    cb.on_trial_result(0, [], stopped, epoch1)
    cb.on_trial_complete(0, [], done)
    cb.on_trial_complete(0, [], stopped)
    cb.on_trial_error(0, [], failed)
    assert cb.logger.close(patience_s=60) == 0  # the writes run on a background thread: all sent

    runs = _children(client, exp, parent)
    assert set(runs) == {"done", "stopped", "failed"}
    d, s, f = runs["done"], runs["stopped"], runs["failed"]
    assert (d.info.status, s.info.status, f.info.status) == ("FINISHED", "FINISHED", "FAILED")
    assert [r.data.tags["brsearch.status"] for r in (d, s, f)] == ["completed", "stopped", "failed"]
    assert f.data.tags["brsearch.reason"] == "DivergedError: nan"
    assert s.data.tags["brsearch.reason"] == "stopped after epoch 1"
    # params: secrets dropped or redacted
    assert d.data.params["lr"] == "0.1" and "api_key" not in d.data.params
    assert "pw" not in d.data.params["data_root"] and "***@" in d.data.params["data_root"]
    # metrics: one point per epoch, the latest is the final report
    hist = client.get_metric_history(d.info.run_id, "clean_acc")
    assert [(m.step, m.value) for m in hist] == [(1, 0.5), (3, 0.8)]
    assert d.data.metrics["robust_acc"] == 0.4
    # the parent: hypervolume of the completed trials only (the stopped one is not a point)
    p = client.get_run(parent)
    assert p.data.metrics["n_completed"] == 1
    assert p.data.metrics["hypervolume"] == pytest.approx(hypervolume([[0.8, 0.4, 0.1]], DEFAULT_REFERENCE))
    assert "tracking_token" not in p.data.params
    assert cb.epochs_consumed == 4


def test_callback_state_survives_a_restore_without_duplicate_runs(store):
    _, client, exp = store
    cb, parent = _callback(store, "cb2")
    t = _trial("t", results=[{**FULL, "final": False, "epoch": 1}])
    cb.on_trial_start(0, [], t)
    cb.on_trial_result(0, [], t, t.last_result)
    logger = cb.logger
    assert logger.close(patience_s=60) == 0
    state = cb.get_state() | {"runs": dict(logger.runs)}  # what Tune checkpointed, the run map included
    first_run = logger.runs["t"]

    # a restored driver: a new process (a new logger) with the state from Tune's checkpoint
    again = MLflowSweepCallback(cb.run)
    again.set_state(state)
    assert again.logger._run_id("t") == first_run
    assert again.logger.close(patience_s=60) == 0
    # a driver whose snapshot predates the trial: found by its ray_trial_id tag, not created twice
    fresh = MLflowSweepCallback(cb.run)
    fresh.on_trial_result(0, [], t, t.last_result)  # epoch 1 again: already logged, skipped
    t.update_last_result(dict(FULL))
    fresh.on_trial_result(0, [], t, t.last_result)
    fresh.on_trial_complete(0, [], t)
    assert fresh.logger.close(patience_s=60) == 0
    runs = _children(client, exp, parent)
    assert list(runs) == ["t"] and runs["t"].info.run_id == first_run
    assert [m.step for m in client.get_metric_history(first_run, "epoch")] == [1, 3]
    assert runs["t"].data.tags["brsearch.status"] == "completed"
    # the callback pickles (Tune stores it in tuner.pkl): the logger and its thread stay out
    import pickle

    assert pickle.loads(pickle.dumps(fresh)).points == fresh.points
