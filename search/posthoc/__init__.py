"""Tools for a finished sweep: the strong evaluation of its front (`python -m search.evaluate`),
the export of one trial's model (`python -m search.export`), and the pick of one front trial by a
rule, exported, re-checked and registered (`python -m search.pick`)."""
from search._lazy import attach

__all__, __getattr__, __dir__ = attach(__name__, {
    "_evaluate": ["evaluate_main"],
    "_export": ["export_main", "write_files"],
    "_pick": ["onnx_recheck", "pick_main"],
    "_rule": ["Condition", "Rule", "RuleError", "accuracy_intervals", "binomial_draws", "choose", "indistinguishable",
              "knee_index", "parse_rule"],
})
