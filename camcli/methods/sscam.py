"""SS-CAM: Wang, Naidu, Mardziel, Hu, "SS-CAM: Smoothed Score-CAM for Sharper Visual
Feature Localization", arXiv 2020 (as torchcam's `SSCAM`).

Score-CAM whose masks are smoothed with noise: with M_k = U(A~_k) the channel, min-max
normalised at the layer's resolution and upsampled bilinearly to the input,
  w_k^c = softmax_k( 1/N sum_i [ y^c((M_k + delta_i) ⊙ X) - y^c(X) ] ),  delta_i ~ N(0, sigma^2),
y^c the target's logit, N = `samples`, sigma = `std` (in mask units). The noise comes
from a seeded generator (same input, same map); draws run one after the other, each
over all (image, channel) pairs in chunks of `--chunk-size` forwards under
`inference_mode`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import CamContext, CamMethod, Setting

if TYPE_CHECKING:
    import torch
    from torch import Tensor

SEED = 0


def score_masks(ctx: CamContext, draws: int, mask_of: Callable[[int, Tensor], Tensor]) -> Tensor:
    """softmax_k of the mean over draws of y^c(mask_of(draw, U(A~_k)) ⊙ X) - y^c(X), (B, C).

    A~_k is each channel min-max normalised at the layer's resolution (a constant channel
    gives 0), upsampled per chunk so that no (B, C, H, W) tensor is ever held."""
    import torch
    import torch.nn.functional as F

    acts = ctx.activations.float()
    lo = acts.amin((2, 3), keepdim=True)
    shifted = acts - lo
    normalised = shifted / (shifted.amax((2, 3), keepdim=True) + 1e-8)
    batch, channels = acts.shape[:2]
    clean = ctx.logits.float().gather(1, ctx.targets[:, None]).squeeze(1)  # (B,)
    total = torch.zeros(batch * channels, device=acts.device)
    pairs = torch.arange(batch * channels, device=acts.device)
    with torch.inference_mode():
        for draw in range(draws):
            for chunk in ctx.chunks(pairs):
                b, c = chunk // channels, chunk % channels
                up = F.interpolate(normalised[b, c][:, None], size=ctx.inputs.shape[-2:], mode="bilinear")
                logits = ctx.forward(mask_of(draw, up) * ctx.inputs[b]).float()
                total[chunk] += logits.gather(1, ctx.targets[b, None]).squeeze(1) - clean[b]
    return (total / draws).view(batch, channels).softmax(1)


@register
class SSCAM(CamMethod):
    name = "sscam"
    title = "SS-CAM (smoothed Score-CAM)"
    paper = "Wang, Naidu, Mardziel, Hu, arXiv 2020"
    url = "https://arxiv.org/abs/2006.14255"
    needs = "N x C forwards (C = channels)"
    cost = "1 + N x C forwards"
    in_all = False
    settings = (
        Setting("samples", int, 35, "noisy copies of each mask", minimum=1),
        Setting("std", float, 2.0, "noise std, in mask units ([0, 1])", minimum=0),
    )

    def __init__(self, samples: int = 35, std: float = 2.0) -> None:
        self.samples = samples
        self.std = std

    def noise(self, device: torch.device) -> Callable[[tuple[int, ...]], Tensor]:
        """Draws of N(0, std^2) in order from one seeded generator."""
        import torch

        generator = torch.Generator(device=device).manual_seed(SEED)
        return lambda shape: self.std * torch.randn(shape, generator=generator, device=device)

    def weights(self, ctx: CamContext) -> Tensor:
        draw_noise = self.noise(ctx.inputs.device)
        return score_masks(ctx, self.samples, lambda _, masks: masks + draw_noise(masks.shape).to(masks))
