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

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import CamContext, CamMethod
from camcli.methods.eigengradcam import principal_projection

if TYPE_CHECKING:
    from torch import Tensor

if TYPE_CHECKING:
    from torch import Tensor


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
