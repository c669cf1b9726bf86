"""Smooth Grad-CAM++: Omeiza, Speakman, Cintas, Weldemariam, "Smooth Grad-CAM++: An
Enhanced Inference Level Visualization Technique for Deep Convolutional Neural Network
Models", arXiv 2019.

Grad-CAM++ (eq. 19) whose derivatives are averaged over N noisy copies of the input
(SmoothGrad's noise, sigma = `noise` x the input's range, seeded):
  D_p = 1/N sum_i (dy^c/dA (x + e_i))^p,  alpha = D_2 / (2 D_2 + sum_ab A_ab D_3),
  w_k^c = sum_ij alpha_ij relu(D_1,ij),
A the clean input's activations. (torchcam's `SmoothGradCAMpp` changes the paper on
purpose: sum_ab A_ab D_3,ab in alpha's denominator, the last copy's gradient instead of
D_1, and the last copy's activations for the map.) The N x B noisy inputs
run in chunks of `--chunk-size` forwards, each with a partial backward to the layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import CamContext, CamMethod, Setting

if TYPE_CHECKING:
    from torch import Tensor

SEED = 0
_EPS = 1e-7  # as Grad-CAM++


@register
class SmoothGradCAMPlusPlus(CamMethod):
    name = "smoothgradcam++"
    title = "Smooth Grad-CAM++"
    paper = "Omeiza, Speakman, Cintas, Weldemariam, arXiv 2019"
    url = "https://arxiv.org/abs/1908.01224"
    needs = "gradient"
    cost = "1 + n forwards + partial backwards (samples)"
    settings = (
        Setting("samples", int, 4, "noisy copies of each image", minimum=1),
        Setting("noise", float, 0.15, "noise std as a fraction of the input's range", minimum=0),
    )

    def __init__(self, samples: int = 4, noise: float = 0.15) -> None:
        self.samples = samples
        self.noise = noise

    def noisy_inputs(self, inputs: Tensor) -> Tensor:
        """(S, B, 3, H, W) copies of the batch with seeded Gaussian noise."""
        import torch

        generator = torch.Generator(device=inputs.device).manual_seed(SEED)
        flat = inputs.flatten(1)
        sigma = self.noise * (flat.amax(1) - flat.amin(1))
        noise = torch.randn(
            (self.samples, *inputs.shape), generator=generator, device=inputs.device, dtype=inputs.dtype
        )
        return inputs + noise * sigma.view(1, -1, 1, 1, 1)

    def weights(self, ctx: CamContext) -> Tensor:
        import torch

        assert ctx.gradients_at is not None
        batch = ctx.inputs.shape[0]
        noisy = self.noisy_inputs(ctx.inputs).flatten(0, 1)  # samples first, then images
        moments = torch.zeros(3, *ctx.activations.shape, device=ctx.activations.device)
        for chunk in torch.arange(len(noisy), device=noisy.device).split(ctx.chunk_size):
            b = chunk % batch
            _, grads = ctx.gradients_at(noisy[chunk], ctx.targets[b])
            grads = grads.float()
            for p in range(3):
                moments[p].index_add_(0, b, grads.pow(p + 1))
        d1, d2, d3 = moments / self.samples
        activation_sum = ctx.activations.float().sum(dim=(2, 3), keepdim=True)
        alpha = d2 / (2 * d2 + activation_sum * d3 + _EPS)
        alpha = torch.where(d2 != 0, alpha, torch.zeros_like(alpha))
        return (alpha * d1.clamp(min=0)).sum(dim=(2, 3))
