"""Metrics of the deployed model: accuracies under attack, sparsity and size.

Sparsity and size are always counted on the quantized weights proj(w) of all ensemble members,
never on the float shadow weights.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .attacks import perturb
from .config import AttackConfig
from .quant import BinaryRelax, model_bits


def weight_sparsity(weights: Iterable[torch.Tensor]) -> float:
    zeros = total = 0
    for w in weights:
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


def channel_sparsity(weights: Iterable[torch.Tensor], axis: str = "out") -> float:
    """Count-weighted fraction of all-zero output filters (axis='out') or input channels."""
    dead = total = 0
    for w in weights:
        if w.dim() < 2:
            continue
        w2 = w.transpose(0, 1) if axis == "in" else w
        nz = w2.reshape(w2.shape[0], -1).ne(0).any(dim=1)
        dead += int((~nz).sum())
        total += nz.numel()
    return dead / total if total else 0.0


def structure_metrics(model: nn.Module, br: BinaryRelax) -> dict[str, float]:
    q = br.quantized_weights()
    size, n = model_bits(model, br)
    return {
        "weight_sparsity": weight_sparsity(q),
        "channel_sparsity": channel_sparsity(q, "out"),
        "channel_sparsity_in": channel_sparsity(q, "in"),
        "size_bits": float(size),
        "compression": 32.0 * n / size,
    }


def accuracy(
    model: nn.Module, br: BinaryRelax, x: torch.Tensor, y: torch.Tensor,
    attacks: dict[str, AttackConfig | None], batch_size: int = 256,
) -> dict[str, float]:
    """Accuracy of the fully quantized model in eval mode on clean inputs (attack None) and
    under each attack; every image counts, not only the correctly classified ones."""
    was_training = model.training
    model.eval()
    correct = {k: 0 for k in attacks}
    try:
        with br.quantized():
            for i in range(0, len(x), batch_size):
                xb, yb = x[i : i + batch_size], y[i : i + batch_size]
                for name, atk in attacks.items():
                    xa = xb if atk is None else perturb(model, xb, yb, atk)
                    with torch.no_grad():
                        correct[name] += int((model(xa).argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return {k: c / max(1, len(x)) for k, c in correct.items()}
