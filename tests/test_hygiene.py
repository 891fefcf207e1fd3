"""Split hygiene (train / validation / test are disjoint and together are the data) and group
sparsity that really produces dead channels, in both penalty modes."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from trainables.config import TrainConfig
from trainables.data import Split, load_data
from trainables.loop import Run


def _rows(split) -> Counter:
    """The split as a multiset of (image bytes, label): duplicates in the raw data count twice."""
    x = split.x.contiguous()
    return Counter((x[i].numpy().tobytes(), int(split.y[i])) for i in range(len(split)))


def _all_digits() -> Counter:
    """The whole data set, read independently of trainables.data."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    return _rows(Split(x, torch.tensor(d.target, dtype=torch.long)))


@pytest.mark.parametrize("subset_train, subset_test, val_fraction", [(None, None, 0.1), (300, 100, 0.2), (50, 10, 0.5)])
def test_splits_are_disjoint_and_cover_the_data(subset_train, subset_test, val_fraction):
    """As multisets (the data holds a few identical images), train + val + test never uses an
    image more often than the data set holds it: no image is in two splits, unless the data set
    itself holds it twice. Without subsets the three splits are the whole data set."""
    data = load_data(TrainConfig(dataset="digits", subset_train=subset_train, subset_test=subset_test,
                                 val_fraction=val_fraction))
    train, val, test = _rows(data.train), _rows(data.val), _rows(data.test)
    everything = _all_digits()
    assert not (train + val + test) - everything
    if subset_train is None and subset_test is None:
        assert train + val + test == everything
    n_pool = subset_train or sum(everything.values()) - sum(everything.values()) // 5
    assert len(data.val) == round(val_fraction * n_pool) and len(data.train) == n_pool - len(data.val)
    assert len(data.test) == (subset_test or sum(everything.values()) // 5)


def test_splits_do_not_depend_on_the_trial_seed():
    """Every trial of a sweep selects on the same validation images, whatever its seed."""
    a = load_data(TrainConfig(dataset="digits", subset_train=300, subset_test=100, seed=0))
    b = load_data(TrainConfig(dataset="digits", subset_train=300, subset_test=100, seed=7))
    for s in ("train", "val", "test"):
        assert torch.equal(getattr(a, s).x, getattr(b, s).x) and torch.equal(getattr(a, s).y, getattr(b, s).y)


@pytest.mark.parametrize("mode, strength", [("prox", 5.0), ("penalty", 10.0)])
def test_a_large_group_penalty_kills_channels(mode, strength):
    """Two epochs with a strong group penalty leave dead filters in the deployed (ternary)
    weights; without it none die. A prox step applied to a copy of the weights, or a penalty
    that never reaches the loss, leaves channel_sparsity at 0 and fails."""

    def sparsity(group_lasso: float) -> dict:
        cfg = TrainConfig(dataset="digits", subset_train=300, subset_test=50, depth=8, width=8, epochs=2,
                          batch_size=32, group_lasso=group_lasso, group_mode=mode, seed=0)
        cfg.quant.bits = 2
        cfg.train_attack.steps = 1
        run = Run(cfg)
        for _ in range(cfg.epochs):
            run.train_epoch()
        return run.structure()

    assert sparsity(0.0)["channel_sparsity"] == 0.0
    strong = sparsity(strength)
    # measured: prox 5.0 -> 0.95, penalty 10.0 -> 0.10 (prox 1.0 and penalty 0.5 kill one filter)
    assert strong["channel_sparsity"] > 0.05, strong
