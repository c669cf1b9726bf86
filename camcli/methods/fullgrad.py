"""FullGrad: Srinivas, Fleuret, "Full-Gradient Representation for Neural Network
Visualization", NeurIPS 2019 (as pytorch-grad-cam's `FullGrad`).

S(x) = psi(x ⊙ dy/dx) + sum_l sum_c psi(b_l ⊙ dy/dz_l)_c (eq. 6): the input-gradient
term plus, for every layer l with a bias b_l, the gradient of the target's logit with
respect to that layer's output z_l times its bias, channel by channel; psi is abs, then
min-max per (image, channel), then bilinear resizing to the input. The layers are
every Conv2d with a bias and every BatchNorm2d (bias b - mean * gamma / sqrt(var + eps),
in eval mode), as pytorch-grad-cam. One forward and one backward give all their
gradients; because resizing is linear, each layer's channels are summed before it is
resized once (equal to resizing every channel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from camcli.methods import register
from camcli.methods.base import GradientContext, InputGradientMethod

if TYPE_CHECKING:
    from torch import Tensor, nn


def _scaled(values: Tensor) -> Tensor:
    """abs, then min-max per (image, channel) as pytorch-grad-cam's `scale_cam_image`, (N, C, h, w)."""
    values = values.abs()
    values = values - values.amin((2, 3), keepdim=True)
    return values / (values.amax((2, 3), keepdim=True) + 1e-7)


def effective_bias(module: nn.Module) -> Tensor:
    """The bias a layer adds to its output: a convolution's own, or eval batch norm's."""
    import torch

    if isinstance(module, torch.nn.BatchNorm2d):
        scale = module.weight / torch.sqrt(module.running_var + module.eps)
        return module.bias - module.running_mean * scale
    return module.bias


@register
class FullGrad(InputGradientMethod):
    name = "fullgrad"
    title = "FullGrad"
    paper = "Srinivas, Fleuret, NeurIPS 2019"
    url = "https://arxiv.org/abs/1905.00780"
    needs = "gradient to the input and to every biased layer"
    cost = "1 forward + full backward"

    def output_modules(self, model: Any) -> list[Any]:
        import torch

        return [
            module
            for module in model.modules()
            if (type(module) is torch.nn.Conv2d and module.bias is not None)
            or (type(module) is torch.nn.BatchNorm2d and module.bias is not None and module.running_var is not None)
        ]

    def finish(self, ctx: GradientContext) -> Tensor:
        import torch.nn.functional as F

        size = ctx.inputs.shape[-2:]
        total = _scaled(ctx.gradients[0] * ctx.inputs).sum(1)  # (B, H, W)
        for module, gradient in zip(ctx.modules, ctx.module_gradients, strict=True):
            bias = effective_bias(module).detach().float()[None, :, None, None]
            summed = _scaled(gradient.float() * bias).sum(1, keepdim=True)
            total = total + F.interpolate(summed, size=size, mode="bilinear", align_corners=False)[:, 0]
        return total
