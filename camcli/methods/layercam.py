"""LayerCAM: Jiang, Zhang, Hou, Cheng, Wei, "LayerCAM: Exploring Hierarchical Class
Activation Maps for Localization", IEEE TIP 30, 2021.

w_ij^kc = relu(d y^c / d A^k_ij) (eq. 5): every location keeps its own positive
gradient as weight, so M^c = relu(sum_k w^kc * A^k) (eq. 6-7) stays sharp at shallow
layers, where the spatial mean of Grad-CAM washes out. Fuse layers with `--layer a,b`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import CamContext, CamMethod

if TYPE_CHECKING:
    from torch import Tensor


@register
class LayerCAM(CamMethod):
    name = "layercam"
    title = "LayerCAM"
    paper = "Jiang, Zhang, Hou, Cheng, Wei, IEEE TIP 2021"
    url = "https://doi.org/10.1109/TIP.2021.3089943"
    needs = "gradient"
    cost = "1 forward + partial backward"
    needs_gradient = True

    def weights(self, ctx: CamContext) -> Tensor:
        assert ctx.gradients is not None
        return ctx.gradients.clamp(min=0)
