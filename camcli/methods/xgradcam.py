"""XGrad-CAM: Fu, Hu, Yang, Gao, Chen, Wang, "Axiom-based Grad-CAM: Towards Accurate
Visualization and Explanation of CNNs", BMVC 2020.

w_k^c = sum_ij (A^k_ij / sum_ab A^k_ab) * d y^c / d A^k_ij (eq. 13): the gradient
averaged with the activation itself as weights, chosen to satisfy the sensitivity and
conservation axioms. A channel whose activations sum to 0 gets weight 0 (the eps).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import CamContext, CamMethod

if TYPE_CHECKING:
    from torch import Tensor

_EPS = 1e-7  # as in the authors' code: sum(A) = 0 gives weight 0, not NaN


@register
class XGradCAM(CamMethod):
    name = "xgradcam"
    title = "XGrad-CAM"
    paper = "Fu, Hu, Yang, Gao, Chen, Wang, BMVC 2020"
    url = "https://arxiv.org/abs/2008.02312"
    needs = "gradient"
    cost = "1 forward + partial backward"
    needs_gradient = True

    def weights(self, ctx: CamContext) -> Tensor:
        assert ctx.gradients is not None
        acts = ctx.activations
        return (acts * ctx.gradients).sum(dim=(2, 3)) / (acts.sum(dim=(2, 3)) + _EPS)
