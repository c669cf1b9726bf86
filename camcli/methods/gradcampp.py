"""Grad-CAM++: Chattopadhyay et al., "Grad-CAM++: Improved Visual Explanations for
Deep Convolutional Networks", WACV 2018.

Closed form of eq. 19 with g = d y^c / d A (the logit's gradient, whose higher
derivatives are replaced by powers of g as in the paper's exponential trick):
  alpha_ij^kc = g^2 / (2 g^2 + sum_ab A_ab^k g^3),   w_k^c = sum_ij alpha_ij^kc relu(g_ij).
alpha is 0 where g is 0 (the paper's "if denominator is 0" case).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import CamContext, CamMethod

if TYPE_CHECKING:
    from torch import Tensor

_EPS = 1e-7  # keeps the denominator away from 0 where sum(A) * g^3 = -2 g^2


@register
class GradCAMPlusPlus(CamMethod):
    name = "gradcam++"
    title = "Grad-CAM++"
    paper = "Chattopadhyay, Sarkar, Howlader, Balasubramanian, WACV 2018"
    url = "https://arxiv.org/abs/1710.11063"
    needs = "gradient"
    cost = "1 forward + partial backward"
    needs_gradient = True

    def weights(self, ctx: CamContext) -> Tensor:
        import torch

        g = ctx.gradients
        assert g is not None
        g2 = g.pow(2)
        activation_sum = ctx.activations.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + activation_sum * g2 * g + _EPS)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        return (alpha * g.clamp(min=0)).sum(dim=(2, 3))
