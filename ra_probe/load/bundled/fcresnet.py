"""The bundled demo network: a fully-connected ResNet."""
from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """`h + F(h)` with `F = BN(Linear(ReLU(BN(Linear(h)))))`; `F(h)` alone when `skip` is off."""

    def __init__(self, width: int, skip: bool = True):
        super().__init__()
        self.skip = skip
        self.branch = nn.Sequential(
            nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Linear(width, width), nn.BatchNorm1d(width),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.skip:
            return h + self.branch(h)
        return self.branch(h)


class FCResNet(nn.Module):
    """Linear stem, `depth` residual blocks of equal width, linear head; no activation after the add."""

    def __init__(self, in_features: int = 64, width: int = 128, depth: int = 8,
                 num_classes: int = 10, skip: bool = True):
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.Sequential(*(Block(width, skip) for _ in range(depth)))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))
