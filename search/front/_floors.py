"""A sweep's objectives and bounds: what each objective's direction is, where the hypervolume's
reference point lies, and which trials are infeasible (the rule itself is
trainables.contract.is_feasible). Numpy only."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainables.contract import (
    CHANNEL_SPARSITY,
    CLEAN_ACC,
    DIRECTIONS,
    LATENCY_MS,
    MAXIMIZE,
    MINIMIZE,
    OBJECTIVES,
    ROBUST_ACC,
    SIZE_KIB,
    is_feasible,
)

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
    """The sweep's objectives and the bounds that make a trial useful: a floor under each
    accuracy (clean strictly above chance or --min-clean-acc, robust at least --min-robust-acc),
    sparsity at least 0, and an optional cap on each minimized objective (--max-size-kib,
    --max-latency-ms). A trial outside a bound is infeasible: it never enters the front or the
    hypervolume. `chance` is 1 / number of classes, for the record.

    The front code works on *gains*: every objective with its sign set so that more is better
    (a minimized objective negated), so dominance, crowding and hypervolume need no directions.
    The hypervolume's reference point is the bounds in gain space; a minimized objective without a
    cap has no natural bound, so its reference is inferred from the points measured: 10 % beyond
    the largest value among them (`reference`), as BoTorch infers one from the nadir. Such a
    hypervolume compares fronts of one table, not sweeps; a cap fixes the reference."""

    clean_acc: float
    robust_acc: float = 0.0
    channel_sparsity: float = 0.0
    chance: float | None = None
    max_size_kib: float | None = None
    max_latency_ms: float | None = None
    objectives: tuple[str, ...] = OBJECTIVES

    @classmethod
    def for_sweep(cls, dataset: str, min_clean_acc: float | None = None,
                  min_robust_acc: float | None = None, *, max_size_kib: float | None = None,
                  max_latency_ms: float | None = None,
                  objectives: Sequence[str] = OBJECTIVES) -> Floors:
        n = num_classes(dataset)
        chance = 1.0 / n if n else None
        clean = max(v for v in (chance, min_clean_acc, 0.0) if v is not None)
        return cls(clean, float(min_robust_acc or 0.0), 0.0, chance, max_size_kib, max_latency_ms,
                   tuple(objectives))

    # --- what is bounded ------------------------------------------------------------------------
    def bound(self, name: str) -> float | None:
        """The floor (maximized) or cap (minimized) of a metric; None where there is none."""
        return {CLEAN_ACC: self.clean_acc, ROBUST_ACC: self.robust_acc, CHANNEL_SPARSITY: self.channel_sparsity,
                SIZE_KIB: self.max_size_kib, LATENCY_MS: self.max_latency_ms}.get(name)

    @property
    def bounds(self) -> dict[str, float | None]:
        """Every metric feasibility reads: the objectives (each must be finite), the accuracy
        floors whether or not they are objectives (a model at chance is useless whatever the
        search trades it for), and every cap."""
        names = [*self.objectives, CLEAN_ACC, ROBUST_ACC]
        names += [m for m in (SIZE_KIB, LATENCY_MS) if self.bound(m) is not None]
        return {m: self.bound(m) for m in dict.fromkeys(names)}

    @property
    def directions(self) -> tuple[str, ...]:
        return tuple(DIRECTIONS[m] for m in self.objectives)

    @property
    def signs(self) -> np.ndarray:
        return np.array([1.0 if d == MAXIMIZE else -1.0 for d in self.directions])

    # --- the front's view ------------------------------------------------------------------------
    def point(self, values: Mapping[str, Any]) -> list[float]:
        """The objective vector (raw values, `objectives` order) of a result or table row."""
        return [float(values[m]) if values.get(m) is not None else math.nan for m in self.objectives]

    def gains(self, points: Any) -> np.ndarray:
        """Raw objective vectors (n, k) -> gains (n, k): every column more-is-better."""
        pts = np.asarray(points, dtype=float).reshape(-1, len(self.objectives))
        return pts * self.signs

    @property
    def fixed_reference(self) -> tuple[float | None, ...]:
        """The hypervolume reference in gain space; None for an uncapped minimized objective."""
        return tuple(None if self.bound(m) is None else float(sign * self.bound(m))
                     for m, sign in zip(self.objectives, self.signs))

    def reference(self, gains: Any = ()) -> tuple[float, ...]:
        """The hypervolume reference in gain space, an uncapped minimized objective's inferred
        from `gains` (`infer_reference`)."""
        return infer_reference(self.fixed_reference, gains)

    def feasible(self, values: Mapping[str, Any]) -> bool:
        """A trial's metrics within these bounds (trainables.contract.is_feasible)."""
        return is_feasible(values, self.bounds)

    # --- for the sampler and the scheduler ---------------------------------------------------------
    def constraints(self, values: Mapping[str, Any], only_given: bool = False) -> dict[str, float]:
        """Optuna constraint values (feasible iff every value <= 0): one per floor and cap. The
        clean one carries 1e-9 so that a trial exactly at its floor (e.g. at chance) is
        infeasible, as `feasible` says. Missing or non-finite values give NaN (`only_given`:
        missing ones are left out)."""
        out = {}
        for m, b in self.bounds.items():
            if b is None or (only_given and m not in values):
                continue
            v = values.get(m)
            v = float(v) if v is not None else math.nan
            if DIRECTIONS[m] == MINIMIZE:
                out[f"{m}_cap"] = v - b
            elif m in (CLEAN_ACC, ROBUST_ACC):
                out[f"{m}_floor"] = b - v + (1e-9 if m == CLEAN_ACC else 0.0)
        return out

    def violation(self, values: Mapping[str, float]) -> float:
        """How far a result (name -> value) is outside the bounds of the metrics it holds; > 0 iff
        infeasible. MO-ASHA ranks rung vectors (the objectives only) with it
        (search.optimizer.MOASHAScheduler, `violation=`): a bound on a metric that is no objective
        (the clean floor of a robust_acc,size_kib sweep) counts when the trial ends, not at a rung."""
        cs = self.constraints({m: v for m, v in values.items() if m in self.bounds},
                              only_given=True).values()
        return math.inf if any(math.isnan(c) for c in cs) else sum(max(0.0, c) for c in cs)

    def describe(self) -> str:
        at_chance = self.chance and abs(self.clean_acc - self.chance) < 1e-12
        where = f"chance 1/{round(1 / self.chance)}" if at_chance else "--min-clean-acc"
        words = [f"clean_acc > {self.clean_acc:.4g} ({where})", f"robust_acc >= {self.robust_acc:.4g}"]
        if CHANNEL_SPARSITY in self.objectives:
            words.append(f"channel_sparsity >= {self.channel_sparsity:g}")
        words += [f"{m} <= {self.bound(m):g}" for m in (SIZE_KIB, LATENCY_MS) if self.bound(m) is not None]
        return ", ".join(words)

    def as_params(self) -> dict[str, float]:
        out = {"floor_clean_acc": self.clean_acc, "floor_robust_acc": self.robust_acc,
               "floor_channel_sparsity": self.channel_sparsity}
        out.update({f"cap_{m}": self.bound(m) for m in (SIZE_KIB, LATENCY_MS) if self.bound(m) is not None})
        return out


def infer_reference(fixed: Sequence[float | None], gains: Any = ()) -> tuple[float, ...]:
    """`fixed` with each None replaced by 10 % beyond the worst finite gain in its column of
    `gains` (0 where the column has none): the worst point measured still adds volume."""
    g = np.asarray(gains, dtype=float).reshape(-1, len(fixed))
    ref = []
    for j, r in enumerate(fixed):
        if r is None:
            col = g[:, j][np.isfinite(g[:, j])]
            worst = float(col.min()) if len(col) else 0.0
            r = worst - 0.1 * abs(worst)
        ref.append(float(r))
    return tuple(ref)
