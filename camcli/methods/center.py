"""A centred Gaussian: a calibration baseline, not an explanation.

M(x, y) = exp(-((x - W/2)^2 / (2 sigma_x^2) + (y - H/2)^2 / (2 sigma_y^2))), in
model-input pixels (centres at i + 0.5), with sigma = 1/4 of each side, whatever the
model or the image. It encodes the photographer's centre bias that saliency
benchmarks use as their baseline (Judd et al., "Learning to Predict Where Humans
Look", ICCV 2009): a method worth its forwards must localise better (pointing game,
energy in the box) and delete more faithfully (a lower deletion AUC) than this map.

Why sigma = side / 4: the +-1 sigma region is then the central half of each side,
where a photographed object's box usually lies, and the map still falls to
exp(-2) ~ 0.14 of its peak at the middle of each edge, so its pixel order (what
deletion and insertion use) covers the whole image rather than a small blob. The
pipeline resizes the whole image to the square input, so in the original image
the same Gaussian is stretched with the image: sigma is 1/4 of its width and 1/4
of its height.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import CamContext, CamMethod

if TYPE_CHECKING:
    import torch
    from torch import Tensor

SIGMA_FRACTION = 0.25  # sigma as a fraction of each side (see the module docstring)


def centered_gaussian(height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """(height, width) Gaussian with peak 1 at the image centre, sigma = side / 4."""
    import torch

    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5 - height / 2) / (SIGMA_FRACTION * height)
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5 - width / 2) / (SIGMA_FRACTION * width)
    return torch.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))


@register
class Center(CamMethod):
    name = "center"
    title = "Centred Gaussian (baseline)"
    paper = "Judd, Ehinger, Durand, Torralba, ICCV 2009 (centre bias)"
    url = "https://people.csail.mit.edu/tjudd/WherePeopleLook/"
    needs = "nothing (ignores the model)"
    cost = "none"
    in_all = False  # a calibration baseline, not an explanation

    def cam_map(self, ctx: CamContext) -> Tensor:
        """The map itself, (B, H, W) at the model input's size: the same for every sample."""
        height, width = ctx.inputs.shape[-2:]
        gaussian = centered_gaussian(height, width, ctx.inputs.device)
        return gaussian.expand(ctx.inputs.shape[0], height, width)
