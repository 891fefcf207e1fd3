"""The paper's space with ranges for the quick start's budget: the embedded digits data, 3 epochs
per trial (what `python -m search.pareto` with no arguments runs; `--space paper` gives the full
ranges).

Only what depends on the budget differs from spaces/paper.py. The group penalty is a proximal
step that shrinks each filter's norm by lr * lambda_g per optimizer step, so it zeroes whole
channels only when lr * lambda_g * steps reaches the filters' norms (about 1 to 2 here). Digits
has 1,150 training images, so batches of 32 (36 steps per epoch, 108 in 3 epochs; pinned here)
and lambda_g log-uniform in [0.02, 2] span dense models, partly sparse ones and models that
collapse to chance (infeasible: below the floor). A sampled value below 0.05 trains without the
penalty (about 1 trial in 5). Every parameter is sampled in every trial, as in the paper space.
"""
from spaces.paper import SPACE as PAPER

SPACE = {
    "params": {
        **PAPER["params"],
        "group_lasso": {"type": "float", "low": 0.02, "high": 2.0, "log": True, "zero_below": 0.05},
    },
    "fixed": {**PAPER["fixed"], "batch_size": 32},
}
