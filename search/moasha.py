"""MO-ASHA: asynchronous multi-objective successive halving as a Ray Tune scheduler.

Ray Tune 2.60 ships no multi-objective scheduler, because every built-in scheduler takes a single
``metric``/``mode``. This module ports the idea of Syne Tune's ``MOASHA`` (Salinas et al., "A
multi-objective perspective on jointly tuning hardware and hyperparameters", NAS@ICLR 2021) onto
``ray.tune.schedulers.FIFOScheduler``.

Rungs and decisions
-------------------
* Milestones are ``grace_period * reduction_factor**j`` for ``j = 0, 1, ...`` while the value stays
  ``< max_t``. There is one bracket, and no rung at ``max_t``, so a trial that reaches ``max_t`` is
  never stopped by the rung logic. It ends on its own when the trainable returns.
* ``result[time_attr]`` must count **completed** budget units and grow monotonically, like
  ``training_iteration``: after the first epoch it is 1. If the trainable reports a 0-based
  ``epoch``, pass ``time_attr="training_iteration"`` or report an ``epochs_done`` field instead.
* When a result first reaches a milestone (``result[time_attr] >= milestone``; the highest such
  milestone, once per trial and rung), the trial's objective vector is recorded at that rung. The
  trial is then ranked against every vector recorded there, its own included (see
  :func:`decide`). It CONTINUEs or is STOPped. Results below ``grace_period`` are never judged.
* The total order at a rung comes from non-dominated sorting (front index, lower is better). Inside a
  front, the NSGA-II **crowding distance** breaks ties (larger is better). Syne Tune breaks ties
  with an ε-net instead. Crowding distance is cheaper and deterministic, and it keeps the extremes of
  the front alive. A trial's *position* is the number of recorded vectors strictly ahead of it in
  this order, so exact ties are resolved optimistically. The trial continues iff
  ``position < max(1, floor(n / reduction_factor))``, where ``n`` counts the vectors at the rung with
  this one included. This is the convention of Optuna's ``SuccessiveHalvingPruner``: the first trial
  at a rung always continues, and until ``reduction_factor`` vectors are recorded a trial continues
  only if nothing recorded is strictly ahead of it. A non-dominated trial can still be stopped
  when the rung's front holds more than ``floor(n / reduction_factor)`` points and its crowding
  distance is small. That is the point of successive halving.
* Objectives with mode ``"min"`` are negated internally. A NaN objective counts as the worst
  value (``-inf``) for that objective.

Integration notes (Ray 2.60, checked in the installed source)
--------------------------------------------------------------
* ``TuneController._validate_result_metrics`` does ``scheduler.metric not in result``, so
  ``scheduler.metric`` must be a **string**. A list raises ``TypeError: unhashable type``. We
  set ``self._metric = metrics[0]`` and ``self._mode = modes[0]`` so that the strict metric check
  covers the first objective. The full lists are ``self._metrics`` and ``self._modes``.
* ``tune.run`` calls ``scheduler.set_search_properties(metric, mode, **spec)`` with the
  ``TuneConfig`` metric/mode, which are ``None`` for a multi-objective ``OptunaSearch``, and
  raises ``ValueError`` if it returns False.
* When the scheduler returns STOP, ``TuneController.stop_trial`` calls
  ``search_alg.on_trial_complete(trial_id, result=last_result)``. The stock ``OptunaSearch``
  would then tell Optuna COMPLETE with low-fidelity values. The sweep must tell PRUNED for the ids
  in :attr:`MOASHAScheduler.stopped_trials`.
* **Tune never saves or restores scheduler state.** ``TuneController.save_to_dir`` checkpoints
  only the searcher and the callbacks, and ``TrialScheduler.save/restore`` are never called. On
  ``Tuner.restore`` the scheduler is unpickled from ``tuner.pkl`` as it was when the run
  started, with empty rungs. To keep the rung history across a resume, put
  :meth:`MOASHAScheduler.state_callback` into ``RunConfig(callbacks=[...])``. Its
  ``get_state/set_state`` go into ``callback-states-*.pkl`` at every experiment checkpoint and
  are restored before the trials are re-added. ``tuner.pkl`` pickles the scheduler and the
  callback together, so the restored callback still points at the restored scheduler.
  :meth:`save`/:meth:`restore` (pickle files) are implemented as well, for the
  ``TrialScheduler`` interface and for manual use.

Usage::

    searcher = OptunaSearch(space=..., metric=OBJECTIVES, mode=["max"] * 3, sampler=...)
    scheduler = MOASHAScheduler(OBJECTIVES, ["max"] * 3, time_attr="training_iteration",
                                grace_period=1, reduction_factor=3, max_t=max_epochs)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=n),
        # no metric/mode in TuneConfig: the searcher and the scheduler carry the objectives
        run_config=tune.RunConfig(callbacks=[scheduler.state_callback(), ...]),
    )
"""

from __future__ import annotations

import logging
import math
import pickle
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Union

import numpy as np
from ray.tune.callback import Callback
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from search.front import crowding_distance, non_dominated_sort

if TYPE_CHECKING:  # pragma: no cover
    from ray.tune.experiment import Trial

logger = logging.getLogger(__name__)

__all__ = ["MOASHAScheduler", "MOASHAStateCallback", "decide", "rung_positions"]

_STATE_VERSION = 1


def _order_preserving_finite(points: np.ndarray) -> np.ndarray:
    """Map NaN to -inf, then replace +-inf by finite values just outside each column's finite range.

    This keeps every comparison used by dominance and sorting intact, and it keeps crowding
    distances finite where they would otherwise be NaN (inf - inf).
    """
    pts = np.array(points, dtype=float, copy=True)
    pts[np.isnan(pts)] = -np.inf
    for j in range(pts.shape[1]):
        col = pts[:, j]
        finite = col[np.isfinite(col)]
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
        col[col == -np.inf] = lo - 1.0
        col[col == np.inf] = hi + 1.0
    return pts


def rung_positions(points) -> np.ndarray:
    """Position of each row in the MO-ASHA total order (0 = best), for maximized objectives.

    The order sorts by non-dominated front (ascending), then by crowding distance within
    the front (descending). A row's position is the number of rows strictly ahead of it, so
    ties share a position. NaN counts as the worst value.
    """
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2:
        raise ValueError(f"points must have shape (n, k); got {pts.shape}")
    n = pts.shape[0]
    if n == 0:
        return np.zeros(0, dtype=int)
    pts = _order_preserving_finite(pts)
    rank = np.empty(n, dtype=int)
    crowd = np.empty(n, dtype=float)
    for r, idx in enumerate(non_dominated_sort(pts)):
        rank[idx] = r
        crowd[idx] = crowding_distance(pts[idx])
    ahead = (rank[None, :] < rank[:, None]) | (
        (rank[None, :] == rank[:, None]) & (crowd[None, :] > crowd[:, None])
    )
    return ahead.sum(axis=1)


def _n_keep(n: int, reduction_factor: float) -> int:
    return max(1, math.floor(n / reduction_factor))


def _decide_detail(rung_vectors, new_vector, reduction_factor: float) -> tuple[bool, int, int]:
    new = np.asarray(new_vector, dtype=float).reshape(1, -1)
    prev = np.asarray(rung_vectors, dtype=float)
    if prev.size == 0:
        prev = prev.reshape(0, new.shape[1])
    if prev.ndim != 2 or prev.shape[1] != new.shape[1]:
        raise ValueError(
            f"rung vectors of shape {prev.shape} do not match a new vector of length {new.shape[1]}"
        )
    pts = np.vstack([prev, new])
    n = pts.shape[0]
    position = int(rung_positions(pts)[-1])
    keep = _n_keep(n, reduction_factor)
    return position < keep, position, keep


def decide(
    rung_vectors: Sequence[Sequence[float]],
    new_vector: Sequence[float],
    reduction_factor: float,
) -> bool:
    """MO-ASHA rung decision for maximized objectives. ``True`` means CONTINUE, ``False`` STOP.

    ``rung_vectors`` are the vectors already recorded at the rung (the new one excluded).
    ``new_vector`` is the arriving trial's vector. With ``n = len(rung_vectors) + 1``, the
    trial continues iff its position in :func:`rung_positions` over all ``n`` vectors is
    ``< max(1, floor(n / reduction_factor))``.
    """
    return _decide_detail(rung_vectors, new_vector, reduction_factor)[0]


class MOASHAScheduler(FIFOScheduler):
    """Asynchronous multi-objective successive halving (single bracket). See the module docstring.

    Args:
        metrics: objective names, each present in every reported result.
        modes: ``"max"``/``"min"`` per metric (a single string is broadcast).
        time_attr: result key that counts completed budget units (monotonic, 1 after the first unit).
        grace_period: first milestone; no trial is judged before it.
        reduction_factor: η; a trial continues iff it is in the top ``max(1, floor(n/η))`` at a rung.
        max_t: the full budget in ``time_attr`` units; milestones are strictly below it.

    Attributes:
        stopped_trials: ids of the trials this scheduler stopped early.
        decisions: one dict per rung decision, with ``trial_id``, ``milestone``, ``time``, ``values``
            (raw metric values), ``position``, ``n``, ``n_keep`` and ``decision``
            (``"CONTINUE"``/``"STOP"``).
    """

    def __init__(
        self,
        metrics: Sequence[str],
        modes: Union[Sequence[str], str],
        time_attr: str = "epoch",
        grace_period: int = 1,
        reduction_factor: float = 3,
        *,
        max_t: int,
    ):
        super().__init__()
        metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        if not metrics:
            raise ValueError("metrics must name at least one objective")
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"duplicate metric names: {metrics}")
        modes = [modes] * len(metrics) if isinstance(modes, str) else list(modes)
        if len(modes) != len(metrics):
            raise ValueError(f"{len(modes)} modes for {len(metrics)} metrics")
        bad = [m for m in modes if m not in ("max", "min")]
        if bad:
            raise ValueError(f"modes must be 'max' or 'min'; got {bad}")
        if not grace_period > 0:
            raise ValueError("grace_period must be positive")
        if not reduction_factor > 1:
            raise ValueError("reduction_factor must be > 1")
        if max_t is None or not max_t > 0:
            raise ValueError("max_t must be positive")

        self._metrics: list[str] = metrics
        self._modes: list[str] = modes
        # Tune's strict metric check needs a *string* here (see module docstring).
        self._metric = metrics[0]
        self._mode = modes[0]
        self._signs = np.array([1.0 if m == "max" else -1.0 for m in modes])
        self._time_attr = time_attr
        self._grace_period = grace_period
        self._reduction_factor = float(reduction_factor)
        self._max_t = max_t

        milestones: list[Union[int, float]] = []
        j = 0
        while grace_period * self._reduction_factor**j < max_t:
            m = grace_period * self._reduction_factor**j
            milestones.append(int(m) if float(m).is_integer() else float(m))
            j += 1
        if not milestones:
            logger.warning(
                "MOASHAScheduler: grace_period=%s >= max_t=%s, so there are no rungs and no trial "
                "will be stopped early.",
                grace_period,
                max_t,
            )
        # Ascending milestones; each maps trial_id -> raw metric values (tuple, not sign-flipped).
        self._rungs: list[tuple[Union[int, float], dict[str, tuple[float, ...]]]] = [
            (m, {}) for m in milestones
        ]
        self.stopped_trials: set[str] = set()
        self.decisions: list[dict[str, Any]] = []
        self._warned_missing: set[str] = set()

    # ------------------------------------------------------------------ properties
    @property
    def metrics(self) -> list[str]:
        return list(self._metrics)

    @property
    def modes(self) -> list[str]:
        return list(self._modes)

    @property
    def milestones(self) -> list[float]:
        return [m for m, _ in self._rungs]

    def rung_records(self) -> dict[float, dict[str, tuple[float, ...]]]:
        """Milestone -> {trial_id: raw objective values}, a copy."""
        return {m: dict(rec) for m, rec in self._rungs}

    # ------------------------------------------------------------------ Tune hooks
    def set_search_properties(
        self, metric: Optional[str], mode: Optional[str], **spec
    ) -> bool:
        """Accept Tune's properties without overriding our objective lists.

        ``tune.run`` passes the ``TuneConfig`` metric and mode, which are None in a multi-objective
        sweep, and that is accepted. A metric that is one of our objectives is accepted if its
        mode (when given) agrees. Anything else returns False, and Tune then raises its
        "scheduler was already instantiated with its own metric" error instead of silently
        optimizing a different objective.
        """
        if metric is None:
            return True
        names = [metric] if isinstance(metric, str) else list(metric)
        if mode is None:
            mode_list: list[Optional[str]] = [None] * len(names)
        else:
            mode_list = [mode] * len(names) if isinstance(mode, str) else list(mode)
        for name, md in zip(names, mode_list):
            if name not in self._metrics:
                return False
            if md is not None and md != self._modes[self._metrics.index(name)]:
                return False
        return True

    def on_trial_result(self, tune_controller, trial: "Trial", result: Dict) -> str:
        trial_id = trial.trial_id
        if trial_id in self.stopped_trials:
            return TrialScheduler.STOP
        t = result.get(self._time_attr)
        if t is None:
            self._warn_once(
                f"time:{self._time_attr}",
                "MOASHAScheduler: result has no %r; no rung decision made.",
                self._time_attr,
            )
            return TrialScheduler.CONTINUE
        if t >= self._max_t or not self._rungs or t < self._rungs[0][0]:
            return TrialScheduler.CONTINUE
        # Highest milestone reached by this result.
        milestone, recorded = next((m, r) for m, r in reversed(self._rungs) if t >= m)
        if trial_id in recorded:
            return TrialScheduler.CONTINUE  # already judged at this rung
        values = self._extract(result)
        if values is None:
            return TrialScheduler.CONTINUE
        prev = [self._oriented(v) for v in recorded.values()]
        cont, position, keep = _decide_detail(prev, self._oriented(values), self._reduction_factor)
        recorded[trial_id] = values
        decision = TrialScheduler.CONTINUE if cont else TrialScheduler.STOP
        self.decisions.append(
            {
                "trial_id": trial_id,
                "milestone": milestone,
                "time": t,
                "values": dict(zip(self._metrics, values)),
                "position": position,
                "n": len(recorded),
                "n_keep": keep,
                "decision": decision,
            }
        )
        if not cont:
            self.stopped_trials.add(trial_id)
            logger.info(
                "MOASHAScheduler: stopping trial %s at %s=%s (rung %s, position %d, keep %d of %d)",
                trial_id, self._time_attr, t, milestone, position, keep, len(recorded),
            )
        return decision

    def on_trial_complete(self, tune_controller, trial: "Trial", result: Dict):
        # Every result already went through on_trial_result (Tune also replays the final
        # result there with done=True), so nothing is left to record here. Trials keep their
        # rung records after they finish, as in ASHA.
        pass

    def debug_string(self) -> str:
        rungs = " | ".join(f"t>={m:g}: {len(r)} recorded" for m, r in self._rungs)
        return (
            f"Using MO-ASHA ({', '.join(f'{m}:{d}' for m, d in zip(self._metrics, self._modes))}): "
            f"num_stopped={len(self.stopped_trials)}; {rungs or 'no rungs'}"
        )

    # ------------------------------------------------------------------ state
    def get_state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "metrics": list(self._metrics),
            "modes": list(self._modes),
            "time_attr": self._time_attr,
            "milestones": self.milestones,
            "rungs": [(m, dict(r)) for m, r in self._rungs],
            "stopped_trials": set(self.stopped_trials),
            "decisions": list(self.decisions),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported MOASHAScheduler state version {state.get('version')}")
        if state["metrics"] != self._metrics or state["modes"] != self._modes:
            raise ValueError(
                f"saved MO-ASHA state is for metrics {state['metrics']} / modes {state['modes']}, "
                f"this scheduler has {self._metrics} / {self._modes}"
            )
        if list(state["milestones"]) != self.milestones:
            logger.warning(
                "MOASHAScheduler: restoring rungs %s into a scheduler configured with %s; "
                "adopting the saved rungs.",
                state["milestones"],
                self.milestones,
            )
        self._rungs = [(m, dict(r)) for m, r in state["rungs"]]
        self.stopped_trials = set(state["stopped_trials"])
        self.decisions = list(state["decisions"])

    def save(self, checkpoint_path: str):
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))

    def state_callback(self) -> "MOASHAStateCallback":
        """A ``tune.Callback`` that checkpoints and restores this scheduler's rung state."""
        return MOASHAStateCallback(self)

    # ------------------------------------------------------------------ helpers
    def _extract(self, result: Dict) -> Optional[tuple[float, ...]]:
        values = []
        for m in self._metrics:
            v = result.get(m)
            try:
                values.append(float(v))
            except (TypeError, ValueError):
                self._warn_once(
                    f"metric:{m}",
                    "MOASHAScheduler: result has no numeric %r (got %r); no rung decision made.",
                    m,
                    v,
                )
                return None
        return tuple(values)

    def _oriented(self, values: Sequence[float]) -> np.ndarray:
        return self._signs * np.asarray(values, dtype=float)

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned_missing:
            self._warned_missing.add(key)
            logger.warning(msg, *args)


class MOASHAStateCallback(Callback):
    """Carries :class:`MOASHAScheduler` rung state through Tune experiment checkpoints.

    Tune 2.60 checkpoints callback state (``callback-states-*.pkl``) but never scheduler state.
    Add ``scheduler.state_callback()`` to ``RunConfig(callbacks=[...])``.
    """

    def __init__(self, scheduler: MOASHAScheduler):
        self.scheduler = scheduler

    def get_state(self) -> Optional[Dict]:
        return self.scheduler.get_state()

    def set_state(self, state: Dict):
        self.scheduler.set_state(state)
