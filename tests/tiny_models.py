"""Tiny hand-built models for the command-line tests, loaded with `--model tiny_models:NAME`.

`brightness` makes every explanation predictable by hand: its feature map is the
image's brightness, so Grad-CAM of class 0 (``+mean brightness``) is the brightness
itself, min-max normalised: the heat sits on the bright parts, and a uniform image
gives a map without variation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Brightness(nn.Module):
    """conv 1x1 (mean of R, G, B) -> ReLU -> global average pool -> linear (+x, -x)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / 3.0)
            self.conv.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def brightness() -> nn.Module:
    return Brightness()


def broken() -> nn.Module:
    raise ValueError("checkpoint config missing")


class Patterns(nn.Module):
    """Channel k of `pool` fires only on a plus-shaped mark in colour plane k.

    conv 3x3 (no padding: a border would fire): channel k = +1 on the plus of plane k, -1.25 on its corners (sum 0:
    a uniform patch gives 0), bias -0.05 -> ReLU -> max pool 2 -> global average pool -> linear.
    A plus of height v in plane k gives 5 v at its centre, less anywhere else.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 3)
        plus = torch.tensor([[-1.25, 1.0, -1.25], [1.0, 1.0, 1.0], [-1.25, 1.0, -1.25]])
        with torch.no_grad():
            self.conv.weight.zero_()
            for k in range(3):
                self.conv.weight[k, k] = plus
            self.conv.bias.fill_(-0.05)
            self.fc.weight.copy_(torch.eye(3))
            self.fc.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.gap(self.pool(self.relu(self.conv(x)))).flatten(1))


def patterns() -> nn.Module:
    return Patterns()
