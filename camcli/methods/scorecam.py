"""Score-CAM: Wang et al., "Score-CAM: Score-Weighted Visual Explanations for
Convolutional Neural Networks", CVPR Workshops 2020 (as in the official code).

Each channel A_k, upsampled to the input size and min-max normalised to H_k, masks
the (normalised) input; its weight is the target's softmax probability on that
masked input: w_k = softmax(f(X * H_k))_c (eq. 3-5). Channels whose activation is
constant have no defined mask and get weight 0 (the official code skips them).
All (sample, channel) pairs of a batch are flattened and run in chunks without
autograd.

`--set scorecam.top=N` (`--scorecam-top N`) is an opt-in approximation, never the default: only the N
non-constant channels with the largest mean activation of each image are scored
(the others get weight 0), so an image costs 1 + N forwards instead of 1 + K.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import CamContext, CamMethod, Setting

if TYPE_CHECKING:
    from torch import Tensor


@register
class ScoreCAM(CamMethod):
    name = "scorecam"
    title = "Score-CAM"
    paper = "Wang, Wang, Du, Yang, Zhang, Ding, Mardziel, Hu, CVPR-W 2020"
    url = "https://arxiv.org/abs/1910.01279"
    needs = "K forwards (K = non-constant channels)"
    cost = "1 + K forwards"
    settings = (
        Setting(
            "top",
            int,
            None,
            "score only the N strongest channels (an approximation; default: all)",
            minimum=1,
            alias="--scorecam-top",
        ),
    )

    def __init__(self, top: int | None = None, align_corners: bool = False) -> None:
        self.top = top
        # False as in the official code; True reproduces pytorch-grad-cam's masks
        # (UpsamplingBilinear2d), for comparisons only: not a CLI option.
        self.align_corners = align_corners

    def weights(self, ctx: CamContext) -> Tensor:
        import torch
        import torch.nn.functional as F

        acts = ctx.activations
        batch, channels = acts.shape[:2]
        size = ctx.inputs.shape[-2:]
        flat = acts.flatten(2)
        live = flat.amax(-1) > flat.amin(-1)  # (B, C) non-constant channels
        if self.top is not None and self.top < channels:
            strength = flat.mean(-1).masked_fill(~live, -torch.inf)
            chosen = torch.zeros_like(live).scatter_(1, strength.topk(self.top, dim=1).indices, True)
            live &= chosen
        weights = torch.zeros(batch, channels, device=acts.device, dtype=torch.float32)
        pairs = live.nonzero()  # (N, 2) rows of (sample, channel)
        with torch.inference_mode():
            for chunk in ctx.chunks(pairs):
                b, c = chunk.unbind(1)
                masks = F.interpolate(
                    acts[b, c].unsqueeze(1).float(), size=size, mode="bilinear", align_corners=self.align_corners
                )
                lo = masks.amin(dim=(2, 3), keepdim=True)
                span = masks.amax(dim=(2, 3), keepdim=True) - lo
                masks = (masks - lo) / span.clamp(min=torch.finfo(masks.dtype).tiny)
                probs = ctx.forward(ctx.inputs[b] * masks).float().softmax(-1)
                weights[b, c] = probs.gather(1, ctx.targets[b].unsqueeze(1)).squeeze(1)
        return weights
