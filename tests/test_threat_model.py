"""The threat model per dataset (trainables.config.dataset_eps): an unset attack eps takes the
dataset's, an unset step eps / 4, at every entry point that validates a TrainConfig; set values
are kept."""
from __future__ import annotations

import pytest

from trainables.config import DATASET_EPS, FOLDER_EPS, TrainConfig, dataset_eps


@pytest.mark.parametrize("dataset", ["digits", "mnist", "fashion-mnist", "cifar10", "svhn"])
def test_unset_eps_and_step_come_from_the_dataset(dataset):
    cfg = TrainConfig(dataset=dataset)
    assert cfg.train_attack.eps is None and cfg.eval_attack.eps is None
    cfg.validate()
    for atk in (cfg.train_attack, cfg.eval_attack):
        assert atk.eps == DATASET_EPS[dataset] == dataset_eps(dataset)
        assert atk.step == atk.eps / 4


def test_the_literature_budgets_and_the_digits_grid():
    assert dataset_eps("cifar10") == dataset_eps("svhn") == 8 / 255
    assert dataset_eps("mnist") == 0.3 and 0.1 <= dataset_eps("fashion-mnist") <= 0.3
    assert dataset_eps("folder:/x") == FOLDER_EPS == 8 / 255
    # digits has 17 grey levels, 1/16 apart: its budget is at least one level
    assert dataset_eps("digits") >= 1 / 16 > 8 / 255


def test_set_values_are_kept_and_survive_the_flat_round_trip():
    cfg = TrainConfig.from_flat({"dataset": "digits", "eps": 0.2, "eval_eps": 0.05})
    cfg.validate()
    assert (cfg.train_attack.eps, cfg.train_attack.step) == (0.2, 0.05)
    assert (cfg.eval_attack.eps, cfg.eval_attack.step) == (0.05, 0.0125)
    again = TrainConfig.from_flat(cfg.to_flat())
    assert again.eval_attack.eps == 0.05 and again.eval_attack.step == 0.0125
    # an unset config round-trips unset and resolves the same way
    raw = TrainConfig.from_flat(TrainConfig(dataset="cifar10").to_flat())
    raw.validate()
    assert raw.eval_attack.eps == 8 / 255
