"""Tune driver callbacks that are not about MLflow: one progress line per finished trial, no
retries for a diverged trial, and no TensorBoard files."""
from __future__ import annotations

import math
from typing import Any

from ray.tune import Callback
from ray.tune.logger import TBXLoggerCallback

from search.results import trial_outcome
from trainables.contract import DIRECTIONS, DIVERGED


class ProgressCallback(Callback):
    """One terminal line per finished trial, on top of Tune's status table."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def get_state(self) -> dict[str, Any]:
        return {"done": self.done}

    def set_state(self, state: dict[str, Any]) -> None:
        self.done = int(state.get("done", 0))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial)

    def _line(self, trial: Any) -> None:
        self.done += 1
        status, reason = trial_outcome(trial)
        r = trial.last_result or {}
        objs = "  ".join(f"{m} {r[m]:.4g}" for m in DIRECTIONS
                         if isinstance(r.get(m), (int, float)) and math.isfinite(r[m]))
        print(" ".join(p for p in (f"[{self.done}/{self.total}] {trial.trial_id} {status}:", objs, reason) if p), flush=True)


class NoRetryOnDivergence(Callback):
    """A trial that reported `diverged` (trainables.tune) fails without Tune's retries: training is
    deterministic, so a retry from its last checkpoint would diverge again. Ray has no retry filter
    per exception; Tune checks the trial's own `max_failures` when the error arrives, which is
    after this result. (Should this attribute go, a retry still fails at once on the marker
    checkpoint the trial left.)"""

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get(DIVERGED) and hasattr(trial, "max_failures"):
            trial.max_failures = 0


class NoTensorBoard(TBXLoggerCallback):
    """In a sweep's callbacks, Tune adds no TensorBoard logger of its own (it adds one only when
    none of that type is given), and this one writes nothing. Why: Tune's TensorBoard writer runs
    in the driver loop, opens a writer per trial and flushes and fsyncs its event file at every
    result, which held the loop up more than anything of ours (docs/benchmarks.md, "Driver
    scale"). Results stay in result.json/progress.csv and MLflow."""

    def __init__(self) -> None:  # (no tensorboardX writer: nothing is written)
        pass

    def log_trial_start(self, trial: Any) -> None:
        pass

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        pass

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        pass
