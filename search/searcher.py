"""Optuna behind Ray Tune, with the three fixes multi-objective sweeps need.

Ray's `OptunaSearch` tells Optuna COMPLETE with whatever the last result held, so (a) a trial
a scheduler stopped after 2 epochs lands on the sampler's Pareto front with low-fidelity values,
(b) a NaN objective leaves the Optuna trial RUNNING forever (the tell raises and is only
logged), and (c) trials asked after the last experiment checkpoint stay RUNNING after a crash.
`ParetoSearch` tells PRUNED, FAIL and reconciles such orphans, and records each completed
trial's floors as Optuna constraints (`Trial.set_constraint`, Optuna 5's constraints API), so
samplers treat trials below the useful floor as infeasible and `Study.best_trials` leaves them out.
Only public Optuna APIs are used.
"""
from __future__ import annotations

import logging
import math
import pickle
import threading
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils.util import unflatten_dict

from .objectives import OBJECTIVES, SAMPLERS, Floors  # noqa: F401  (re-exported: the names callers know)
from .space import Space

log = logging.getLogger(__name__)


def make_sampler(name: str, seed: int, max_concurrent: int) -> optuna.samplers.BaseSampler:
    if name == "nsga2":
        # a generation per ~2x the parallel slots keeps generations full under async execution
        return optuna.samplers.NSGAIISampler(population_size=max(4, 2 * max_concurrent), seed=seed)
    if name == "tpe":
        # multivariate + group: models every parameter jointly, conditional ones included
        # (group=True decomposes a define-by-run space into the sub-spaces trials share)
        with warnings.catch_warnings():  # `group` is experimental (Optuna 5): one warning per sweep is noise
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                              n_startup_trials=max(4, 2 * max_concurrent))
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=max(4, 2 * max_concurrent))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}")


class AskAhead:
    """Runs `fn` (ask Optuna for a trial and sample its configuration) on one background thread,
    one result ahead. Why: TPE's sampling reads every trial of the study in Python (about 35 ms
    a trial at 1,000 trials on a 2-core machine, growing with the study), and Tune's driver
    loop, which processes every result of every trial, would wait for it."""

    def __init__(self, fn: Callable[[], Any], lock: threading.Lock, ready: Any = None) -> None:
        self.fn, self.lock = fn, lock
        self._cv = threading.Condition()
        self._ready, self._error = ready, None
        self._wanted = self._busy = False
        self._thread = threading.Thread(target=self._loop, name="optuna-ask-ahead", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Sample the next result, unless one is ready or being sampled."""
        with self._cv:
            if self._ready is None and not self._busy:
                self._wanted = self._busy = True
                self._cv.notify_all()

    def take(self) -> Any:
        """The ready result (then gone), or None; raises what the sampling raised."""
        with self._cv:
            if self._error is not None:
                err, self._error = self._error, None
                raise err
            out, self._ready = self._ready, None
            return out

    def get(self) -> Any:
        """The next result: the ready one, else the one being sampled (asked for now if need be),
        waiting for it."""
        with self._cv:
            if self._ready is None and self._error is None and not self._busy:
                self._wanted = self._busy = True
                self._cv.notify_all()
            while self._ready is None and self._error is None:
                self._cv.wait()
        return self.take()

    def peek(self) -> Any:
        with self._cv:
            return self._ready

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._wanted:
                    self._cv.wait()
                self._wanted = False
            out, err = None, None
            try:
                with self.lock:
                    out = self.fn()
            except Exception as e:  # noqa: BLE001 - re-raised in the driver loop by take()
                err = e
            with self._cv:
                self._ready, self._error, self._busy = out, err, False
                self._cv.notify_all()


class ParetoSearch(OptunaSearch):
    """With `total` (the sweep's trial count), each trial's configuration is sampled ahead on a
    background thread (`AskAhead`) as soon as the previous one is handed to Tune, never more
    than `total`. When none is ready (the first trials, which Tune asks for together, or a trial
    that ends before the next sample is done) `suggest` waits for it: returning None ("not ready")
    instead would leave Tune below the sweep's concurrency until its next event (measured: an
    autoscaling sweep of short trials then ran them one at a time). Without `total`, sampling is
    synchronous."""

    def __init__(self, space: Space, sampler: optuna.samplers.BaseSampler, study_name: str,
                 storage: optuna.storages.BaseStorage, objectives: tuple[str, ...] = OBJECTIVES,
                 floors: Floors | None = None, total: int | None = None) -> None:
        self._brs_space = space
        self.floors = floors
        self.total = total
        super().__init__(space=space.suggest, metric=list(objectives), mode=["max"] * len(objectives),
                         sampler=sampler, study_name=study_name, storage=storage)
        self.pruned: set[str] = set()
        self.diverged: dict[str, str] = {}  # trial id -> reason (non-finite loss or weights)

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles the searcher with the Tuner too
        return {k: v for k, v in self.__dict__.items() if k not in ("_brs_ahead", "_brs_lock")}

    # --- sampling ahead (the thread and its lock are not pickled; a sample ready at a save is) --
    def _lock(self) -> threading.Lock:
        if "_brs_lock" not in self.__dict__:
            self._brs_lock = threading.Lock()
        return self._brs_lock

    def _ahead(self) -> AskAhead:
        if "_brs_ahead" not in self.__dict__:
            self._brs_ahead = AskAhead(self._ask_one, self._lock(), self.__dict__.pop("_brs_ready", None))
        return self._brs_ahead

    def _ask_one(self) -> tuple[Any, dict]:
        ot = self._ot_study.ask()
        return ot, self._suggest_from_define_by_run_func(self._space, ot)

    def _more_to_ask(self) -> bool:
        return getattr(self, "total", None) is not None and len(self._ot_trials) < self.total

    def _setup_study(self, mode: str | list) -> None:
        """Name the study's objectives, so optuna-dashboard and `optuna.load_study` show
        clean_acc/robust_acc/channel_sparsity instead of "Objective 0/1/2"."""
        super()._setup_study(mode)
        if isinstance(self._metric, list) and self._ot_study.metric_names != list(self._metric):
            with warnings.catch_warnings():  # experimental in Optuna 5 (stable since 3.2 in practice)
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._ot_study.set_metric_names(list(self._metric))

    def suggest(self, trial_id: str) -> dict | None:
        if getattr(self, "total", None) is None or trial_id in self._ot_trials or not callable(self._space):
            params = super().suggest(trial_id)
        else:
            ahead = self._ahead()
            got = ahead.take()
            if got is None:
                if not self._more_to_ask():
                    return None  # every trial of the sweep is asked for
                got = ahead.get()
            self._ot_trials[trial_id], flat = got
            params = unflatten_dict(flat)
            if self._more_to_ask():
                ahead.request()  # the next trial's, while this one trains
        ot = self._ot_trials.get(trial_id)
        if ot is not None:
            ot.set_user_attr("ray_trial_id", trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # Tune calls on_trial_complete(error=True) with no result, so remember why here
        if result.get("diverged"):
            self.diverged[trial_id] = str(result.get("failure_reason") or "diverged")
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        ot = self._ot_trials.get(trial_id)
        if ot is None:
            return
        state, values, reason = self.outcome(result, error)
        if trial_id in getattr(self, "diverged", {}):
            state, values, reason = TrialState.FAIL, None, self.diverged[trial_id]
        try:
            if reason:
                ot.set_user_attr("brsearch_reason", reason)
            floors = getattr(self, "floors", None)
            if state == TrialState.COMPLETE and floors is not None:
                for key, c in floors.constraints(values[0], values[1]).items():
                    ot.set_constraint(key, c)
            self._ot_study.tell(ot, values, state=state)
        except Exception as exc:  # never leave a zombie RUNNING trial behind
            log.warning("optuna tell failed for %s (%s); marking FAIL", trial_id, exc)
            try:
                self._ot_study.tell(ot, state=TrialState.FAIL)
            except Exception:
                pass
        if state == TrialState.PRUNED:
            self.pruned.add(trial_id)
        self._completed_trials.add(trial_id)

    def outcome(self, result: dict | None, error: bool) -> tuple[TrialState, list[float] | None, str]:
        if result and result.get("diverged"):  # trainables.tune's last report of a diverged trial
            return TrialState.FAIL, None, str(result.get("failure_reason") or "diverged")
        if error or not result:
            return TrialState.FAIL, None, "error" if error else "no result"
        if not result.get("final") or result.get("epoch", 0) < result.get("max_epochs", 0):
            return TrialState.PRUNED, None, f"stopped after epoch {result.get('epoch')}"
        values = [result.get(m) for m in self.metric]
        if any(v is None or not math.isfinite(float(v)) for v in values):
            return TrialState.FAIL, None, f"non-finite objectives {values}"
        return TrialState.COMPLETE, [float(v) for v in values], ""

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    def save(self, checkpoint_path: str) -> None:
        """OptunaSearch's pickle, taken with no sampling in flight (the sampler and study are in
        it), with a sample that is ready but not handed out yet (`_brs_ready`)."""
        with self._lock():
            state = {k: v for k, v in self.__dict__.items() if k not in ("_brs_ahead", "_brs_lock")}
            if "_brs_ahead" in self.__dict__:
                state["_brs_ready"] = self._brs_ahead.peek()
            with open(checkpoint_path, "wb") as f:
                pickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        """`Tuner.restore` (`--resume`): reload the pickled state, then settle the Optuna trials a
        crash left RUNNING that Tune will not continue."""
        self.__dict__.pop("_brs_ahead", None)  # a sampler thread of this object's past, if any
        super().restore(checkpoint_path)
        self.__dict__.setdefault("diverged", {})
        n = self.reconcile_orphans()
        if n:
            log.warning("marked %d Optuna trial(s) orphaned by a crash as FAIL", n)

    def reconcile_orphans(self) -> int:
        """After a restore: Optuna trials left RUNNING that Tune no longer tracks become FAIL, so
        samplers (TPE's constant liar especially) stop treating them as pending forever."""
        live = {t.number for tid, t in self._ot_trials.items() if tid not in self._completed_trials}
        ready = self.__dict__.get("_brs_ready")
        if ready is not None:  # asked ahead before the save: handed to the next trial Tune starts
            live.add(ready[0].number)
        n = 0
        for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number not in live:
                # public API: tell by trial number (no user attribute can be set on a trial
                # this process did not ask for without Optuna's private storage calls)
                self._ot_study.tell(t.number, state=TrialState.FAIL)
                n += 1
        return n
