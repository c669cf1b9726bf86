"""Guided Grad-CAM: Selvaraju et al., ICCV 2017, section 3.1.

The guided-backpropagation input gradient multiplied element-wise by the Grad-CAM
map upsampled to the input resolution.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import CombinedMethod

if TYPE_CHECKING:
    from torch import Tensor


@register
class GuidedGradCAM(CombinedMethod):
    name = "guided-gradcam"
    title = "Guided Grad-CAM"
    paper = "Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra, ICCV 2017"
    url = "https://arxiv.org/abs/1610.02391"
    needs = "gradient; ReLU/ReLU6 activations"
    cost = "2 forwards + partial and full backward"
    needs_gradient = True
    requires = ("guided-backprop", "gradcam")

    def combine(self, gradient: Tensor, cam: Tensor) -> Tensor:
        return gradient * cam.unsqueeze(1)
