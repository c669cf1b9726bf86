"""Ablation-CAM: Desai, Ramaswamy, "Ablation-CAM: Visual Explanations for Deep
Convolutional Network via Gradient-free Localization", WACV 2020.

w_k^c = (y^c - y^c_k) / y^c (eq. 3): the relative drop of the target's logit y^c when
feature map A_k is set to zero at the target layer (the rest of the network runs as
usual). A channel that is already zero everywhere would not change y^c: its weight is 0
without a forward. All (image, channel) pairs of a batch run in chunks of
`--chunk-size` forwards under `inference_mode`, each a whole forward whose target-layer
output is replaced (as in pytorch-grad-cam, which zeroes a channel of a layer whose
minimum is 0 and sets it to min - 1e7 otherwise: camcli always zeroes, as the paper).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import CamContext, CamMethod

if TYPE_CHECKING:
    from torch import Tensor


@register
class AblationCAM(CamMethod):
    name = "ablationcam"
    title = "Ablation-CAM"
    paper = "Desai, Ramaswamy, WACV 2020"
    url = "https://openaccess.thecvf.com/content_WACV_2020/html/Desai_Ablation-CAM_Visual_Explanations_for_Deep_Convolutional_Network_via_Gradient-free_Localization_WACV_2020_paper.html"
    needs = "K forwards (K = non-zero channels)"
    cost = "1 + K forwards"
    in_all = False

    def weights(self, ctx: CamContext) -> Tensor:
        import torch

        assert ctx.forward_layer is not None
        acts = ctx.activations
        clean = ctx.logits.float().gather(1, ctx.targets[:, None])  # (B, 1)
        ablated = clean.expand(-1, acts.shape[1]).clone()  # (B, C): no change where nothing is ablated
        pairs = (acts.flatten(2).abs().amax(-1) > 0).nonzero()  # (N, 2) rows of (sample, channel)
        with torch.inference_mode():
            for chunk in pairs.split(ctx.chunk_size):
                b, c = chunk.unbind(1)
                modified = acts[b].clone()
                modified[torch.arange(len(chunk), device=acts.device), c] = 0
                logits = ctx.forward_layer(modified, b).float()
                ablated[b, c] = logits.gather(1, ctx.targets[b, None]).squeeze(1)
        return (clean - ablated) / clean
