"""Grad-CAM: Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV 2017.

alpha_k^c = 1/Z sum_ij d y^c / d A^k_ij (eq. 1): the spatial mean of the gradient of
the target's logit y^c with respect to feature map A^k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import CamContext, CamMethod

if TYPE_CHECKING:
    from torch import Tensor


@register
class GradCAM(CamMethod):
    name = "gradcam"
    title = "Grad-CAM"
    paper = "Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra, ICCV 2017"
    url = "https://arxiv.org/abs/1610.02391"
    needs = "gradient"
    cost = "1 forward + partial backward"
    needs_gradient = True

    def weights(self, ctx: CamContext) -> Tensor:
        assert ctx.gradients is not None
        return ctx.gradients.mean(dim=(2, 3))
