"""The trade-off loss (madry / mix / trades) and the group-sparsity (L2,1) penalty.

The penalty acts on the float shadow weights w, never on the relaxed or quantized view, so its
gradient reaches w directly while the data loss reaches w straight-through.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import perturb
from .config import AttackConfig

GROUP_EPS = 1e-8


def tradeoff_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, attack: AttackConfig,
    alpha: float = 0.0, beta: float = 6.0, attack_bn: str = "auto",
) -> torch.Tensor:
    """madry: CE(f(x_adv)); mix: (1-alpha) CE(f(x_adv)) + alpha CE(f(x));
    trades: CE(f(x)) + beta KL(p(x) || p(x_adv)) with the KL attack.

    attack_bn: BatchNorm mode while the training attack runs. "train" uses batch statistics, as
    the EnResNet training script does; "eval" uses the running statistics, as TRADES and most
    later work do (the attack then neither updates them with its iterates nor couples the
    images of a batch); "auto" (default) is each loss's reference: train for madry/mix, eval
    for trades. The loss itself always runs in the caller's mode."""
    if attack_bn == "auto":
        attack_bn = "eval" if kind == "trades" else "train"
    if kind == "madry":
        x_adv = _attack(model, x, y, attack, attack_bn)
        return F.cross_entropy(model(x_adv), y)
    if kind == "mix":
        x_adv = _attack(model, x, y, attack, attack_bn)
        loss = (1 - alpha) * F.cross_entropy(model(x_adv), y)
        if alpha > 0:
            loss = loss + alpha * F.cross_entropy(model(x), y)
        return loss
    if kind == "trades":
        kl_attack = AttackConfig("trades", attack.eps, attack.step, attack.steps)
        x_adv = _attack(model, x, y, kl_attack, attack_bn)
        logits = model(x)
        kl = F.kl_div(
            F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean"
        )
        return F.cross_entropy(logits, y) + beta * kl
    raise ValueError(f"unknown loss {kind!r}")


def _attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackConfig,
            bn_mode: str) -> torch.Tensor:
    was_training = model.training
    model.train(bn_mode == "train")
    try:
        return perturb(model, x, y, attack)
    finally:
        model.train(was_training)


def _group_dims(axis: str) -> tuple[int, ...]:
    # out: groups are filters W[o, :, :, :]; in: groups are input channels W[:, c, :, :]
    return (1, 2, 3) if axis == "out" else (0, 2, 3)


def group_norms(w: torch.Tensor, axis: str = "out") -> torch.Tensor:
    return torch.sqrt((w * w).sum(dim=_group_dims(axis)) + GROUP_EPS)


def group_penalty(weights: list[torch.Tensor], axis: str = "out") -> torch.Tensor:
    """R(W) = sum over 4-D layers and groups of sqrt(||W_g||^2 + 1e-8)."""
    total = weights[0].new_zeros(())
    for w in weights:
        if w.dim() == 4:
            total = total + group_norms(w, axis).sum()
    return total


@torch.no_grad()
def group_prox_(weights: list[torch.Tensor], step: float, axis: str = "out") -> None:
    """Proximal step of step*||.||_2 per group: W_g <- max(0, 1 - step / ||W_g||) W_g.
    Groups shrink to exact zeros, which is what channel sparsity counts."""
    for w in weights:
        if w.dim() != 4:
            continue
        norms = torch.sqrt((w * w).sum(dim=_group_dims(axis), keepdim=True))
        w.mul_(torch.clamp(1 - step / norms.clamp_min(1e-12), min=0))
