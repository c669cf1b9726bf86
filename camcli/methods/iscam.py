"""IS-CAM: Naidu, Ghodsi, Sommer, Kwiatkowska, Mardziel, Hu, "IS-CAM: Integrated
Score-CAM for axiomatic-based explanations", arXiv 2020 (as torchcam's `ISCAM`).

Score-CAM with each mask integrated along a path: with M_k = U(A~_k) as for SS-CAM,
  w_k^c = softmax_k( 1/N sum_{i=1}^N [ y^c(s_i M_k ⊙ X) - y^c(X) ] ),  s_i = sum_{j=1}^i j / N,
y^c the target's logit, N = `samples`. All (image, channel) pairs of a batch run in
chunks of `--chunk-size` forwards under `inference_mode`, N rounds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import CamContext, CamMethod, Setting
from camcli.methods.sscam import score_masks

if TYPE_CHECKING:
    from torch import Tensor


@register
class ISCAM(CamMethod):
    name = "iscam"
    title = "IS-CAM (integrated Score-CAM)"
    paper = "Naidu, Ghodsi, Sommer, Kwiatkowska, Mardziel, Hu, arXiv 2020"
    url = "https://arxiv.org/abs/2010.03023"
    needs = "N x C forwards (C = channels)"
    cost = "1 + N x C forwards"
    in_all = False
    settings = (Setting("samples", int, 10, "points on each mask's path", minimum=1),)

    def __init__(self, samples: int = 10) -> None:
        self.samples = samples

    def weights(self, ctx: CamContext) -> Tensor:
        scales = [sum(j / self.samples for j in range(1, i + 2)) for i in range(self.samples)]
        return score_masks(ctx, self.samples, lambda draw, masks: scales[draw] * masks)
