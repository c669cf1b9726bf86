"""Saliency: Simonyan, Vedaldi, Zisserman, "Deep Inside Convolutional Networks:
Visualising Image Classification Models and Saliency Maps", ICLR workshop 2014.

M_ij = max_c |d y / d x_c,ij| (section 3.1): the plain gradient of the target's logit
with respect to the input image, its magnitude maximised over the colour channels.
Every activation keeps its own backward, so any differentiable model qualifies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import InputGradientMethod

if TYPE_CHECKING:
    from torch import Tensor


@register
class Saliency(InputGradientMethod):
    name = "saliency"
    title = "Saliency (gradient)"
    paper = "Simonyan, Vedaldi, Zisserman, ICLR-W 2014"
    url = "https://arxiv.org/abs/1312.6034"
    needs = "gradient to the input"
    cost = "1 forward + full backward"
    needs_fp32 = True  # bf16 vs fp32 Pearson 0.68-0.98 on the samples (benchmarks/RESULTS.md)

    def reduce(self, gradients: Tensor) -> Tensor:
        return gradients.abs().amax(2).mean(0)
