"""LeGrad: Bousselham, Boggust, Chaybouti, Strobelt, Kuehne, "LeGrad: An Explainability
Method for Vision Transformers via Feature Formation Sensitivity", ICCV 2025.

Each block l gets its own score s^l: the model's final norm and classifier applied to the
mean of that block's output tokens (the head read at an intermediate depth). Its gradient
with respect to the block's attention probabilities A^l (B, heads, N, N) is kept where
positive and averaged over heads and query tokens, E^l = 1/(h N) sum_h sum_i
(d s^l / d A^l)^+_{h,i,:}; the map is the mean over the blocks, 1/L sum_l E^l, at the
patch keys (class, distillation and register keys dropped). Attention values are not
multiplied in. torchcam 0.5.0's `LeGrad` computes the same for torchvision
ViTs; camcli also reads timm's ViT and DeiT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import AttentionContext, AttentionMethod

if TYPE_CHECKING:
    from torch import Tensor


@register
class LeGrad(AttentionMethod):
    name = "legrad"
    title = "LeGrad: positive gradients of each block's score w.r.t. its attention, averaged"
    paper = "Bousselham, Boggust, Chaybouti, Strobelt, Kuehne, ICCV 2025"
    url = "https://arxiv.org/abs/2404.03214"
    needs = "vision transformer (torchvision/timm ViT, DeiT)"
    cost = "1 forward + L small backwards (L blocks)"
    needs_gradient = True
    gradient = "block"

    def attribute(self, ctx: AttentionContext) -> Tensor:
        import torch

        assert ctx.gradients is not None
        per_block = [g.float().relu().mean(dim=(1, 2))[:, ctx.prefix :] for g in ctx.gradients]
        mean = torch.stack(per_block).mean(0)
        return mean.view(mean.shape[0], *ctx.grid)
