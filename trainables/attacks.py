"""L-infinity attacks on inputs in [0, 1]: FGSM, PGD/IFGSM, CW-Linf (margin loss under PGD) and
the TRADES KL attack.

The attacks do not change the model's mode: training attacks run in whatever mode the loss
chooses, and `evaluate` puts the model in eval mode first. EnResNet noise stays on either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AttackConfig


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin: max_{j != y} Z_j - Z_y, summed (ascending it pushes past the boundary)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return (other.max(1).values - true).sum()


def _input_grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x)
    return g


def perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig) -> torch.Tensor:
    """Return adversarial inputs in the eps-ball around x and inside [0, 1]."""
    if cfg.eps == 0:
        return x.detach()
    if cfg.kind == "fgsm":
        return pgd(model, x, y, cfg.eps, cfg.eps, 1, random_start=False, loss="ce")
    if cfg.kind == "pgd":
        return pgd(model, x, y, cfg.eps, cfg.step, cfg.steps, cfg.random_start, loss="ce")
    if cfg.kind == "cw":
        return pgd(model, x, y, cfg.eps, cfg.step, cfg.steps, cfg.random_start, loss="cw")
    if cfg.kind == "trades":
        return trades_kl(model, x, cfg.eps, cfg.step, cfg.steps)
    raise ValueError(f"unknown attack {cfg.kind!r}")


def pgd(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int,
    random_start: bool = True, loss: str = "ce",
) -> torch.Tensor:
    """Sign-gradient ascent, each step projected onto the L-inf ball and clamped to [0, 1]."""
    x = x.detach()
    if random_start:
        x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0, 1)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        obj = F.cross_entropy(logits, y, reduction="sum") if loss == "ce" else margin_loss(logits, y)
        g = _input_grad(obj, x_adv)
        with torch.no_grad():
            x_adv = x_adv + step * g.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)
    return x_adv.detach()


def trades_kl(model: nn.Module, x: torch.Tensor, eps: float, step: float, steps: int) -> torch.Tensor:
    """Maximise KL(p(x) || p(x')) from x + 0.001*N(0, 1), as in the TRADES reference."""
    x = x.detach()
    with torch.no_grad():
        p_nat = F.softmax(model(x), dim=1)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp_(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_nat, reduction="sum")
        g = _input_grad(kl, x_adv)
        with torch.no_grad():
            x_adv = x_adv + step * g.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)
    return x_adv.detach()
