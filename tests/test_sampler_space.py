"""Spaces the samplers can model and the searcher's floors, with real
Optuna studies (in-memory storage) and the real `ParetoSearch` (no Ray cluster needed)."""
from __future__ import annotations

import gc

import optuna
import pytest
from optuna.trial import TrialState

from search.front import Floors
from search.optimizer import (
    DEFAULT_SAMPLER,
    GP_TRIALS,
    ParetoSearch,
    Space,
    joint_modelling_gap,
    load_space,
    make_sampler,
    resolve_sampler,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

OLD_PAPER = {  # the paper space as it was: conditional alpha/beta, group_lasso behind a switch
    "params": {
        "bits": {"type": "categorical", "choices": [1, 2, 4]},
        "loss": {"type": "categorical", "choices": ["mix", "trades"]},
        "alpha": {"type": "float", "low": 0.0, "high": 0.5, "when": {"loss": "mix"}},
        "beta": {"type": "float", "low": 1.0, "high": 10.0, "log": True, "when": {"loss": "trades"}},
        "group_lasso": {"type": "float", "low": 1e-5, "high": 3.0, "log": True, "allow_zero": True},
    },
    "fixed": {},
}


def relative_space(sampler_name: str, space: Space, n: int = 3) -> set[str]:
    """Run n trials (told COMPLETE with made-up values), ask one more, and return the parameters
    the sampler would model jointly for it (`infer_relative_search_space`; it depends on the past
    trials' parameters, not on their count, so a few are enough and GP never has to fit)."""
    sampler = make_sampler(sampler_name, seed=0, max_concurrent=2, trials=8, scheduler="fifo")  # auto: gp
    study = optuna.create_study(directions=["maximize"] * 3, sampler=sampler)
    for i in range(n):
        t = study.ask()
        space.suggest(t)
        study.tell(t, [0.1 + 0.05 * (i % 7), 0.02 * (i % 5), 0.1 * (i % 3)])
    study.ask()
    return set(sampler.infer_relative_search_space(study, study.trials[-1]))


@pytest.mark.parametrize("name", ["paper", "digits"])  # the built-in spaces (digits: the quick start's)
# the default, what `auto` resolves to (gp in small FIFO sweeps, tpe in large ones and under MO-ASHA), and nsga2
@pytest.mark.parametrize("sampler", sorted({DEFAULT_SAMPLER, "tpe", "nsga2", "gp"}))
def test_default_space_is_modelled_jointly(sampler, name):
    space = load_space(name)
    space.validate()
    assert set(relative_space(sampler, space)) == set(space.params), sampler
    assert joint_modelling_gap(sampler, space) is None


def test_auto_is_gp_below_the_switch_and_tpe_from_it_or_under_moasha():
    assert resolve_sampler("auto", GP_TRIALS - 1, "fifo") == "gp"
    assert resolve_sampler("auto", GP_TRIALS, "fifo") == "tpe"
    assert resolve_sampler("auto", 8, "moasha") == "tpe" == resolve_sampler("auto", 1000, "moasha")
    assert resolve_sampler("nsga2", 5, "moasha") == "nsga2"
    assert isinstance(make_sampler("auto", 0, 2, trials=8, scheduler="fifo"), optuna.samplers.GPSampler)
    assert isinstance(make_sampler("auto", 0, 2, trials=1000, scheduler="fifo"), optuna.samplers.TPESampler)
    assert isinstance(make_sampler("auto", 0, 2, trials=8, scheduler="moasha"), optuna.samplers.TPESampler)
    for missing in ({}, {"trials": 8}, {"scheduler": "fifo"}):
        with pytest.raises(ValueError, match="trial count and scheduler"):
            make_sampler("auto", 0, 2, **missing)
    from search.optimizer import sampler_label  # the sweep header: what auto became

    assert sampler_label("auto", 8, "fifo") == "auto (gp)"
    assert sampler_label("auto", 500, "fifo") == "auto (tpe)"
    assert sampler_label("auto", 8, "moasha") == "auto (tpe)"
    assert sampler_label("nsga2", 8, "fifo") == "nsga2"


def _random_draws_under_moasha(sampler_name: str, trials: int = 16) -> int:
    """Ask/tell `trials` trials of the digits space as an MO-ASHA sweep ends them (1 in 4
    COMPLETE, the rest PRUNED) and count how many configurations are exactly the draws of
    RandomSampler with the same seed: a sampler's random start-up draws exactly those."""
    space = load_space("digits")

    def configs(sampler) -> list[dict]:
        study = optuna.create_study(directions=["maximize"] * 3, sampler=sampler)
        out = []
        for i in range(trials):
            t = study.ask()
            out.append(space.suggest(t))
            if i % 4 == 3:
                study.tell(t, [0.5 + 0.01 * i, 0.3 + 0.01 * (i % 5), 0.1 * (i % 3)])
            else:
                study.tell(t, state=TrialState.PRUNED)
        return out

    random_draws = configs(optuna.samplers.RandomSampler(seed=0))
    sampler = make_sampler(sampler_name, seed=0, max_concurrent=2, trials=48, scheduler="moasha")
    return sum(c == r for c, r in zip(configs(sampler), random_draws))


def test_the_moasha_default_learns_from_stopped_trials():
    """Under MO-ASHA most trials end PRUNED. The default (`auto`: TPE) counts them toward its
    start-up and models from then on; GP waits for COMPLETE trials, so in a 16-trial MO-ASHA
    sweep it never leaves its random start-up (what the search-efficiency runs showed: 9 to 26
    of gp+moasha's 19 to 26 trials were random search's draws)."""
    startup = 4  # max(4, 2 * max_concurrent)
    assert _random_draws_under_moasha("auto") == startup
    assert _random_draws_under_moasha("gp") == 16


def test_a_small_auto_sweep_warns_about_a_conditional_space(capsys, tmp_path):
    """GP models the intersection only; the CLI says so in one line, naming the loose knobs."""
    from search.driver import Flags, prepare

    space_file = tmp_path / "old_paper.py"
    space_file.write_text(f"SPACE = {OLD_PAPER!r}\n")
    for trials, scheduler, warned in ((8, "fifo", True), (GP_TRIALS, "fifo", False), (8, "moasha", False)):
        prepare(Flags.parse(["--space", str(space_file), "--trials", str(trials),  # auto: gp, tpe, tpe
                                           "--scheduler", scheduler, "--storage-path", str(tmp_path / "results")]))
        err = capsys.readouterr().err.strip().splitlines()
        gaps = [line for line in err if line.startswith("warning: --sampler gp")]
        assert bool(gaps) is warned, err
        if warned:
            assert len(gaps) == 1 and "alpha" in gaps[0]


def test_a_sampler_that_ignores_stopped_trials_is_flagged_under_moasha(capsys, tmp_path):
    """--sampler gp or nsga2 with --scheduler moasha: one warning line saying most proposals will
    be random and naming the sampler that learns from stopped trials; none for tpe or FIFO."""
    from search.driver import Flags, prepare
    from search.optimizer import scheduler_gap

    for i, (sampler, scheduler, warned) in enumerate((("gp", "moasha", True), ("nsga2", "moasha", True),
                                                      ("tpe", "moasha", False), ("auto", "moasha", False),
                                                      ("gp", "fifo", False))):
        prepare(Flags.parse(["--sampler", sampler, "--scheduler", scheduler, "--trials", "8",
                                           "--name", f"s{i}", "--storage-path", str(tmp_path / "results")]))
        err = [line for line in capsys.readouterr().err.splitlines() if "random draws" in line]
        assert len(err) == int(warned), (sampler, scheduler, err)
        if warned:
            assert err[0] == scheduler_gap(sampler, scheduler)
            assert err[0].startswith(f"warning: --sampler {sampler} ") and "--sampler tpe" in err[0]


def test_conditional_space_falls_out_of_nsga2_but_not_tpe():
    space = Space("old", OLD_PAPER["params"], {})
    # NSGA-II models the intersection only: the conditional and switched knobs drop out
    assert {"alpha", "beta", "group_lasso"}.isdisjoint(relative_space("nsga2", space, n=10))
    # TPE (multivariate, group) models them in their sub-spaces
    assert {"alpha", "beta", "group_lasso", "group_lasso_on"} <= relative_space("tpe", space, n=10)
    gap = joint_modelling_gap("nsga2", space)
    assert gap and "\n" not in gap and "alpha" in gap and "group_lasso" in gap
    assert joint_modelling_gap("tpe", space) is None and joint_modelling_gap("random", space) is None


def test_zero_below_gives_zero_and_is_validated():
    from trainables.config import ConfigError

    space = Space("z", {"group_lasso": {"type": "float", "low": 1e-6, "high": 1.0, "log": True, "zero_below": 1e-3}}, {})
    space.validate()
    study = optuna.create_study(directions=["maximize"] * 3, sampler=optuna.samplers.RandomSampler(seed=0))
    got = []
    for _ in range(60):
        t = study.ask()
        cfg = space.suggest(t)
        assert set(t.params) == {"group_lasso"}  # always sampled: the sampler sees every value
        got.append((t.params["group_lasso"], cfg["group_lasso"]))
        study.tell(t, [0.0, 0.0, 0.0])
    assert all(c == 0.0 for raw, c in got if raw < 1e-3) and all(c == raw for raw, c in got if raw >= 1e-3)
    assert any(c == 0.0 for _, c in got) and any(c > 0 for _, c in got)
    for bad in ({"zero_below": 2.0}, {"zero_below": 1e-7}, {"zero_below": 1e-3, "allow_zero": True}):
        p = {"type": "float", "low": 1e-6, "high": 1.0, "log": True, **bad}
        with pytest.raises(ConfigError, match="zero_below"):
            Space("z", {"group_lasso": p}, {}).validate()


def test_pareto_search_floors_constraints_and_pruned_trials_keep_off_optunas_front():
    space = load_space("paper").pin({"dataset": "digits"})
    storage = optuna.storages.InMemoryStorage()
    s = ParetoSearch(space, make_sampler("tpe", 0, 2), "t", storage, floors=Floors.for_sweep("digits"))
    results = {
        "good": {"final": True, "epoch": 3, "max_epochs": 3, "clean_acc": 0.8, "robust_acc": 0.3, "channel_sparsity": 0.1},
        "sparse": {"final": True, "epoch": 3, "max_epochs": 3, "clean_acc": 0.5, "robust_acc": 0.2, "channel_sparsity": 0.5},
        # completed at chance with the best sparsity: infeasible
        "chance": {"final": True, "epoch": 3, "max_epochs": 3, "clean_acc": 0.1, "robust_acc": 0.1, "channel_sparsity": 0.9},
        # stopped at epoch 1 with proxies dominating everything: PRUNED, no values
        "stopped": {"epoch": 1, "max_epochs": 3, "clean_acc": 0.99, "robust_acc": 0.9, "channel_sparsity": 0.9},
    }
    for tid in results:
        assert s.suggest(tid)
    for tid, r in results.items():
        s.on_trial_complete(tid, r)
    by = {t.user_attrs["ray_trial_id"]: t for t in s.study.trials}
    assert by["stopped"].state == TrialState.PRUNED and by["stopped"].values is None
    assert by["chance"].state == TrialState.COMPLETE and max(by["chance"].constraints.values()) > 0
    assert max(by["good"].constraints.values()) <= 0
    assert {t.user_attrs["ray_trial_id"] for t in s.study.best_trials} == {"good", "sparse"}


def test_reconcile_orphans_uses_public_tell():
    space = load_space("paper").pin({"dataset": "digits"})
    s = ParetoSearch(space, make_sampler("random", 0, 2), "o", optuna.storages.InMemoryStorage())
    s.suggest("live")
    orphan = s.study.ask()  # asked, then lost by a crash: Tune no longer tracks it
    assert s.reconcile_orphans() == 1
    states = {t.number: t.state for t in s.study.trials}
    assert states[orphan.number] == TrialState.FAIL
    assert list(states.values()).count(TrialState.RUNNING) == 1  # the live trial is untouched


def _result(i: int) -> dict:
    return {"final": True, "epoch": 3, "max_epochs": 3, "clean_acc": 0.3 + 0.05 * (i % 9),
            "robust_acc": 0.02 * (i % 7), "channel_sparsity": 0.1 * (i % 4)}


def test_sampling_ahead_hands_out_each_trial_once_and_leaves_none_running(tmp_path):
    """Past the threshold the next trial is sampled on a background thread; every Optuna trial is
    handed out to exactly one Tune trial, with the parameters Tune got, and none stays RUNNING."""
    from search.optimizer import settle_sampled_ahead
    from search.storage import open_study_storage

    space = load_space("digits")
    storage = open_study_storage({"journal": str(tmp_path / "optuna.journal")})
    s = ParetoSearch(space, make_sampler("tpe", 0, 2), "a", storage, total_trials=12, sample_ahead_after=3)
    configs = {}
    for i in range(12):
        configs[f"t{i}"] = s.suggest(f"t{i}")
        if i >= 2:  # two running at once
            s.on_trial_complete(f"t{i - 2}", _result(i))
        if i == 3:
            assert s._ahead is not None  # sampling ahead from the threshold on
    assert s._ahead is None  # the last trial handed out: nothing sampled for a 13th
    for i in (10, 11):
        s.on_trial_complete(f"t{i}", _result(i))
    settle_sampled_ahead()
    trials = s.study.get_trials(deepcopy=False)
    assert len(trials) == 12 and all(t.state == TrialState.COMPLETE for t in trials)
    by = {t.user_attrs["ray_trial_id"]: t for t in trials}
    assert set(by) == set(configs)
    for tid, cfg in configs.items():  # what Tune ran is what Optuna recorded for that trial
        assert all(cfg[k] == v or cfg[k] == 0.0 for k, v in by[tid].params.items()), (tid, cfg, by[tid].params)


def test_a_sample_in_flight_is_not_saved_and_a_restore_fails_it(tmp_path):
    """A checkpoint holds only trials handed out; the trial sampled ahead at the crash is RUNNING in
    the study, and the restored searcher marks it FAIL and never hands it out."""
    from search.optimizer import AHEAD_REASON, settle_sampled_ahead
    from search.storage import open_study_storage

    space = load_space("digits")
    spec = {"journal": str(tmp_path / "optuna.journal")}
    s = ParetoSearch(space, make_sampler("tpe", 0, 2), "r", open_study_storage(spec), total_trials=10,
                     sample_ahead_after=2)
    for i in range(5):
        s.suggest(f"t{i}")
        s.on_trial_complete(f"t{i}", _result(i))
    assert s._ahead is not None
    ahead = s._ahead.result().number  # sampled for a sixth trial, not handed out
    s.save(str(tmp_path / "searcher.pkl"))  # Tune's searcher checkpoint, then the driver dies
    del s
    gc.collect()

    again = ParetoSearch(space, make_sampler("tpe", 0, 2), "r", open_study_storage(spec), total_trials=10,
                         sample_ahead_after=2)
    again.restore(str(tmp_path / "searcher.pkl"))
    states = {t.number: t.state for t in again.study.get_trials(deepcopy=False)}
    assert states[ahead] == TrialState.FAIL
    for i in range(5, 10):
        again.suggest(f"t{i}")
        again.on_trial_complete(f"t{i}", _result(i))
    settle_sampled_ahead()
    trials = again.study.get_trials(deepcopy=False)
    handed = [t.user_attrs["ray_trial_id"] for t in trials if "ray_trial_id" in t.user_attrs]
    assert sorted(handed) == sorted(f"t{i}" for i in range(10))  # each once
    assert ahead not in {t.number for t in trials if "ray_trial_id" in t.user_attrs}
    assert not [t for t in trials if t.state == TrialState.RUNNING]

    # a sweep that ends before its total (interrupted, or a budget): the sample left is FAIL, with why
    s3 = ParetoSearch(space, make_sampler("random", 0, 2), "e", optuna.storages.InMemoryStorage(), total_trials=10,
                      sample_ahead_after=1)
    s3.suggest("only")
    s3.on_trial_complete("only", _result(0))
    settle_sampled_ahead()
    left = [t for t in s3.study.trials if "ray_trial_id" not in t.user_attrs]
    assert len(left) == 1 and left[0].state == TrialState.FAIL and left[0].user_attrs["brsearch_reason"] == AHEAD_REASON


def test_the_trial_limit_is_the_searchers_and_survives_a_stale_limiter_state(tmp_path):
    """Tune's ConcurrencyLimiter, restored from a search-generator state older than the trials
    (a kill between Tune's writes), held two ended trials as live and never asked for another:
    a resumed sweep waited forever with nothing running. The searcher keeps the limit itself,
    so the limiter passes through, and trials Optuna has finished hold no slot after a restore."""
    from ray.tune.search import ConcurrencyLimiter

    from search.storage import open_study_storage

    space = load_space("digits")
    spec = {"journal": str(tmp_path / "optuna.journal")}

    def searcher() -> tuple[ParetoSearch, ConcurrencyLimiter]:
        s = ParetoSearch(space, make_sampler("random", 0, 2), "lim", open_study_storage(spec), total_trials=6)
        return s, ConcurrencyLimiter(s, max_concurrent=2)

    s, limiter = searcher()
    assert limiter.suggest("t0") and limiter.suggest("t1")
    assert limiter.suggest("t2") is None  # two running: the limit holds
    stale = limiter.get_state()  # Tune's search-generator state, written at a snapshot
    s.save(str(tmp_path / "searcher.pkl"))  # the searcher, with t0 and t1 running
    for t in ("t0", "t1"):
        limiter.on_trial_complete(t, _result(0))
    assert limiter.suggest("t2") is not None  # a slot freed

    # the restore: the searcher's pickle and the limiter's state both from before t0 and t1 ended,
    # while Optuna (written at the later snapshot, or reconciled from it) has them finished
    again, restored = searcher()
    again.restore(str(tmp_path / "searcher.pkl"))
    restored.set_state(stale)
    # Tune's state file holds no live set (what hung the sweep: two trials ended long ago)
    assert stale["_limit_concurrency"] is False and not stale["live_trials"]
    assert again.live_trials() == 0  # Optuna has t0 and t1 finished: no slot held
    assert restored.suggest("t3") is not None and restored.suggest("t4") is not None
    assert restored.suggest("t5") is None  # and the limit still holds
    restored.on_trial_complete("t3", _result(3))  # passed through: Optuna is told
    assert {t.user_attrs["ray_trial_id"]: t.state for t in again.study.get_trials(deepcopy=False)}["t3"] == TrialState.COMPLETE
    assert restored.suggest("t5") is not None


def test_a_searcher_unpickled_over_a_study_that_never_reached_storage_starts_it_again(tmp_path):
    """`--resume` of an s3:// sweep killed before its first experiment checkpoint: Tune's pickled
    searcher names a study the stored (empty) journal lacks. Its first ask works, on a new study."""
    import pickle

    from search.storage import open_study_storage

    journal = tmp_path / "optuna.journal"
    s = ParetoSearch(load_space("digits"), make_sampler("random", 0, 2), "lost", open_study_storage({"journal": str(journal)}))
    blob = pickle.dumps(s)
    journal.write_bytes(b"")  # what --resume pulled: the study was never uploaded
    again = pickle.loads(blob)
    assert again.suggest("t0")
    again.on_trial_complete("t0", _result(0))
    assert [t.state for t in again.study.get_trials(deepcopy=False)] == [TrialState.COMPLETE]


def test_below_the_threshold_every_sample_is_drawn_in_the_loop():
    space = load_space("digits")
    s = ParetoSearch(space, make_sampler("tpe", 0, 2), "b", optuna.storages.InMemoryStorage(), total_trials=50)
    for i in range(6):
        s.suggest(f"t{i}")
    assert s._ahead is None and len(s.study.trials) == 6


def test_rays_slow_space_warning_is_not_shown_for_the_samplers_fit(monkeypatch):
    """GP's fit runs inside the space function Ray times; its "move computation into the
    trainable" warning would be wrong advice on every GP trial."""
    import warnings

    import ray.tune.search.optuna.optuna_search as ray_optuna

    monkeypatch.setattr(ray_optuna, "DEFINE_BY_RUN_WARN_THRESHOLD_S", -1.0)  # every suggest is "slow"
    s = ParetoSearch(load_space("digits"), make_sampler("random", 0, 2), "w", optuna.storages.InMemoryStorage())
    s.set_search_properties(None, None, {})
    with warnings.catch_warnings(record=True) as caught:
        assert s.suggest("t1")
    assert not [w for w in caught if "Define-by-run" in str(w.message)], [str(w.message) for w in caught]


# --- stopped trials: how far each got is what TPE learns from them ------------------------------

def _stopped_study(progress: dict[int, int], completed_at_chance: bool = False) -> ParetoSearch:
    """A TPE sweep of 30 trials that MO-ASHA stopped after `progress[i]` of 27 epochs (default 1),
    told through the sweep's searcher; optionally one more completed at chance (below the floor)."""
    space = load_space("digits")
    s = ParetoSearch(space, make_sampler("tpe", 0, 2), "stops", optuna.storages.InMemoryStorage(),
                     floors=Floors.for_sweep("digits"))
    for i in range(30):
        s.suggest(str(i))
        s.on_trial_complete(str(i), {"epoch": progress.get(i, 1), "max_epochs": 27, "clean_acc": 0.9,
                                     "robust_acc": 0.5, "channel_sparsity": 0.0})
    if completed_at_chance:
        s.suggest("chance")
        s.on_trial_complete("chance", {"final": True, "epoch": 27, "max_epochs": 27, "clean_acc": 0.1,
                                       "robust_acc": 0.0, "channel_sparsity": 0.9})
    return s


def _proposals(s: ParetoSearch, n: int = 12) -> list[float]:
    out = []
    for i in range(n):
        params = s.suggest(f"next{i}")
        out.append(params["lr"])
    return out


def test_tpe_proposals_depend_on_how_far_stopped_trials_got():
    """Two sweeps whose stopped trials differ only in the epochs they ran: TPE's "good" group is
    the trials that got furthest, so it proposes near the high-lr trials in one sweep and near the
    low-lr ones in the other. (Before, every PRUNED trial looked alike: both sweeps proposed the same.)"""
    probe = _stopped_study({})
    lrs = {int(t.user_attrs["ray_trial_id"]): t.params["lr"] for t in probe.study.trials}
    order = sorted(lrs, key=lrs.get)
    high = {i: 9 for i in order[-4:]}  # the four highest learning rates got to the third rung
    low = {i: 9 for i in order[:4]}
    a, b = _proposals(_stopped_study(high)), _proposals(_stopped_study(low))
    assert a != b
    mid = sorted(lrs.values())[len(lrs) // 2]
    assert sum(x > mid for x in a) > sum(x > mid for x in b), (a, b)


def test_stopped_trials_stay_pruned_and_rank_between_feasible_and_below_the_floor():
    s = _stopped_study({3: 9, 4: 3}, completed_at_chance=True)
    by = {t.user_attrs["ray_trial_id"]: t for t in s.study.trials}
    assert all(by[str(i)].state == TrialState.PRUNED and by[str(i)].values is None for i in range(30))
    assert s.pruned == {str(i) for i in range(30)}
    viol = {k: sum(v for v in t.constraints.values() if v > 0) for k, t in by.items()}
    # further = smaller violation; every stopped trial ahead of a completed trial at chance
    assert 0 < viol["3"] < viol["4"] < viol["0"] < viol["chance"]
    assert by["chance"].state == TrialState.COMPLETE
    assert s.study.best_trials == []  # Optuna's front: completed and feasible only


def test_a_tell_after_the_snapshot_is_not_repeated_on_resume(tmp_path, caplog):
    """The searcher's state is saved (Tune's snapshot), a trial is then told PRUNED, the driver dies.
    The restored searcher knows Optuna has that outcome: the repeated run's end is not told again
    (no UpdateFinishedTrialError), and MO-ASHA stops the repeated run at its first result, so
    Optuna and the sweep's tables agree. A real journal storage, reopened as after a crash."""
    from types import SimpleNamespace

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from search.optimizer import MOASHAScheduler

    def searcher():
        storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
        return ParetoSearch(load_space("digits"), make_sampler("random", 0, 2), "r", storage,
                            floors=Floors.for_sweep("digits"))

    first = searcher()
    for tid in ("a", "b", "c"):
        first.suggest(tid)
    first.on_trial_complete("a", {"final": True, "epoch": 3, "max_epochs": 3, "clean_acc": 0.8,
                                  "robust_acc": 0.3, "channel_sparsity": 0.1})
    first.save(str(tmp_path / "searcher.pkl"))  # Tune's snapshot: b and c running
    first.on_trial_complete("b", {"epoch": 1, "max_epochs": 3, "clean_acc": 0.5, "robust_acc": 0.2,
                                  "channel_sparsity": 0.0})  # told, then the crash

    second = searcher()
    second.restore(str(tmp_path / "searcher.pkl"))
    assert second.settled == {"b": TrialState.PRUNED}
    assert (second.settled_stop("b"), second.settled_stop("c"), second.settled_stop("a")) == (True, None, None)
    sched = MOASHAScheduler(["clean_acc", "robust_acc", "channel_sparsity"], "max", max_t=3)
    controller = SimpleNamespace(search_alg=SimpleNamespace(searcher=second))  # Tune's wrapper chain
    for tid in ("b", "c"):
        sched.on_trial_add(controller, SimpleNamespace(trial_id=tid))
    assert "b" in sched.stopped_trials and "c" not in sched.stopped_trials
    # the repeated run ends differently (completed): Optuna keeps PRUNED, nothing raises or is re-told
    second.on_trial_complete("b", {"final": True, "epoch": 3, "max_epochs": 3, "clean_acc": 0.9,
                                   "robust_acc": 0.4, "channel_sparsity": 0.2})
    second.on_trial_complete("c", {"final": True, "epoch": 3, "max_epochs": 3, "clean_acc": 0.7,
                                   "robust_acc": 0.3, "channel_sparsity": 0.1})
    states = {t.user_attrs["ray_trial_id"]: t.state for t in second.study.trials}
    assert states == {"a": TrialState.COMPLETE, "b": TrialState.PRUNED, "c": TrialState.COMPLETE}
    assert "b" in second.pruned
    assert not [r for r in caplog.records if "tell failed" in r.getMessage()]
