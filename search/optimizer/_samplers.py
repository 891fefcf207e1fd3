"""The Optuna samplers `--sampler` names, built for a sweep of `max_concurrent` parallel trials.

`auto` (the default) is GP in FIFO sweeps of fewer than `GP_TRIALS` trials, and TPE in larger
ones and under MO-ASHA (`search.optimizer.resolve_sampler`). With FIFO GP found the most
hypervolume at small budgets (docs/benchmarks.md, "Search efficiency"), but it refits its
model on every ask, in Tune's driver loop, and the cost grows with the trials and the trials
pending, where TPE's stays small (the figures: docs/search.md, "Samplers"). Under MO-ASHA GP
learns only from the few trials that complete, so most of its proposals would be random start-up
draws; TPE learns from the stopped ones too. The
choice is made once per sweep (the trial count and scheduler are fixed on `--resume`), so a
resumed sweep keeps its sampler.
"""
from __future__ import annotations

import warnings

import optuna
from optuna.samplers import BaseSampler

from ._policy import resolve_sampler


def make_sampler(name: str, seed: int, max_concurrent: int, trials: int | None = None,
                 scheduler: str | None = None) -> BaseSampler:
    """`trials` and `scheduler`: the sweep's trial count and --scheduler, which `auto` needs.

    Args:
        name: a SAMPLERS name; `auto` needs `trials` and `scheduler`.
        seed: the sampler's seed (--seed).
        max_concurrent: trials at once (sizes TPE's constant liar and the start-up).
        trials: the sweep's trial count.
        scheduler: `fifo` or `moasha`.
    """
    if name == "auto":
        if trials is None or scheduler is None:
            raise ValueError("--sampler auto needs the sweep's trial count and scheduler")
        name = resolve_sampler(name, trials, scheduler)
    startup = max(4, 2 * max_concurrent)  # random trials before a model: a few per parallel slot
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
