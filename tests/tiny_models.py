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
