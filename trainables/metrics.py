"""Metrics of the deployed model: accuracies under attack, sparsity and size.

Sparsity and size are always counted on the quantized weights proj(w) of all ensemble members,
never on the float shadow weights.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .attacks import perturb
from .config import AttackConfig
from .contract import CHANNEL_SPARSITY
from .data import as_float
from .device import autocast
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
        CHANNEL_SPARSITY: channel_sparsity(q, "out"),
        "channel_sparsity_in": channel_sparsity(q, "in"),
        "size_bits": float(size),
        "compression": 32.0 * n / size,
    }


def accuracy(
    model: nn.Module, br: BinaryRelax, x: torch.Tensor, y: torch.Tensor,
    attacks: dict[str, AttackConfig | None], batch_size: int = 256,
    precision: tuple[torch.device, str] | None = None,
    memory_format: torch.memory_format = torch.contiguous_format, draws: int = 1,
) -> dict[str, float]:
    """Accuracy of the fully quantized model in eval mode on clean inputs (attack None) and
    under each attack; every image counts, not only the correctly classified ones.

    The model is randomized (noise injection), so a point's score is its expected correctness:
    the share of `draws` forward passes that classify it right (the strong suite's scoring,
    trainables.robust_eval). When the clean inputs are among `attacks`, a point scores under an
    attack at most what it scores clean, so every attack's accuracy is at most the clean one by
    construction (a point the attack missed but the clean pass got wrong is not robust).

    x may be uint8 (scaled per batch, so a split stays uint8 on the device). The scores stay on
    the device and are read once at the end. precision = (device, "bf16"/"fp16") runs the
    forward passes under autocast, as training does."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(len(attacks), device=x.device)
    amp = autocast(*precision) if precision is not None else contextlib.nullcontext()
    ordered = sorted(enumerate(attacks.values()), key=lambda ja: ja[1] is not None)  # clean first
    try:
        with br.quantized(), amp:
            for i in range(0, len(x), batch_size):
                xb = as_float(x[i : i + batch_size]).contiguous(memory_format=memory_format)
                yb = y[i : i + batch_size]
                clean = None
                for j, atk in ordered:
                    xa = xb if atk is None else perturb(model, xb, yb, atk)
                    score = expected_correct(model, xa, yb, draws)
                    if atk is None:
                        clean = score
                    elif clean is not None:
                        score = torch.minimum(score, clean)
                    correct[j] += score.sum()
    finally:
        model.train(was_training)
    totals = correct.tolist()
    return {k: c / max(1, len(x)) for k, c in zip(attacks, totals)}


@torch.no_grad()
def expected_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int,
                     seed: int | None = None) -> torch.Tensor:
    """Per point, the share of `draws` forward passes (each with its own noise draw) that classify
    it right. With `seed` the draws are seeded and the caller's RNG streams are left alone, so
    the same images always get the same score (common random numbers across candidates)."""
    rng = contextlib.nullcontext()
    if seed is not None:
        rng = torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [])
    hits = torch.zeros(len(y), device=x.device)
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        for _ in range(draws):
            hits += (model(x).argmax(1) == y).float()
    return hits / draws


@torch.no_grad()
def recalibrate_bn_(model: nn.Module, br: BinaryRelax, batches: list[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm's running statistics under the projected weights: reset, then
    a cumulative average over `batches` (train-mode forwards, no parameter changes)."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in bns]
    was_training = model.training
    try:
        for m in bns:
            m.reset_running_stats()
        model.train()
        with br.quantized():
            for i, xb in enumerate(batches):
                for m in bns:  # cumulative moving average: every batch counts the same. The same
                    m.momentum = 1.0 / (i + 1)  # factor as momentum=None, which reads the device
                model(xb)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)


@contextlib.contextmanager
def bn_recalibrated(model: nn.Module, br: BinaryRelax, batches: list[torch.Tensor]) -> Iterator[None]:
    """Inside: BN statistics that match the projected weights (`recalibrate_bn_`); afterwards
    the training buffers are back exactly as they were."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in bns]
    try:
        recalibrate_bn_(model, br, batches)
        yield
    finally:
        with torch.no_grad():
            for m, buf in zip(bns, saved):
                for k, v in m.named_buffers(recurse=False):
                    v.copy_(buf[k])
