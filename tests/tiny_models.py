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


# --- outputs and heads as users' models return them (tests/test_own_models.py) ---------------


class _Features(nn.Module):
    """conv 1x1 (identity on R, G, B, or their mean) -> ReLU -> GAP -> linear: a map per colour."""

    def __init__(self, in_channels: int, channels: int, weight: list[list[float]], bias: list[float]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, len(weight))
        with torch.no_grad():
            if in_channels == channels:
                self.conv.weight.copy_(torch.eye(channels)[:, :, None, None])
            else:
                self.conv.weight.fill_(1.0 / in_channels)
            self.conv.bias.zero_()
            self.fc.weight.copy_(torch.tensor(weight))
            self.fc.bias.copy_(torch.tensor(bias))

    def logits(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


class DictOutput(_Features):
    def __init__(self) -> None:
        super().__init__(3, 1, [[1.0], [-1.0]], [0.0, 0.0])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        logits = self.logits(x)
        return {"features": logits.detach() * 0 + 7.0, "logits": logits}


class TupleOutput(_Features):
    """Returns (aux, logits): the first tensor is not the logits, so --output-key 1 is needed."""

    def __init__(self) -> None:
        super().__init__(3, 1, [[1.0], [-1.0]], [0.0, 0.0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.logits(x)
        return -logits, logits


class _Output:
    def __init__(self, logits: Tensor) -> None:
        self.logits = logits
        self.hidden = None


class LogitsAttribute(_Features):
    def __init__(self) -> None:
        super().__init__(3, 1, [[1.0], [-1.0]], [0.0, 0.0])

    def forward(self, x: Tensor) -> _Output:
        return _Output(self.logits(x))


def dict_output() -> nn.Module:
    return DictOutput()


def tuple_output() -> nn.Module:
    return TupleOutput()


def logits_attribute() -> nn.Module:
    return LogitsAttribute()


def three_labels() -> nn.Module:
    """Multi-label: class c is colour channel c; its logit 10 * mean(channel c) - 2.5."""
    return _Logits(_Features(3, 3, [[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]], [-2.5, -2.5, -2.5]))


def single_logit() -> nn.Module:
    """Binary: one logit, mean brightness - 0.5."""
    return _Logits(_Features(3, 1, [[1.0]], [-0.5]))


def gray() -> nn.Module:
    """A 1-channel model: its map is the input itself, logits (+mean, -mean)."""
    return _Logits(_Features(1, 1, [[1.0], [-1.0]], [0.0, 0.0]))


class _Logits(nn.Module):
    def __init__(self, features: _Features) -> None:
        super().__init__()
        self.body = features

    def forward(self, x: Tensor) -> Tensor:
        return self.body.logits(x)


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
