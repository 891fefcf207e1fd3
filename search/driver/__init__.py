"""The sweep's driver: `python -m search.pareto` from command line to ended sweep.

`Flags` is the command line, typed and frozen; `prepare` checks it (and adopts a stored sweep on
`--resume`) into a frozen `Plan` without writing anything; `run` trains it and `resume_logging`
replays its MLflow logging, both ending through `end_sweep`. `plan_resources` sizes the trials to
what the cluster can provide; the Tune callbacks print progress and stop retries of a diverged trial.
"""
from search._lazy import attach

__all__, __getattr__, __dir__ = attach(__name__, {
    "_callbacks": ["NoRetryOnDivergence", "NoTensorBoard", "ProgressCallback"],
    "_cli": ["Flags", "build_parser"],
    "_data": ["data_identity", "data_moved", "place", "same_sweep", "sweep_fingerprint"],
    "_plan": ["Plan", "adopt_stored", "device_refusal", "prepare"],
    "_resources": ["NodeType", "ResourceRequest", "Resources", "capacity", "default_per_trial", "node_types_from_config", "plan_resources"],
    "_run": ["TunerOptions", "build_tuner", "cluster_resources", "end_sweep", "main", "resume_logging", "run"],
})
