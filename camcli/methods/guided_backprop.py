"""Guided backpropagation: Springenberg et al., "Striving for Simplicity: The All
Convolutional Net", ICLR 2015 workshop (section 3.4).

The input gradient of the target's logit, where every rectifier passes back only
positive gradients, and only where its own forward input was in its linear range:
R_i = (f_i > 0) * (R_{i+1} > 0) * R_{i+1}. Applies to ReLU and ReLU6 (in-place or
not, module or functional); the engine refuses models with other activations.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import GRADIENT, InputGradientMethod

if TYPE_CHECKING:
    from torch import Tensor


@register
class GuidedBackprop(InputGradientMethod):
    kind = GRADIENT  # the raw (B, 3, H, W) gradient, drawn as an image
    name = "guided-backprop"
    title = "Guided Backpropagation"
    paper = "Springenberg, Dosovitskiy, Brox, Riedmiller, ICLR-W 2015"
    url = "https://arxiv.org/abs/1412.6806"
    needs = "ReLU/ReLU6 activations, gradient to the input"
    cost = "1 forward + full backward"
    needs_fp32 = True  # bf16 vs fp32 Pearson 0.68-0.98 on the samples (benchmarks/RESULTS.md)

    @staticmethod
    def rectifier_backward(grad_out: Tensor, x: Tensor, lo: float, hi: float) -> Tensor:
        """relu(grad_out) * 1[lo < x < hi], with aten's fused masks (3x fewer passes)."""
        import torch

        positive = grad_out.relu()
        if math.isinf(hi):
            return torch.ops.aten.threshold_backward(positive, x, lo)  # where x > lo
        return torch.ops.aten.hardtanh_backward(positive, x, lo, hi)  # where lo < x < hi
