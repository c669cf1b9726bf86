"""HiResCAM: Draelos, Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations
of convolutional neural networks", arXiv 2011.08891, 2020.

M^c = sum_k (d y^c / d A^k) ⊙ A^k: the gradient multiplies the activations element-wise
instead of being averaged first, so the map shows only locations that raised the score.
As for Grad-CAM, the engine keeps the positive part, relu(M^c). For a GAP + linear head
it equals CAM (the paper's theorem).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import CamContext, CamMethod

if TYPE_CHECKING:
    from torch import Tensor


@register
class HiResCAM(CamMethod):
    name = "hirescam"
    title = "HiResCAM"
    paper = "Draelos, Carin, arXiv 2020"
    url = "https://arxiv.org/abs/2011.08891"
    needs = "gradient"
    cost = "1 forward + partial backward"
    needs_gradient = True

    def weights(self, ctx: CamContext) -> Tensor:
        assert ctx.gradients is not None
        return ctx.gradients
