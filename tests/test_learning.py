"""Every loss x bit width x training attack trains what its configuration says.

The gradient-flow test runs one real training step (`Run.train_step`: attack, trade-off loss,
backward, SGD step) for every combination and checks that every float weight behind a quantized
layer, every BatchNorm parameter and the classifier got a finite, non-zero gradient. Before the
fix, `trades` (and any loss with `--attack trades`) at 1-8 bits gave the quantized convolutions
exactly zero gradient. The learning test checks that the model also learns at 2 bits.
"""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch import nn

from trainables.config import ATTACKS, LOSSES, AttackConfig, QuantConfig, TrainConfig
from trainables.data import Split, load_data
from trainables.loop import Run, train

BITS = (1, 2, 4, 8, 32)


@pytest.fixture(scope="module")
def digits():
    return load_data(TrainConfig(dataset="digits"))


def _named_grads(run: Run) -> dict[str, torch.Tensor | None]:
    """Gradients of the float weights behind quantized layers, BN and classifier parameters."""
    out: dict[str, torch.Tensor | None] = {}
    for (name, _), w in zip(run.br.modules, run.br.float_weights()):
        out[f"quantized {name}"] = w.grad
    for name, m in run.model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            out[f"bn {name}.weight"] = m.weight.grad
            out[f"bn {name}.bias"] = m.bias.grad
        elif isinstance(m, nn.Linear):
            out[f"fc {name}.weight"] = m.weight.grad
            out[f"fc {name}.bias"] = m.bias.grad
    return out


@pytest.mark.parametrize("loss, bits, attack", list(itertools.product(LOSSES, BITS, ATTACKS)))
def test_one_step_gives_every_trained_parameter_a_gradient(digits, loss, bits, attack):
    cfg = TrainConfig(dataset="digits", depth=8, width=4, epochs=4, loss=loss, alpha=0.3,
                      quant=QuantConfig(bits=bits),
                      train_attack=AttackConfig(attack, 0.1, 0.05, 2, True))
    run = Run(cfg, digits)
    run.br.start_epoch(0, cfg.epochs)  # phase I (relaxed)
    run.model.train()
    x, y = digits.train.take(torch.arange(16)).to_float(run.device)
    run.train_step(x, y)
    grads = _named_grads(run)
    assert sum(k.startswith("quantized") for k in grads) == 7  # stem + 6 convs
    assert sum(k.startswith("fc") for k in grads) == 2
    for name, g in grads.items():
        assert g is not None, f"{name}: no gradient"
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient"
        assert g.abs().sum() > 0, f"{name}: zero gradient"
    if attack != "pgd":
        return
    # and in phase II (hard-quantized)
    run.br.start_epoch(cfg.epochs - 1, cfg.epochs)
    run.train_step(x, y)
    for name, w in zip(run.br.modules, run.br.float_weights()):
        assert w.grad is not None and w.grad.abs().sum() > 0, f"phase II {name}: zero gradient"


def _final_clean(loss: str, bits: int, data, epochs: int = 3) -> float:
    cfg = TrainConfig(dataset="digits", depth=8, width=8, epochs=epochs, loss=loss,
                      batch_size=64, quant=QuantConfig(bits=bits), cw=False)
    cfg.train_attack.steps = 3
    cfg.train_attack.step = 4 / 255
    cfg.eval_attack.steps = 2
    cfg.proxy_attack_steps = 1
    cfg.proxy_eval_size = 32
    return train(cfg, data=data)["clean_acc"]


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_learns_at_two_bits(digits, loss):
    """2-bit training reaches most of the float run's clean accuracy (validation split)."""
    float_acc = _final_clean(loss, 32, digits)
    ternary_acc = _final_clean(loss, 2, digits)
    assert float_acc > 0.7, f"{loss} float run did not learn: {float_acc}"
    assert ternary_acc >= 0.85 * float_acc, f"{loss}: 2-bit {ternary_acc} vs float {float_acc}"


# ------------------------------------------------------------------------------------------
# objectives on validation, test once


def _tiny_cfg(**kw) -> TrainConfig:
    cfg = TrainConfig(dataset="digits", depth=8, width=4, epochs=2, batch_size=64,
                      subset_train=300, subset_test=120, cw=False, proxy_eval_size=32,
                      proxy_attack_steps=1, quant=QuantConfig(bits=2, phase2_start=0.5), **kw)
    cfg.train_attack.steps = 1
    cfg.eval_attack.steps = 2
    return cfg


class _Keep:
    def __init__(self):
        self.reports = []

    def load_checkpoint(self):
        return None

    def report(self, metrics, checkpoint, final):
        self.reports.append(dict(metrics))


def test_objectives_do_not_see_the_test_labels():
    """Scrambling the test labels changes the test_ metrics and nothing a search selects on."""
    cfg = _tiny_cfg()
    data = load_data(cfg)
    g = torch.Generator().manual_seed(1)
    scrambled = dataclasses.replace(
        data, test=Split(data.test.x, data.test.y[torch.randperm(len(data.test), generator=g)]))
    runs = []
    for d in (data, scrambled):
        hooks = _Keep()
        train(cfg, hooks, data=d)
        runs.append(hooks.reports)
    a, b = runs
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):  # every report, per epoch and final
        for k in ("clean_acc", "robust_acc", "channel_sparsity", "fgsm_acc", "weight_sparsity"):
            if k in ra:
                assert ra[k] == rb[k], k
    for k in ("test_clean_acc", "test_robust_acc", "test_fgsm_acc"):
        assert k in a[-1] and k not in a[0]  # evaluated once, at the end
    assert a[-1]["test_clean_acc"] != b[-1]["test_clean_acc"]
