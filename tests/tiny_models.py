"""Tiny residual models for the tests, loaded as factories (`tests/tiny_models.py:conv_net`)."""
import torch
from torch import nn


class ResidualConv(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return x + self.branch(x)


class ConvNet(nn.Module):
    """RGB 8×8 images → 4 classes: stem conv, two residual conv blocks, pooled linear head."""

    input_shape = (3, 8, 8)
    num_classes = 4

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(ResidualConv(4), ResidualConv(4))
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class ResidualMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))

    def forward(self, x):
        return x + self.branch(x)


class Headless(nn.Module):
    """A feature extractor: residual MLP blocks and no classifier head."""

    input_shape = (16,)

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualMLP(16) for _ in range(3)))

    def forward(self, x):
        return self.blocks(x)


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet()


def headless() -> nn.Module:
    torch.manual_seed(0)
    return Headless()
