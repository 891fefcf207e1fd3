"""Optuna behind Ray Tune, with the three fixes multi-objective sweeps need.

Ray's `OptunaSearch` tells Optuna COMPLETE with whatever the last result held, so (a) a trial
a scheduler stopped after 2 epochs lands on the sampler's Pareto front with low-fidelity values,
(b) a NaN objective leaves the Optuna trial RUNNING forever (the tell raises and is only
logged), and (c) trials asked after the last experiment checkpoint stay RUNNING after a crash.
`ParetoSearch` tells PRUNED, FAIL and reconciles such orphans, and records each completed
trial's floors as Optuna constraints (`Trial.set_constraint`, Optuna 5's constraints API), so
samplers treat trials below the useful floor as infeasible and `Study.best_trials` leaves them out.

Stopped trials. Ray reports no intermediate values for several objectives (Optuna's `Trial.report`
is single-objective), so without more every PRUNED trial looks alike to TPE, which ranks PRUNED
trials by their last intermediate value and otherwise by trial number: a trial stopped at the last
rung counts as one stopped at the first, and the lowest-numbered stopped trials fill TPE's "good"
group while few trials have completed. Each PRUNED trial therefore carries one constraint,
`UNFINISHED`: the share of its epochs it did not run, times `UNFINISHED_SCALE`. TPE files
infeasible trials after the feasible ones and ranks them by their summed violation, so stopped
trials now rank by how far they got, behind every completed feasible trial, ahead of every completed
trial below the floors (those carry at least 1e-9, `Floors.constraints`). NSGA-II and GP sample from
COMPLETE trials only and are unchanged.
Only public Optuna APIs are used, except where a resume takes up a running trial it did not ask
for: `optuna.trial.Trial(study, frozen._trial_id)` (Optuna has no public call for that id).

Sampling ahead. At 1,000 trials TPE takes about 20-30 ms per suggest (it rebuilds its Parzen
estimators from every trial), all of it in Tune's driver loop. Past `SAMPLE_AHEAD_AFTER` trials the
searcher asks Optuna for the next trial on a background thread as soon as it hands one out, while
the loop waits on running trials, as `Study.optimize(n_jobs=2)` does with its threads. The
sample for trial k+1 therefore sees every result told before trial k was handed out, not those
told in between (as with one more trial running at once). Nothing of it is saved: a checkpoint
holds only trials handed out, a sample in flight at a crash is lost with the driver's unwritten
journal or, if a snapshot wrote it, an Optuna trial RUNNING that the restore marks FAIL
(`reconcile_orphans`), and one left at the end is marked FAIL by
`settle_sampled_ahead`, so no sample is ever handed out twice. Below the threshold every sample
is drawn in the loop, so small sweeps stay reproducible from their seed.
"""
from __future__ import annotations

import logging
import math
import pickle
import time
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from search.front import Floors
from search.results import stopped_reason
from search.storage import TUNE_SNAPSHOT, publish, snapshot_target
from trainables.contract import DIRECTIONS, DIVERGED, EPOCH, FAILURE_REASON, MAX_EPOCHS, OBJECTIVES, is_completed

from ._space import Space

log = logging.getLogger(__name__)

SAMPLE_AHEAD_AFTER = 100  # trials handed out before sampling moves off the loop (module docstring)
AHEAD_REASON = "sampled ahead, never run"
_SAMPLING_AHEAD: weakref.WeakSet = weakref.WeakSet()  # searchers of this process with a sample in flight
UNFINISHED = "unfinished"  # a PRUNED trial's constraint: the share of its epochs not run (module docstring)
UNFINISHED_SCALE = 1e-10  # below the 1e-9 of a completed trial at its clean floor (Floors.constraints)
AHEAD_STATS = {"used": 0, "waited_s": 0.0}  # this process: samples taken, and the loop's wait for them (benchmarks)
RESUMED = "brsearch_resumed"  # a RUNNING trial Tune's restored snapshot continues (`reconcile_with_snapshot`)
RAY_TRIAL_ID = "ray_trial_id"  # the Tune trial an Optuna trial was handed out to


class ParetoSearch(OptunaSearch):
    def __init__(self, space: Space, sampler: optuna.samplers.BaseSampler, study_name: str,
                 storage: optuna.storages.BaseStorage, objectives: tuple[str, ...] = OBJECTIVES,
                 floors: Floors | None = None, total_trials: int | None = None,
                 sample_ahead_after: int = SAMPLE_AHEAD_AFTER) -> None:
        self._brs_space = space
        self.floors = floors
        self.total_trials = total_trials  # None: never sample ahead (no end to stop at)
        self.sample_ahead_after = sample_ahead_after
        self._ahead: Future | None = None
        self._ahead_pool: ThreadPoolExecutor | None = None
        super().__init__(space=space.suggest, metric=list(objectives), mode=[DIRECTIONS[m] for m in objectives],
                         sampler=sampler, study_name=study_name, storage=storage)
        self.pruned: set[str] = set()
        self.diverged_trials: dict[str, str] = {}  # trial id -> reason (non-finite loss or weights)

    def _setup_study(self, mode: str | list) -> None:
        """Name the study's objectives, so optuna-dashboard and `optuna.load_study` show
        clean_acc/robust_acc/channel_sparsity instead of "Objective 0/1/2"."""
        super()._setup_study(mode)
        if isinstance(self._metric, list) and self._ot_study.metric_names != list(self._metric):
            with warnings.catch_warnings():  # experimental in Optuna 5 (stable since 3.2 in practice)
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._ot_study.set_metric_names(list(self._metric))

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Keep `max_concurrent_trials` here, so Tune's ConcurrencyLimiter passes every call
        through. The limiter keeps its own set of live trials in Tune's search-generator state,
        a file written after this searcher's and uploaded apart from the trial states: restored
        from an older copy (a kill between the writes), it held trials Tune had ended as live,
        asked for no more trials and the resumed sweep waited forever; and it never passed on
        the end of a trial it had not handed out itself (one the restore continued)."""
        self.max_concurrent = max_concurrent
        return True

    def live_trials(self) -> int:
        """Trials handed out and not ended, as this searcher knows them: after a restore, one
        Optuna already has finished (told after the snapshot, or by `reconcile_with_snapshot`)
        does not hold a slot."""
        settled = getattr(self, "settled", {})
        return sum(1 for tid in self._ot_trials if tid not in self._completed_trials and tid not in settled)

    def suggest(self, trial_id: str) -> dict | str | None:
        if trial_id not in self._ot_trials:
            total = getattr(self, "total_trials", None)
            if total is not None and len(self._ot_trials) >= total:
                # never more than --trials: a restore whose trial count is older than its trial
                # states (a kill before Tune's own upload, `save_to_dir`) would otherwise ask for more
                return self.FINISHED
            limit = getattr(self, "max_concurrent", 0)
            if limit and self.live_trials() >= limit:
                return None  # Tune asks again when a trial ends
            ahead = self._take_ahead()
            if ahead is not None:  # Ray's define-by-run suggest uses a trial already in _ot_trials
                self._ot_trials[trial_id] = ahead
        with warnings.catch_warnings():  # Ray times our space function with the sampler inside it and
            # warns past 1 s to move "computation" into the trainable; the time is GP's fit
            warnings.filterwarnings("ignore", message="Define-by-run function passed in the `space` argument took")
            params = super().suggest(trial_id)
        ot = self._ot_trials.get(trial_id)
        if ot is not None:
            ot.set_user_attr(RAY_TRIAL_ID, trial_id)
        self._start_ahead()
        return params

    # --- sampling ahead (module docstring) --------------------------------------------------
    def _start_ahead(self) -> None:
        n = len(self._ot_trials)
        total = getattr(self, "total_trials", None)
        if total is None or n < getattr(self, "sample_ahead_after", SAMPLE_AHEAD_AFTER) or n >= total:
            return
        if getattr(self, "_ahead_pool", None) is None:
            self._ahead_pool = ThreadPoolExecutor(1, thread_name_prefix="brsearch-sample-ahead")
        self._ahead = self._ahead_pool.submit(self._ask_ahead)
        _SAMPLING_AHEAD.add(self)

    def _ask_ahead(self) -> optuna.trial.Trial:
        trial = self._ot_study.ask()
        try:
            self._brs_space.suggest(trial)  # every parameter sampled now; Ray's suggest re-reads them
        except Exception:
            self._ot_study.tell(trial, state=TrialState.FAIL)
            raise
        return trial

    def _take_ahead(self) -> optuna.trial.Trial | None:
        """The trial sampled ahead (waiting for it if still in flight), or None."""
        fut, self._ahead = getattr(self, "_ahead", None), None
        if fut is None:
            return None
        t0 = time.perf_counter()
        try:
            return fut.result()
        except Exception as exc:  # sample in the loop instead
            log.warning("sampling ahead failed (%s); sampling in the loop", exc)
            return None
        finally:
            AHEAD_STATS["used"] += 1
            AHEAD_STATS["waited_s"] += time.perf_counter() - t0

    def discard_ahead(self) -> None:
        """The sweep ended: a trial sampled ahead and never handed out becomes FAIL, not RUNNING."""
        trial = self._take_ahead()
        _SAMPLING_AHEAD.discard(self)
        if trial is None:
            return
        try:
            trial.set_user_attr("brsearch_reason", AHEAD_REASON)
            self._ot_study.tell(trial, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # already settled (a restore's reconcile)
            pass

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_ahead", "_ahead_pool")}

    def __setstate__(self, state: dict) -> None:
        """Unpickled (Tune's tuner.pkl on `--resume`): the stored study can be older than this
        searcher. With s3:// storage a driver killed before its first experiment checkpoint has
        uploaded the Tuner but not the study, and Tune then restarts the experiment from scratch;
        without its study the searcher's first ask raised KeyError on every --resume. It is
        created again, empty, as for a new sweep."""
        self.__dict__.update(state)
        self._ahead, self._ahead_pool = None, None
        if "_ot_study" in state and self._study_name not in optuna.get_all_study_names(self._storage):
            log.warning("the stored Optuna study %r is older than the sweep's searcher (a crash before the first "
                        "experiment checkpoint): it is started again, empty", self._study_name)
            self._ot_trials = {}
            self._setup_study(self._mode)

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        """Tune saves the searcher into each experiment snapshot, right after the snapshot's trial
        states, into its staging folder, and uploads both to the storage later, in the
        background. The study's paced journal (search.storage.SnapshotPacedJournal) is written
        straight to the storage, so with a local storage the trial states go there first
        (`search.storage.publish`), then the journal, then this searcher: a kill at any moment
        leaves the storage's study no newer than its trial states (what is older,
        `reconcile_with_snapshot` settles). Tune's upload later writes the same files again."""
        spec = getattr(getattr(self, "_storage", None), "brsearch_spec", None) or {}
        folder = snapshot_target(spec, checkpoint_dir)
        if folder is not None:
            publish(Path(checkpoint_dir) / TUNE_SNAPSHOT.format(session_str), folder)
        super().save_to_dir(checkpoint_dir, session_str)  # `save`: the journal, then the pickle
        if folder is not None:
            publish(Path(checkpoint_dir) / self.CKPT_FILE_TMPL.format(session_str), folder)

    def save(self, checkpoint_path: str) -> None:
        """The paced journal first, then the searcher pickled as Ray's (a pickled __dict__),
        without the sample in flight: it is not handed out yet."""
        flush = getattr(self._storage, "flush", None)
        if flush is not None:
            flush()
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # Tune calls on_trial_complete(error=True) with no result, so remember why here
        if result.get(DIVERGED):
            self.diverged_trials[trial_id] = str(result.get(FAILURE_REASON) or DIVERGED)
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        ot = self._ot_trials.get(trial_id)
        if ot is None:
            return
        state, values, reason = self.outcome(result, error)
        if trial_id in getattr(self, "diverged_trials", {}):
            state, values, reason = TrialState.FAIL, None, self.diverged_trials[trial_id]
        told = getattr(self, "settled", {}).get(trial_id)
        if told is not None:  # told before the crash (`restore`): Optuna keeps that outcome
            if told != state:
                log.warning("trial %s ended %s when run again after the resume, but Optuna has it %s "
                            "from before the crash; Optuna keeps %s", trial_id, state.name, told.name, told.name)
            state = told
        else:
            self._tell(trial_id, ot, state, values, reason, result)
        if state == TrialState.PRUNED:
            self.pruned.add(trial_id)
        self._completed_trials.add(trial_id)

    def _tell(self, trial_id: str, ot: optuna.trial.Trial, state: TrialState, values: list[float] | None,
              reason: str, result: dict | None) -> None:
        tell_outcome(self._ot_study, ot, state, values, reason, result, getattr(self, "floors", None), trial_id)

    def outcome(self, result: dict | None, error: bool) -> tuple[TrialState, list[float] | None, str]:
        return outcome(result, error, self.metric)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    def restore(self, checkpoint_path: str) -> None:
        """`Tuner.restore` (`--resume`): reload the pickled state, then settle the Optuna trials a
        crash left RUNNING that Tune will not continue."""
        super().restore(checkpoint_path)
        self.__dict__.setdefault("diverged_trials", {})
        self._ahead, self._ahead_pool = None, None
        # a trial the snapshot holds but this pickle, written just after it, does not (a kill in
        # between): Tune continues it, so it is told when it ends, not marked an orphan
        for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            tid = t.user_attrs.get(RAY_TRIAL_ID)
            if tid and t.user_attrs.get(RESUMED) and tid not in self._ot_trials:
                self._ot_trials[tid] = optuna.trial.Trial(self._ot_study, t._trial_id)
        self.settled = self.told_after_snapshot()
        if self.settled:
            log.warning("%d trial(s) Tune runs again were told to Optuna after its last snapshot (%s); "
                        "Optuna keeps those outcomes and MO-ASHA ends the runs the same way",
                        len(self.settled), ", ".join(f"{t} {s.name}" for t, s in sorted(self.settled.items())))
        n = self.reconcile_orphans()
        if n:
            log.warning("marked %d Optuna trial(s) orphaned by a crash as FAIL", n)

    def told_after_snapshot(self) -> dict[str, TrialState]:
        """After a restore: the trials Tune will run again (unfinished in its snapshot) whose
        outcome Optuna already has, because the tell came after the snapshot. A second tell
        would raise `UpdateFinishedTrialError`; Optuna's first outcome stands instead."""
        finished = {t.number: t.state for t in self._ot_study.get_trials(deepcopy=False) if t.state.is_finished()}
        return {tid: finished[ot.number] for tid, ot in self._ot_trials.items()
                if tid not in self._completed_trials and ot.number in finished}

    def settled_stop(self, trial_id: str) -> bool | None:
        """How a run Tune repeats after a resume must end to agree with Optuna: True when Optuna
        has it PRUNED (stop it), False when COMPLETE (never stop it), None otherwise (a trial not
        told before the crash, or FAIL: a divergence repeats from its checkpoint by itself)."""
        told = getattr(self, "settled", {}).get(trial_id)
        if told == TrialState.PRUNED:
            return True
        return False if told == TrialState.COMPLETE else None

    def reconcile_orphans(self) -> int:
        """After a restore: Optuna trials left RUNNING that Tune no longer tracks become FAIL, so
        samplers (TPE's constant liar especially) stop treating them as pending forever."""
        live = {t.number for tid, t in self._ot_trials.items() if tid not in self._completed_trials}
        n = 0
        for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number not in live:
                # public API: tell by trial number (no user attribute can be set on a trial
                # this process did not ask for without Optuna's private storage calls)
                self._ot_study.tell(t.number, state=TrialState.FAIL)
                n += 1
        return n


def outcome(result: dict | None, error: bool, objectives: list[str]) -> tuple[TrialState, list[float] | None, str]:
    """How a Tune trial's last result is told to Optuna: (state, values, reason)."""
    if result and result.get(DIVERGED):  # trainables.tune's last report of a diverged trial
        return TrialState.FAIL, None, str(result.get(FAILURE_REASON) or DIVERGED)
    if error or not result:
        return TrialState.FAIL, None, "error" if error else "no result"
    if not is_completed(result):
        return TrialState.PRUNED, None, stopped_reason(result)
    values = [result.get(m) for m in objectives]
    if any(v is None or not math.isfinite(float(v)) for v in values):
        return TrialState.FAIL, None, f"non-finite objectives {values}"
    return TrialState.COMPLETE, [float(v) for v in values], ""


def tell_outcome(study: optuna.Study, ot: optuna.trial.Trial, state: TrialState, values: list[float] | None,
                 reason: str, result: dict | None, floors: Floors | None, trial_id: str = "") -> None:
    """Tell one outcome with its reason and constraints (a stopped trial's UNFINISHED, a completed
    one's floors); never leaves the trial RUNNING: a failed tell becomes FAIL."""
    try:
        if reason:
            ot.set_user_attr("brsearch_reason", reason)
        if state == TrialState.PRUNED:
            ot.set_constraint(UNFINISHED, unfinished(result))
        if state == TrialState.COMPLETE and floors is not None:
            for key, c in floors.constraints(result or {}).items():
                ot.set_constraint(key, c)
        study.tell(ot, values, state=state)
    except Exception as exc:  # never leave a zombie RUNNING trial behind
        try:
            study.tell(ot, state=TrialState.FAIL)
            log.warning("optuna tell failed for %s (%s); marked it FAIL", trial_id, exc)
        except Exception:  # finished already: the state it has stays
            now = study.get_trials(deepcopy=False)[ot.number].state
            log.warning("optuna tell failed for %s (%s); Optuna keeps it %s", trial_id, exc, now.name)


def reconcile_with_snapshot(study: optuna.Study, tune_trials: list, objectives: list[str],
                            floors: Floors | None) -> dict[str, int]:
    """Before `Tuner.restore` (`--resume`): the study as the snapshot Tune restores has it. A
    kill can land between Tune's snapshot and the searcher's save just after it, which writes the
    study (search.storage.SnapshotPacedJournal): a trial the snapshot has ended is then still
    RUNNING in Optuna (told here, from its last result), and one it has running is unknown to the
    pickled searcher (marked RESUMED, so `restore` takes it up instead of failing it). Returns
    counts by what was done."""
    by_id = {t.trial_id: t for t in tune_trials}
    done = {"told": 0, "resumed": 0}
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        t = by_id.get(frozen.user_attrs.get(RAY_TRIAL_ID))
        if t is None:  # asked after the snapshot: an orphan, marked FAIL by the searcher's restore
            continue
        ot = optuna.trial.Trial(study, frozen._trial_id)
        if t.status in ("TERMINATED", "ERROR"):
            state, values, reason = outcome(t.last_result, t.status == "ERROR", objectives)
            tell_outcome(study, ot, state, values, reason, t.last_result, floors, t.trial_id)
            done["told"] += 1
        else:
            ot.set_user_attr(RESUMED, True)
            done["resumed"] += 1
    return done


def unfinished(result: dict | None) -> float:
    """A stopped trial's UNFINISHED constraint: (1 - epochs run / its budget) x UNFINISHED_SCALE,
    in (0, UNFINISHED_SCALE]; the further it got, the smaller (a result without epochs: the most)."""
    result = result or {}
    budget = max(1, int(result.get(MAX_EPOCHS) or 1))
    done = min(max(0, int(result.get(EPOCH) or 0)), budget - 1)  # stopped: never the whole budget
    return UNFINISHED_SCALE * (1 - done / budget)


def settle_sampled_ahead() -> None:
    """After `Tuner.fit`: the searchers of this process (the one Tune restored included) settle
    the trial each may have sampled ahead, so no Optuna trial stays RUNNING after a sweep."""
    for searcher in list(_SAMPLING_AHEAD):
        searcher.discard_ahead()
