"""trainables.robust_eval: the strong suite on tiny digits models (real torchattacks, no mocks).

* every attack of the suite stays in its eps-ball and in [0, 1];
* on a trained (ternary, noisy) model AutoAttack-rand is at least as strong as PGD-20, within noise;
* a deliberately masked model (a non-differentiable input quantizer in front) trips a sanity flag,
  while the same model without it trips none;
* the AutoAttack composition is torchattacks' own `version='rand'` list; the flag rules on numbers.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from trainables.config import AttackConfig, TrainConfig
from trainables.loop import Run
from trainables.robust_eval import (
    FLAGS,
    StrongEvalConfig,
    autoattack_rand,
    sanity_flags,
    strong_eval,
    suite_attacks,
    tolerance,
)

# small but real settings: fewer steps/draws/queries than the defaults, same code paths
QUICK = StrongEvalConfig(aa_steps=5, aa_eot=4, square_queries=300, eot_samples=4, eot_steps=10,
                         pgd_steps=10, seed=3)


@pytest.fixture(scope="module")
def trained():
    """A depth-8, width-8 ternary EnResNet trained 3 epochs on digits (it learns: clean >> 10%)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier than 2 threads on a shared 2-core machine
    try:
        cfg = TrainConfig(dataset="digits", depth=8, width=8, epochs=3, subset_train=500, subset_test=120,
                          batch_size=32, device="cpu", seed=0)
        cfg.quant.bits = 2
        cfg.train_attack = AttackConfig("pgd", 8 / 255, 10 / 255, 2, True)  # PGD-2 training: cheap
        run = Run(cfg)
        for _ in range(cfg.epochs):
            run.train_epoch()
        x, y = run.data.test.to_float(run.device)
        yield run, x, y
    finally:
        torch.set_num_threads(threads)


class InputQuantizer(nn.Module):
    """round(4x)/4 in front of the network: the forward is almost unchanged, the input gradient
    is exactly zero (a textbook obfuscated gradient)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 4) / 4)


@pytest.mark.slow  # end to end (subprocess or training); docs/testing.md
def test_attacks_stay_in_the_ball_and_the_box(trained):
    run, x, y = trained
    x, y = x[:24], y[:24]
    cfg = QUICK
    model = run.model.eval()
    eps_of = {"large_eps": cfg.large_eps, **{f"pgd_eps{f:g}": cfg.eps * f for f in cfg.sanity_eps_factors}}
    with run.br.quantized():
        attacks = suite_attacks(model, cfg)
        assert {"pgd", "eot_pgd", "aa", "square", "large_eps"} <= set(attacks)
        for name, atk in attacks.items():
            xa = atk(x, y)
            eps = eps_of.get(name, cfg.eps)
            assert xa.shape == x.shape
            assert float((xa - x).abs().max()) <= eps + 1e-5, name
            assert float(xa.min()) >= 0 and float(xa.max()) <= 1, name
            assert not xa.requires_grad


@pytest.mark.slow  # end to end (subprocess or training); docs/testing.md
def test_autoattack_rand_is_not_weaker_than_pgd20(trained):
    run, x, y = trained
    cfg = StrongEvalConfig(square=False, sanity=False, eot_pgd=False, seed=5)  # AA at its defaults
    r = strong_eval(run.model, x, y, cfg, br=run.br)
    assert r["clean_acc"] > 0.5  # the model learned (chance is 0.1), so the comparison means something
    assert r["aa_acc"] <= r["pgd_acc"] + tolerance(r["aa_acc"], r["pgd_acc"], len(y), 2.0), r
    assert set(r) >= {"clean_acc", "pgd_acc", "aa_acc", "n_images"}


def test_masked_model_trips_a_flag_and_the_plain_one_does_not(trained):
    run, x, y = trained
    x, y = x[:80], y[:80]
    was = run.model.training
    plain = strong_eval(run.model, x, y, QUICK, br=run.br)
    assert run.model.training == was  # the caller's mode is restored
    assert plain["sanity_flags"] == "", plain
    masked = strong_eval(InputQuantizer(run.model), x, y, QUICK, br=run.br)
    assert masked["sanity_flags"], masked
    assert masked["flag_large_eps"]  # zero gradients: even eps=0.5 PGD cannot break it


def test_autoattack_is_the_library_rand_protocol():
    import torchattacks

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    ours = autoattack_rand(model, StrongEvalConfig())
    lib = torchattacks.AutoAttack(model, norm="Linf", eps=8 / 255, version="rand", n_classes=3)
    a, b = ours.attacks, lib._autoattack.attacks
    assert [type(t) for t in a] == [type(t) for t in b]
    for s, t in zip(a, b):
        for k in ("loss", "eot_iter", "steps", "n_restarts", "eps", "norm"):
            assert getattr(s, k) == getattr(t, k), k


def test_flag_rules_on_numbers():
    cfg = StrongEvalConfig()
    ok = {"clean_acc": .8, "pgd_steps1_acc": .6, "pgd_steps5_acc": .5, "pgd_acc": .45, "pgd_eps0.5_acc": .6,
          "pgd_eps2_acc": .2, "large_eps_acc": 0.0, "eot_pgd_acc": .44, "aa_acc": .42, "square_acc": .5,
          "transfer_acc": .6}
    f = sanity_flags(ok, 1000, cfg)
    assert not any(f[k] for k in FLAGS) and f["sanity_flags"] == ""
    # each symptom trips its own flag, beyond the sampling tolerance only
    cases = {"flag_steps": {"pgd_acc": .70}, "flag_eps": {"pgd_eps2_acc": .70}, "flag_large_eps": {"large_eps_acc": .3},
             "flag_blackbox": {"square_acc": .30}, "flag_transfer": {"transfer_acc": .30}, "flag_eot": {"eot_pgd_acc": .60}}
    for flag, change in cases.items():
        g = sanity_flags({**ok, **change}, 1000, cfg)
        assert g[flag] and flag in g["sanity_flags"], (flag, g)
    # within noise on few images: no flag
    assert not sanity_flags({**ok, "eot_pgd_acc": .50}, 50, cfg)["flag_eot"]
    assert sanity_flags({**ok, "eot_pgd_acc": .50}, 5000, cfg)["flag_eot"]
    # attacks not run give None, not False
    g = sanity_flags({"clean_acc": .8, "pgd_acc": .4}, 100, dataclasses.replace(cfg, sanity=False))
    assert g["flag_transfer"] is None and g["flag_eot"] is None and g["flag_blackbox"] is None


def test_bad_settings_are_refused():
    from trainables.config import ConfigError

    for bad in ({"aa_eot": 0}, {"eps": 2.0}, {"square_queries": -1}):
        with pytest.raises(ConfigError):
            dataclasses.replace(StrongEvalConfig(), **bad).validate()
