"""Pareto fronts of maximised objectives: dominance, hypervolume, crowding, the incremental front
the driver keeps while a sweep runs, and the sweep's floors (what counts as feasible)."""
from search._lazy import attach

__all__, __getattr__, __dir__ = attach(__name__, {
    "_dominance": ["DEFAULT_REFERENCE", "crowding_distance", "feasible_mask", "finite_order", "hypervolume",
                   "non_dominated_mask", "non_dominated_sort"],
    "_floors": ["Floors", "infer_reference", "num_classes"],
    "_incremental": ["IncrementalFront"],
})
