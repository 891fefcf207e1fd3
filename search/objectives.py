"""The sweep's objectives and sampler names, in a module with no heavy imports: `search.pareto`
checks its flags against them before torch, Ray, Optuna or MLflow are imported, so bad input
fails in well under a second."""

OBJECTIVES = ("clean_acc", "robust_acc", "channel_sparsity")  # all maximised
SAMPLERS = ("nsga2", "tpe", "gp", "random")  # built by search.searcher.make_sampler
