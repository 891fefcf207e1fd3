"""The useful floor of a sweep: the hypervolume reference point and the line below which a trial
is infeasible (the rule itself is trainables.contract.is_feasible). No heavy imports."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from trainables.contract import OBJECTIVES, is_feasible

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
        return {f"{OBJECTIVES[0]}_floor": self.clean_acc - clean_acc + 1e-9,
                f"{OBJECTIVES[1]}_floor": self.robust_acc - robust_acc}

    def violation(self, values: Mapping[str, float]) -> float:
        """How far an objective vector (name -> value) is below the floors; > 0 iff infeasible.
        MO-ASHA ranks rung vectors with it (search.optimizer.MOASHAScheduler, `violation=`)."""
        cs = self.constraints(float(values[OBJECTIVES[0]]), float(values[OBJECTIVES[1]])).values()
        return math.inf if any(math.isnan(c) for c in cs) else sum(max(0.0, c) for c in cs)

    def feasible(self, point: Sequence[float]) -> bool:
        """An objective vector (OBJECTIVES order) above these floors (trainables.contract.is_feasible)."""
        return is_feasible(point, self.reference)

    def describe(self) -> str:
        at_chance = self.chance and abs(self.clean_acc - self.chance) < 1e-12
        where = f"chance 1/{round(1 / self.chance)}" if at_chance else "--min-clean-acc"
        return (f"clean_acc > {self.clean_acc:.4g} ({where}), robust_acc >= {self.robust_acc:.4g}, "
                f"channel_sparsity >= {self.channel_sparsity:g}")

    def as_params(self) -> dict[str, float]:
        return {"floor_clean_acc": self.clean_acc, "floor_robust_acc": self.robust_acc,
                "floor_channel_sparsity": self.channel_sparsity}
