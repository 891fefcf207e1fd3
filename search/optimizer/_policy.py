"""Which sampler and tie-break a sweep runs: the names the command line accepts and the rule
that turns `auto` into a sampler. No heavy imports, so bad flags fail before Ray or Optuna load."""
from __future__ import annotations

SAMPLERS = ("auto", "tpe", "nsga2", "gp", "random")  # built by make_sampler (._samplers)
SCHEDULERS = ("fifo", "moasha")
# `auto` (docs/search.md, "Samplers"): with FIFO, GP found the most hypervolume at small budgets,
# but its per-ask cost in the driver loop grows too large for big sweeps, so GP below GP_TRIALS
# trials and TPE from there. Under MO-ASHA, TPE at any size: GP learns from COMPLETE trials only
# and MO-ASHA completes few, so GP would stay on random start-up draws for most of a sweep.
DEFAULT_SAMPLER = "auto"  # with either scheduler
GP_TRIALS = 100
# samplers that learn from COMPLETE trials only: under MO-ASHA, mostly random draws
COMPLETE_ONLY = {"gp": "waits for its start-up trials to complete and ignores stopped ones",
                 "nsga2": "builds its generations from completed trials only"}


def resolve_sampler(name: str, trials: int, scheduler: str) -> str:
    """The sampler a sweep of `trials` trials under `scheduler` runs: `auto` becomes `tpe` under
    MO-ASHA, else `gp` below GP_TRIALS trials and `tpe` from there; other names stay.

    Args:
        name: a SAMPLERS name.
        trials: the sweep's trial count.
        scheduler: `fifo` or `moasha`.
    """
    if name != "auto":
        return name
    if scheduler == "moasha":
        return "tpe"
    return "gp" if trials < GP_TRIALS else "tpe"


def sampler_label(name: str, trials: int, scheduler: str) -> str:
    """`auto (gp)`: the name the user gave and the sampler it resolved to (the sweep's header).

    Args:
        name: the --sampler given.
        trials: the sweep's trial count.
        scheduler: `fifo` or `moasha`.
    """
    actual = resolve_sampler(name, trials, scheduler)
    return name if actual == name else f"{name} ({actual})"


def scheduler_gap(sampler: str, scheduler: str) -> str | None:
    """Why `sampler` (resolved) learns little under `scheduler` (one line), or None.

    Args:
        sampler: the resolved sampler.
        scheduler: `fifo` or `moasha`.
    """
    if scheduler != "moasha" or sampler not in COMPLETE_ONLY:
        return None
    return (f"warning: --sampler {sampler} {COMPLETE_ONLY[sampler]}, and MO-ASHA stops most trials, so "
            f"most of its proposals will be random draws; --sampler tpe (auto's choice under "
            f"--scheduler moasha) learns from the stopped trials")


TIE_BREAKS = ("crowding", "epsnet")  # MO-ASHA's order inside a non-dominated front (._moasha)
DEFAULT_TIE_BREAK = "crowding"  # measured against epsnet in docs/benchmarks.md
