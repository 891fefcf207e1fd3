"""The paper's search space (Li, Wang, Xin, arXiv 2008.13305), as data.

Bit width, Binary-Relax schedule, trade-off weights, group-sparsity penalty (0 reachable) and
learning rate. Every parameter is sampled in every trial, so every sampler models all of them
jointly: `alpha` (used by `mix`) and `beta` (used by `trades`) are both always drawn and the
trainable ignores the one its loss does not use; "no group penalty" is the low end of the
penalty's range (`zero_below`: a sampled value below 1e-5 trains with 0, about 1 trial in 7).
Ranges follow ../docs/search-space.md: the BR schedule from the BinaryRelax reference code,
alpha/beta from the trade-off-loss and TRADES papers.

The group penalty is applied as a proximal step (exact zero groups, which is what channel
sparsity counts; the subgradient form leaves groups hovering near zero). Its range is wide on
purpose: the shrinkage per epoch is lr * lambda_g * steps, so ~1e-5..1e-3 matters over a
200-epoch CIFAR-10 run and ~0.3..3 over a 3-epoch digits run. Narrow it with your own space (or
--set) once you know the budget.
"""

SPACE = {
    "params": {
        "bits": {"type": "categorical", "choices": [1, 2, 4]},
        "lambda0": {"type": "float", "low": 0.5, "high": 2.0, "log": True},
        # where the BR continuation ends (lambda grows per step from lambda0 to it at phase II):
        # >= 50 keeps the relaxed weights >= 98 % projection when phase II starts, at 3 epochs
        # as at 200; the BinaryRelax/EnResNet-BR reference runs end near 350
        "lambda_final": {"type": "float", "low": 50.0, "high": 1000.0, "log": True},
        "phase2_start": {"type": "float", "low": 0.6, "high": 0.8},
        "loss": {"type": "categorical", "choices": ["mix", "trades"]},
        "alpha": {"type": "float", "low": 0.0, "high": 0.5},  # mix only (trades ignores it)
        "beta": {"type": "float", "low": 1.0, "high": 10.0, "log": True},  # trades only (mix ignores it)
        "group_lasso": {"type": "float", "low": 1e-6, "high": 3.0, "log": True, "zero_below": 1e-5},
        "lr": {"type": "float", "low": 0.02, "high": 0.2, "log": True},
    },
    # values every trial gets unless --set overrides them
    "fixed": {"group_mode": "prox"},
}
