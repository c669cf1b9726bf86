"""Deconvnet: Zeiler, Fergus, "Visualizing and Understanding Convolutional Networks",
ECCV 2014 (section 2.1), as a backward pass (Springenberg et al. 2015, fig. 1).

The input gradient of the target's logit in which every rectifier passes back the
positive part of the gradient, whatever its forward input was:
R_i = relu(R_{i+1}) (the deconvnet's "unpooling, rectification, filtering"; max
unpooling with switches is what the gradient of max pooling does). Applies to ReLU
and ReLU6 networks; rendered like guided backprop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import GRADIENT, InputGradientMethod

if TYPE_CHECKING:
    from torch import Tensor


@register
class Deconvnet(InputGradientMethod):
    kind = GRADIENT  # the raw (B, 3, H, W) gradient, drawn as an image
    name = "deconvnet"
    title = "Deconvnet"
    paper = "Zeiler, Fergus, ECCV 2014"
    url = "https://arxiv.org/abs/1311.2901"
    needs = "ReLU/ReLU6 activations, gradient to the input"
    cost = "1 forward + full backward"

    @staticmethod
    def rectifier_backward(grad_out: Tensor, x: Tensor, lo: float, hi: float) -> Tensor:
        return grad_out.clamp(min=0)
