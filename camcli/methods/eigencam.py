"""Eigen-CAM: Muhammad, Yeasin, "Eigen-CAM: Class Activation Map using Principal
Components", IJCNN 2020.

With the activations of one image as an (h*w, C) matrix O, centred per channel
(principal components), O = U S V^T and the map is the projection O v_1 on the first
right singular vector (section III), reshaped to (h, w). No gradient and no target: the
map is the same for every class. The sign of a singular vector is arbitrary, so it is
chosen to make the map correlate positively with the channel sum of the activations;
the engine then keeps the positive part, as for every CAM.
"""

from __future__ import annotations

import torch
from torch import Tensor

from camcli.methods import register
from camcli.methods.base import CamContext, CamMethod


@register
class EigenCAM(CamMethod):
    name = "eigencam"
    title = "Eigen-CAM"
    paper = "Muhammad, Yeasin, IJCNN 2020"
    url = "https://arxiv.org/abs/2008.00299"
    needs = "nothing (class-agnostic)"
    cost = "1 forward + one SVD per image"

    def cam_map(self, ctx: CamContext) -> Tensor:
        return principal_projection(ctx.activations)


def principal_projection(acts: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h, w): each image's projection on its first principal
    component, signed to correlate positively with the channel sum (also `--smooth eigen`,
    on the weighted activations w_c A_c)."""
    acts = acts.float()
    batch, _, height, width = acts.shape
    matrix = acts.flatten(2).transpose(1, 2)  # (B, h*w, C)
    matrix = matrix - matrix.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    projection = (matrix @ vh[:, 0, :, None]).squeeze(2)  # (B, h*w)
    total = acts.sum(1).flatten(1)
    agreement = ((projection - projection.mean(1, keepdim=True)) * (total - total.mean(1, keepdim=True))).sum(1)
    sign = torch.where(agreement < 0, -1.0, 1.0).to(projection)
    return (sign[:, None] * projection).view(batch, height, width)
