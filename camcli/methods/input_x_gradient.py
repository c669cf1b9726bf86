"""Input x Gradient: Shrikumar, Greenside, Shcherbina, Kundaje, "Not Just a Black Box:
Learning Important Features Through Propagating Activation Differences", arXiv 2016
(as captum's `InputXGradient`).

R_i = x_i * d y / d x_i: the gradient of the target's logit times the (normalised) input,
summed over the colour channels into one map per image; the engine keeps its positive part
and normalises it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import GradientContext, InputGradientMethod

if TYPE_CHECKING:
    from torch import Tensor


@register
class InputXGradient(InputGradientMethod):
    name = "input-x-gradient"
    title = "Input x Gradient"
    paper = "Shrikumar, Greenside, Shcherbina, Kundaje, arXiv 2016"
    url = "https://arxiv.org/abs/1605.01713"
    needs = "gradient to the input"
    cost = "1 forward + full backward"

    def finish(self, ctx: GradientContext) -> Tensor:
        return (ctx.gradients[0] * ctx.inputs).sum(1)
