"""CAM: Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016.

M_c(x, y) = sum_k w_k^c f_k(x, y), where w^c is the final linear layer's row for
class c and f_k the feature maps that global average pooling feeds into it (eq. 2).
No gradient: the weights are read off the model. With `--contrast c'` the weights are
w^c - w^c', the head rows whose difference is the logit difference y^c - y^c'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import CamContext, CamMethod

if TYPE_CHECKING:
    from torch import Tensor


@register
class CAM(CamMethod):
    name = "cam"
    title = "CAM"
    paper = "Zhou, Khosla, Lapedriza, Oliva, Torralba, CVPR 2016"
    url = "https://arxiv.org/abs/1512.04150"
    needs = "GAP + linear head"
    cost = "1 forward"
    needs_linear_head = True

    def weights(self, ctx: CamContext) -> Tensor:
        assert ctx.head_weight is not None  # the engine refuses models without a head
        weights = ctx.head_weight[ctx.targets]
        if ctx.contrasts is not None:
            weights = weights - ctx.head_weight[ctx.contrasts]
        return weights
