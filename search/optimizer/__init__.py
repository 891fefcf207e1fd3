"""What proposes and stops trials: the search space, Optuna's samplers behind Ray Tune, and MO-ASHA.

`Space` is a search space as data (`load_space`, `parse_sets`); `make_sampler` builds the Optuna
sampler `resolve_sampler` picks for `auto`; `ParetoSearch` is Ray Tune's searcher over an Optuna
study that tells stopped and failed trials as such; `MOASHAScheduler` stops trials at rungs by
`RungRule`, the multi-objective keep rule.
"""
from search._lazy import attach

__all__, __getattr__, __dir__ = attach(__name__, {
    "_moasha": ["MOASHAScheduler", "MOASHAStateCallback"],
    "_policy": ["DEFAULT_SAMPLER", "DEFAULT_TIE_BREAK", "GP_TRIALS", "SAMPLERS", "SCHEDULERS", "TIE_BREAKS",
                "resolve_sampler", "sampler_label", "scheduler_gap"],
    "_ranking": ["RungRule", "decide", "keeps", "rung_position"],
    "_samplers": ["make_sampler"],
    "_searcher": ["AHEAD_REASON", "AHEAD_STATS", "RAY_TRIAL_ID", "ParetoSearch", "reconcile_with_snapshot", "settle_sampled_ahead"],
    "_space": ["Space", "builtin_spaces", "joint_modelling_gap", "load_space", "parse_sets"],
})
