"""Eigen-Grad-CAM: Eigen-CAM (Muhammad, Yeasin, IJCNN 2020) of the gradient-weighted
activations, as pytorch-grad-cam's `EigenGradCAM`.

With M = A ⊙ dy^c/dA of one image as an (h*w, C) matrix, centred per channel,
M = U S V^T and the map is the projection M v_1 on the first right singular vector,
reshaped to (h, w). Unlike Eigen-CAM it is class-specific (through the gradient). The
sign of a singular vector is arbitrary, so it is chosen to make the map correlate
positively with sum_k (A ⊙ dy^c/dA)_k (HiResCAM's map); the engine keeps the positive part.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import CamContext, CamMethod

if TYPE_CHECKING:
    from torch import Tensor


def principal_projection(features: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h, w): the centred features projected on their first principal
    direction, signed to correlate positively with their channel sum."""
    import torch

    features = features.float()
    batch, _, height, width = features.shape
    matrix = features.flatten(2).transpose(1, 2)  # (B, h*w, C)
    matrix = matrix - matrix.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    projection = (matrix @ vh[:, 0, :, None]).squeeze(2)  # (B, h*w)
    return (agreeing_sign(projection, features.sum(1).flatten(1))[:, None] * projection).view(batch, height, width)


def agreeing_sign(values: Tensor, reference: Tensor) -> Tensor:
    """(B,) +1 or -1: the sign that makes each row of `values` correlate positively with `reference`."""
    import torch

    agreement = ((values - values.mean(1, keepdim=True)) * (reference - reference.mean(1, keepdim=True))).sum(1)
    return torch.where(agreement < 0, -1.0, 1.0).to(values)


@register
class EigenGradCAM(CamMethod):
    name = "eigengradcam"
    title = "Eigen-Grad-CAM"
    paper = "Muhammad, Yeasin, IJCNN 2020"
    url = "https://github.com/jacobgil/pytorch-grad-cam"
    needs = "gradient"
    cost = "1 forward + partial backward + one SVD per image"
    needs_gradient = True

    def cam_map(self, ctx: CamContext) -> Tensor:
        assert ctx.gradients is not None
        return principal_projection(ctx.activations * ctx.gradients)
