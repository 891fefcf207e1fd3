"""MO-ASHA: asynchronous multi-objective successive halving as a Ray Tune scheduler.

Ray Tune 2.60 ships no multi-objective scheduler, because every built-in scheduler takes a single
``metric``/``mode``. This module implements MO-ASHA as described by Schmucker, Donini, Zafar,
Salinas and Archambeau, "Multi-objective Asynchronous Successive Halving" (arXiv:2106.12639,
2021), and as Syne Tune implements it (Salinas et al., "Syne Tune: A Library for Large Scale
Hyperparameter Tuning and Reproducible Research", AutoML Conf 2022; the scheduler first appeared
in Salinas et al., "A multi-objective perspective on jointly tuning hardware and
hyperparameters", NAS@ICLR 2021), on ``ray.tune.schedulers.FIFOScheduler``.

The rung decisions are search.optimizer's rung rule (`RungRule`, its own module): this module
only schedules.

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
  in :attr:`MOASHAScheduler.stopped_trials` (``search.optimizer.ParetoSearch`` does).
* **Tune never saves or restores scheduler state.** ``TuneController.save_to_dir`` checkpoints
  only the searcher and the callbacks. To keep the rung history across a resume, put
  :meth:`MOASHAScheduler.state_callback` into ``RunConfig(callbacks=[...])``. Its
  ``get_state/set_state`` go into ``callback-states-*.pkl`` at every experiment checkpoint and
  are restored before the trials are re-added. ``tuner.pkl`` pickles the scheduler and the
  callback together, so the restored callback still points at the restored scheduler.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from ray.tune.callback import Callback
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from trainables.contract import EPOCH, MAXIMIZE, MINIMIZE, TRIAL_ID

from ._policy import TIE_BREAKS
from ._ranking import RungRule

if TYPE_CHECKING:  # pragma: no cover
    from ray.tune.experiment import Trial

logger = logging.getLogger(__name__)


_STATE_VERSION = 1


class MOASHAScheduler(FIFOScheduler):
    """Asynchronous multi-objective successive halving (single bracket). See the module docstring.

    Args:
        metrics: objective names, each present in every reported result.
        modes: ``"max"``/``"min"`` per metric (a single string is broadcast).
        time_attr: result key that counts completed budget units (monotonic, 1 after the first unit).
        grace_period: first milestone; no trial is judged before it.
        reduction_factor: η; a trial continues iff its normalised rank at a rung is <= 1/η.
        tie_break: ``"crowding"`` (default) or ``"epsnet"``: the order inside a non-dominated front.
        max_t: the full budget in ``time_attr`` units; milestones are strictly below it.
        violation: maps a result's objective values (name -> value) to how far they are below the
            sweep's floors (> 0: infeasible); infeasible vectors rank behind every feasible one
            at a rung. None: every vector is feasible. Must pickle (``tuner.pkl``).

    Attributes:
        stopped_trials: ids of the trials this scheduler stopped early.
        decisions: one dict per rung decision, with ``trial_id``, ``milestone``, ``time``, ``values``
            (raw metric values), ``position`` (for a STOP with the ε-net: a lower bound), ``n``,
            ``n_keep`` (positions 0..n_keep-1 continue) and ``decision``
            (``"CONTINUE"``/``"STOP"``).
    """

    def __init__(
        self,
        metrics: Sequence[str],
        modes: Sequence[str] | str,
        time_attr: str = EPOCH,
        grace_period: int = 1,
        reduction_factor: float = 3,
        *,
        max_t: int,
        tie_break: str = "crowding",
        violation: Callable[[Mapping[str, float]], float] | None = None,
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
        bad = [m for m in modes if m not in (MAXIMIZE, MINIMIZE)]
        if bad:
            raise ValueError(f"modes must be 'max' or 'min'; got {bad}")
        if not grace_period > 0:
            raise ValueError("grace_period must be positive")
        if not reduction_factor > 1:
            raise ValueError("reduction_factor must be > 1")
        if max_t is None or not max_t > 0:
            raise ValueError("max_t must be positive")
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break {tie_break!r}; accepted: {', '.join(TIE_BREAKS)}")
        self._tie_break = tie_break
        self.rule = RungRule(reduction_factor, tie_break)
        self._violation = violation

        self._metrics: list[str] = metrics
        self._modes: list[str] = modes
        # Tune's strict metric check needs a *string* here (see module docstring).
        self._metric = metrics[0]
        self._mode = modes[0]
        self._signs = np.array([1.0 if m == MAXIMIZE else -1.0 for m in modes])
        self._time_attr = time_attr
        self._grace_period = grace_period
        self._reduction_factor = float(reduction_factor)
        self._max_t = max_t

        milestones: list[int | float] = []
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
        self._rungs: list[tuple[int | float, dict[str, tuple[float, ...]]]] = [
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
        self, metric: str | None, mode: str | None, **spec
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
            mode_list: list[str | None] = [None] * len(names)
        else:
            mode_list = [mode] * len(names) if isinstance(mode, str) else list(mode)
        for name, md in zip(names, mode_list):
            if name not in self._metrics:
                return False
            if md is not None and md != self._modes[self._metrics.index(name)]:
                return False
        return True

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        """A run Tune repeats after `--resume` whose outcome the searcher told Optuna before the
        crash (after Tune's last snapshot, which this state comes from) ends as Optuna has it:
        stopped at its first result, or never stopped (`ParetoSearch.settled_stop`)."""
        stop = _settled_stop(tune_controller, trial.trial_id)
        if stop:
            self.stopped_trials.add(trial.trial_id)
        elif stop is not None:
            self.__dict__.setdefault("_exempt", set()).add(trial.trial_id)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        trial_id = trial.trial_id
        if trial_id in self.stopped_trials:
            return TrialScheduler.STOP
        if trial_id in self.__dict__.get("_exempt", ()):
            return TrialScheduler.CONTINUE
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
        prev = self._signs * np.asarray(list(recorded.values()), dtype=float).reshape(-1, len(self._signs))
        viols = self._violations([*recorded.values(), values])
        cont, position, n = self.rule.decide(prev, self._oriented(values), viols)
        keep = math.floor(n / self._reduction_factor * (1 + 1e-12)) + 1
        recorded[trial_id] = values
        decision = TrialScheduler.CONTINUE if cont else TrialScheduler.STOP
        self.decisions.append(
            {
                TRIAL_ID: trial_id,
                "milestone": milestone,
                "time": t,
                "values": dict(zip(self._metrics, values)),
                "feasible": viols is None or viols[-1] <= 0,
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

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict):
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

    def state_callback(self) -> MOASHAStateCallback:
        """A ``tune.Callback`` that checkpoints and restores this scheduler's rung state."""
        return MOASHAStateCallback(self)

    # ------------------------------------------------------------------ helpers
    def _extract(self, result: dict) -> tuple[float, ...] | None:
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

    def _violations(self, vectors: list[tuple[float, ...]]) -> list[float] | None:
        """Each vector's floor violation, None without floors; cached per vector (a rung of 1,000
        would otherwise cost 2 ms of Python calls per decision)."""
        violation = getattr(self, "_violation", None)  # a scheduler pickled before floors has none
        if violation is None:
            return None
        cache = self.__dict__.setdefault("_violation_cache", {})
        out = []
        for v in vectors:
            c = cache.get(v)
            if c is None:
                c = cache[v] = float(violation(dict(zip(self._metrics, v))))
            out.append(c)
        return out

    def _oriented(self, values: Sequence[float]) -> np.ndarray:
        return self._signs * np.asarray(values, dtype=float)

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned_missing:
            self._warned_missing.add(key)
            logger.warning(msg, *args)


def _settled_stop(tune_controller: Any, trial_id: str) -> bool | None:
    """Ask the searcher behind Tune's search algorithm (and a ConcurrencyLimiter) whether a
    repeated run must stop; None when no searcher in the chain knows (`ParetoSearch.settled_stop`)."""
    searcher = getattr(tune_controller, "search_alg", None)
    for _ in range(4):
        if searcher is None:
            return None
        ask = getattr(searcher, "settled_stop", None)
        if ask is not None:
            return ask(trial_id)
        searcher = getattr(searcher, "searcher", None)
    return None


class MOASHAStateCallback(Callback):
    """Carries :class:`MOASHAScheduler` rung state through Tune experiment checkpoints.

    Tune 2.60 checkpoints callback state (``callback-states-*.pkl``) but never scheduler state.
    Add ``scheduler.state_callback()`` to ``RunConfig(callbacks=[...])``.
    """

    def __init__(self, scheduler: MOASHAScheduler):
        self.scheduler = scheduler

    def get_state(self) -> dict | None:
        return self.scheduler.get_state()

    def set_state(self, state: dict):
        self.scheduler.set_state(state)
