"""The sweep's objectives, sampler names and floors, in a module with no heavy imports:
`search.pareto` checks its flags against them before torch, Ray, Optuna or MLflow are imported,
so bad input fails in well under a second."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

OBJECTIVES = ("clean_acc", "robust_acc", "channel_sparsity")  # all maximised, on the validation split
SAMPLERS = ("auto", "tpe", "nsga2", "gp", "random")  # built by search.samplers.make_sampler
# chosen by measurement (docs/benchmarks.md, "Search efficiency"; docs/search.md, "Why auto"):
# with FIFO, GP found the most hypervolume at small budgets, but its per-ask cost in the driver
# loop grows too large for big sweeps, so `auto` is GP below GP_TRIALS trials and TPE from there.
# Under MO-ASHA `auto` is TPE at any size: GP learns from COMPLETE trials only and MO-ASHA completes
# about 1 trial in 4, so GP stayed on random start-up draws for most of a sweep (9 to 26 of 19 to
# 26 trials), where TPE learns from the stopped (PRUNED) trials; their hypervolumes tie.
DEFAULT_SAMPLER = "auto"  # with either scheduler
GP_TRIALS = 100
# samplers that learn from COMPLETE trials only: under MO-ASHA, mostly random draws
COMPLETE_ONLY = {"gp": "waits for its start-up trials to complete and ignores stopped ones",
                 "nsga2": "builds its generations from completed trials only"}


def resolve_sampler(name: str, trials: int, scheduler: str) -> str:
    """The sampler a sweep of `trials` trials under `scheduler` runs: `auto` becomes `tpe` under
    MO-ASHA, else `gp` below GP_TRIALS trials and `tpe` from there; other names stay."""
    if name != "auto":
        return name
    if scheduler == "moasha":
        return "tpe"
    return "gp" if trials < GP_TRIALS else "tpe"


def scheduler_gap(sampler: str, scheduler: str) -> str | None:
    """Why `sampler` (resolved) learns little under `scheduler` (one line), or None."""
    if scheduler != "moasha" or sampler not in COMPLETE_ONLY:
        return None
    return (f"warning: --sampler {sampler} {COMPLETE_ONLY[sampler]}, and MO-ASHA stops most trials, so "
            f"most of its proposals will be random draws; --sampler tpe (auto's choice under "
            f"--scheduler moasha) learns from the stopped trials")


TIE_BREAKS = ("crowding", "epsnet")  # MO-ASHA's order inside a non-dominated front (search.moasha)
DEFAULT_TIE_BREAK = "crowding"  # measured better than epsnet here (docs/benchmarks.md)

# datasets with a known class count; folder:PATH counts its train/<class>/ folders
NUM_CLASSES = {"digits": 10, "cifar10": 10, "mnist": 10, "fashion-mnist": 10, "svhn": 10}


def num_classes(dataset: str) -> int | None:
    """Class count of a dataset name, without loading it; None if it cannot be told."""
    if dataset.startswith("folder:"):
        train = Path(os.path.expanduser(dataset[len("folder:"):])) / "train"
        try:
            n = sum(1 for d in train.iterdir() if d.is_dir())
        except OSError:
            return None
        return n or None
    return NUM_CLASSES.get(dataset)


@dataclass(frozen=True)
class Floors:
    """The useful floor of each objective: the hypervolume reference point, and the line below
    which a trial is infeasible (clean accuracy must be strictly above its floor, robust
    accuracy at least its floor). `chance` is 1 / number of classes, for the record."""

    clean_acc: float
    robust_acc: float = 0.0
    channel_sparsity: float = 0.0
    chance: float | None = None

    @classmethod
    def for_sweep(cls, dataset: str, min_clean_acc: float | None = None,
                  min_robust_acc: float | None = None) -> Floors:
        n = num_classes(dataset)
        chance = 1.0 / n if n else None
        clean = max(v for v in (chance, min_clean_acc, 0.0) if v is not None)
        return cls(clean, float(min_robust_acc or 0.0), 0.0, chance)

    @property
    def reference(self) -> tuple[float, float, float]:
        return (self.clean_acc, self.robust_acc, self.channel_sparsity)

    def constraints(self, clean_acc: float, robust_acc: float) -> dict[str, float]:
        """Optuna constraint values (feasible iff every value <= 0). The clean one carries 1e-9
        so that a trial exactly at its floor (e.g. at chance) is infeasible, as `feasible` says."""
        return {"clean_acc_floor": self.clean_acc - clean_acc + 1e-9,
                "robust_acc_floor": self.robust_acc - robust_acc}

    def violation(self, values: Mapping[str, float]) -> float:
        """How far an objective vector (name -> value) is below the floors; > 0 iff infeasible.
        MO-ASHA ranks rung vectors with it (`search.moasha`, `violation=`)."""
        cs = self.constraints(float(values["clean_acc"]), float(values["robust_acc"])).values()
        return math.inf if any(math.isnan(c) for c in cs) else sum(max(0.0, c) for c in cs)

    def feasible(self, clean_acc: float, robust_acc: float) -> bool:
        return clean_acc > self.clean_acc and robust_acc >= self.robust_acc

    def describe(self) -> str:
        at_chance = self.chance and abs(self.clean_acc - self.chance) < 1e-12
        where = f"chance 1/{round(1 / self.chance)}" if at_chance else "--min-clean-acc"
        return (f"clean_acc > {self.clean_acc:.4g} ({where}), robust_acc >= {self.robust_acc:.4g}, "
                f"channel_sparsity >= {self.channel_sparsity:g}")

    def as_params(self) -> dict[str, float]:
        return {"floor_clean_acc": self.clean_acc, "floor_robust_acc": self.robust_acc,
                "floor_channel_sparsity": self.channel_sparsity}
