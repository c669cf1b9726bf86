"""Finer-CAM: Zhang, Gu et al., "Finer-CAM: Spotting the Difference Reveals Finer Details
for Visual Explanation", arXiv 2501.11309, 2025.

Grad-CAM of a contrastive objective: the target's map minus what similar classes share.
The references d_1..d_K are the K classes whose logits are closest to the target's
(the target excluded), and the score whose gradient is taken is

    S = sum_k p_k (y_c - alpha * y_{d_k}) / sum_k p_k,    p = softmax(y),

so features the target shares with its look-alikes cancel and what tells them apart
remains; alpha = 1 removes the shared part fully, alpha = 0 is Grad-CAM. As in
pytorch-grad-cam's FinerCAM (K = 3, alpha = 1, p_k inside the graph); torchcam's variant
uses the plain mean with alpha = 0.6. The weights are Grad-CAM's: the spatial mean of
dS / dA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import CamContext, CamMethod

if TYPE_CHECKING:
    from torch import Tensor


@register
class FinerCAM(CamMethod):
    name = "finercam"
    title = "Finer-CAM: Grad-CAM of the target against its most similar classes"
    paper = "Zhang, Gu, Mao, Chao, Sun, Li, Liu, Wang, Zhang, arXiv 2025"
    url = "https://arxiv.org/abs/2501.11309"
    needs = "gradient"
    cost = "1 forward + partial backward (its own)"
    needs_gradient = True

    def __init__(self, alpha: float = 1.0, references: int = 3) -> None:
        self.alpha = alpha
        self.references = references

    def reference_classes(self, logits: Tensor, targets: Tensor) -> Tensor:
        """(B, K): the K classes with logits closest to each target's, nearest first."""
        target_logit = logits.gather(1, targets[:, None])
        distance = (logits - target_logit).abs().detach().scatter(1, targets[:, None], float("inf"))
        count = min(self.references, logits.shape[1] - 1)
        return distance.topk(count, dim=1, largest=False).indices

    def score(self, logits: Tensor, targets: Tensor) -> Tensor:
        references = self.reference_classes(logits, targets)
        weights = logits.softmax(1).gather(1, references)
        difference = logits.gather(1, targets[:, None]) - self.alpha * logits.gather(1, references)
        return (weights * difference).sum(1) / (weights.sum(1) + 1e-9)

    def weights(self, ctx: CamContext) -> Tensor:
        assert ctx.gradients is not None
        return ctx.gradients.mean(dim=(2, 3))
