"""The paper's space with ranges for the quick start's budget: the embedded digits data, a few
epochs per trial (what `python -m search.pareto` with no arguments runs; `--space paper` gives
the full ranges).

Only the ranges that depend on the budget differ from spaces/paper.py. The group penalty's
shrinkage per epoch is lr * lambda_g * steps, and a digits epoch has about 25 steps, so only
penalties of about 0.05 and up zero whole channels within 3 epochs: the range is log-uniform in
[0.01, 3], and a sampled value below 0.03 trains without the penalty (about 1 trial in 5), so
dense models stay in the search. Every parameter is sampled in every trial, as in the paper space.
"""
from spaces.paper import SPACE as PAPER

SPACE = {
    "params": {
        **PAPER["params"],
        "group_lasso": {"type": "float", "low": 0.01, "high": 3.0, "log": True, "zero_below": 0.03},
    },
    "fixed": dict(PAPER["fixed"]),
}
