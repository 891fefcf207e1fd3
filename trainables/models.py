"""Pre-activation ResNet for CIFAR-style inputs, EnResNet noise injection and logit ensembles.

Follows BaoWangMath/EnResNet ResNet20: the noise is on in train *and* eval mode, so inference and
the attacks are stochastic; a coefficient of 0 turns it off.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class NoiseInjection(nn.Module):
    """out + a * std(out) * xi, with one scalar std over the whole batch tensor (gradients flow)."""

    def __init__(self, coef: float) -> None:
        super().__init__()
        self.coef = coef

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.coef == 0:
            return x
        return x + self.coef * x.std() * torch.randn_like(x)


@contextlib.contextmanager
def noise(model: nn.Module, on: bool) -> Iterator[nn.Module]:
    """Inside, the EnResNet test-time noise is as trained (on) or switched off."""
    mods = [m for m in model.modules() if isinstance(m, NoiseInjection)]
    saved = [m.coef for m in mods]
    try:
        if not on:
            for m in mods:
                m.coef = 0.0
        yield model
    finally:
        for m, c in zip(mods, saved):
            m.coef = c


class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, noise: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        # 1x1 strided conv on the pre-activation, no BN, as in the reference
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None
        )
        self.noise = NoiseInjection(noise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        short = self.shortcut(a) if self.shortcut is not None else x
        r = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return self.noise(r + short)


class PreActResNet(nn.Module):
    """depth = 6n + 2; three stages of n blocks at widths w, 2w, 4w."""

    def __init__(
        self, depth: int = 20, width: int = 16, in_channels: int = 3, num_classes: int = 10,
        noise: float = 0.1,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth={depth}; accepted: 6n+2 with n >= 1")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        c = width
        for stage, mult in enumerate((1, 2, 4)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(PreActBlock(c, width * mult, stride, noise))
                c = width * mult
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / k))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.conv1(x))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class Ensemble(nn.Module):
    """Averages the logits (not probabilities) of independently initialised members."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.members[0](x)
        for m in self.members[1:]:
            out = out + m(x)
        return out / len(self.members)


def build_model(
    depth: int, width: int, in_channels: int, num_classes: int, ensemble: int, noise: float
) -> Ensemble:
    """An En_n ResNet; n = 1 is a single noisy ResNet (still wrapped, so code sees one shape)."""
    return Ensemble(
        [PreActResNet(depth, width, in_channels, num_classes, noise) for _ in range(ensemble)]
    )
