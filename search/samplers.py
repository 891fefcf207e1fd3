"""The Optuna samplers `--sampler` names, built for a sweep of `max_concurrent` parallel trials.

`auto` (the default, with FIFO and with MO-ASHA) is GP for the first `GP_TRIALS` trials and TPE
after them. GP found the most hypervolume at small budgets, with either scheduler
(docs/benchmarks.md, "Search efficiency"), but it refits its model on every ask, and its cost
grows with the trials (about 2.3 s of CPU per ask at 300 trials, against 25 ms for TPE at 1,000:
`benchmarks/study_storage.py`). A sweep of hundreds of trials would spend that in Tune's driver
loop, so past `GP_TRIALS` TPE takes over, with every trial so far as its history.
"""
from __future__ import annotations

import warnings
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

GP_TRIALS = 100  # trials (by number) that `auto` samples with GP; TPE samples the rest


def make_sampler(name: str, seed: int, max_concurrent: int) -> BaseSampler:
    startup = max(4, 2 * max_concurrent)  # random trials before a model: a few per parallel slot
    if name == "auto":
        return GPThenTPE(make_sampler("gp", seed, max_concurrent), make_sampler("tpe", seed, max_concurrent))
    if name == "nsga2":
        # a generation per ~2x the parallel slots keeps generations full under async execution
        return optuna.samplers.NSGAIISampler(population_size=startup, seed=seed)
    if name == "tpe":
        # multivariate + group: models every parameter jointly, conditional ones included
        # (group=True decomposes a define-by-run space into the sub-spaces trials share)
        with warnings.catch_warnings():  # `group` is experimental (Optuna 5): one warning per sweep is noise
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                              n_startup_trials=startup)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}")


class GPThenTPE(BaseSampler):
    """`gp` for trials numbered below `switch_at`, `tpe` from there on. The choice depends on the
    trial's number only, so every call for one trial (search space, relative and independent
    samples, before/after hooks) goes to the same sampler, from any thread."""

    def __init__(self, gp: BaseSampler, tpe: BaseSampler, switch_at: int = GP_TRIALS) -> None:
        self.gp, self.tpe, self.switch_at = gp, tpe, switch_at

    def _for(self, trial: Any) -> BaseSampler:
        return self.gp if trial.number < self.switch_at else self.tpe

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: list[float] | None) -> None:
        self._for(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.gp.reseed_rng()
        self.tpe.reseed_rng()
