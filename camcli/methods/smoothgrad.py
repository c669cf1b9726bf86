"""SmoothGrad: Smilkov, Thorat, Kim, Viégas, Wattenberg, "SmoothGrad: removing noise by
adding noise", ICML workshop 2017.

M(x) = 1/n sum_i M_saliency(x + N(0, sigma^2)) (eq. 3), with M_saliency the saliency
map max_c |d y / d x_c| of Simonyan et al. and sigma = noise * (max(x) - min(x)) per
image (section 3.2: 10-20 % works best). The n noisy copies of a batch are drawn on
the device from a seeded generator (same input, same map) and run in chunks of
`--chunk-size` inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import Setting
from camcli.methods.saliency import Saliency

if TYPE_CHECKING:
    from torch import Tensor

SEED = 0


@register
class SmoothGrad(Saliency):
    name = "smoothgrad"
    title = "SmoothGrad"
    paper = "Smilkov, Thorat, Kim, Viégas, Wattenberg, ICML-W 2017"
    url = "https://arxiv.org/abs/1706.03825"
    needs = "gradient to the input"
    cost = "n forwards + full backwards (--samples)"
    settings = (
        Setting("samples", int, 25, "noisy copies of each image", minimum=1, alias="--samples"),
        Setting("noise", float, 0.15, "noise std as a fraction of the input's range", minimum=0, alias="--noise"),
    )

    def __init__(self, samples: int = 25, noise: float = 0.15) -> None:
        self.samples = samples
        self.noise = noise

    def inputs_for(self, inputs: Tensor) -> Tensor:
        import torch

        generator = torch.Generator(device=inputs.device).manual_seed(SEED)
        flat = inputs.flatten(1)
        sigma = self.noise * (flat.amax(1) - flat.amin(1))  # (B,)
        shape = (self.samples, *inputs.shape)
        noise = torch.randn(shape, generator=generator, device=inputs.device, dtype=inputs.dtype)
        return inputs.unsqueeze(0) + noise * sigma.view(1, -1, 1, 1, 1)
