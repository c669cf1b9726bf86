"""KPCA-CAM: Karmani, Gowda, et al., "KPCA-CAM: Visual Explainability of Deep Computer
Vision Models using Kernel PCA", arXiv 2410.00267, 2024 (as pytorch-grad-cam's `KPCA_CAM`).

Eigen-CAM with kernel PCA: the activations of one image as n = h*w points in R^C,
centred per channel; K_ij = tanh(gamma <a_i, a_j> + 1) (the sigmoid kernel, gamma = 1/C
as scikit-learn's default), doubly centred K~ = K - 1K - K1 + 1K1 (1 = ones / n); the map
is the first kernel principal component, sqrt(lambda_1) u_1 (u_1 the top eigenvector of
K~), reshaped to (h, w). No gradient and no target. The sign of an eigenvector is
arbitrary, so it is chosen to correlate positively with the channel sum of the
activations, as for Eigen-CAM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import CamContext, CamMethod, Setting
from camcli.methods.eigengradcam import agreeing_sign

if TYPE_CHECKING:
    from torch import Tensor


@register
class KPCACAM(CamMethod):
    name = "kpca-cam"
    title = "KPCA-CAM"
    paper = "Karmani, Gowda, Gaur, Dubey, arXiv 2024"
    url = "https://arxiv.org/abs/2410.00267"
    needs = "nothing (class-agnostic)"
    cost = "1 forward + one (h*w)^2 eigendecomposition per image"
    settings = (Setting("gamma", float, None, "sigmoid kernel scale (default 1 / channels)", minimum=0),)

    def __init__(self, gamma: float | None = None) -> None:
        self.gamma = gamma

    def cam_map(self, ctx: CamContext) -> Tensor:
        import torch

        acts = ctx.activations.double()  # the (h*w)^2 kernel's eigenvalues are close: double precision
        batch, channels, height, width = acts.shape
        points = acts.flatten(2).transpose(1, 2)  # (B, n, C)
        points = points - points.mean(1, keepdim=True)
        gamma = 1.0 / channels if self.gamma is None else self.gamma
        kernel = torch.tanh(gamma * points @ points.transpose(1, 2) + 1.0)
        kernel = (
            kernel - kernel.mean(1, keepdim=True) - kernel.mean(2, keepdim=True) + kernel.mean((1, 2), keepdim=True)
        )
        values, vectors = torch.linalg.eigh(kernel)  # ascending
        component = vectors[..., -1] * values[:, -1:].clamp(min=0).sqrt()  # (B, n)
        sign = agreeing_sign(component, acts.sum(1).flatten(1))
        return (sign[:, None] * component).float().view(batch, height, width)
