"""What a method is: a small class that computes only its own part of an explanation.

The engine (`camcli.engine`) owns hooks, targets, gradients, upsampling and
normalisation. A CAM-family method returns channel weights for the captured
activations; an input-gradient method states how a rectifier passes gradients
backwards; a combined method multiplies the results of the methods it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor


@dataclass(frozen=True)
class CamContext:
    """Everything a CAM-family method may read for one batch and one target rank."""

    activations: Tensor  # (B, C, h, w) captured at the target layer, detached
    gradients: Tensor | None  # (B, C, h, w) d(target logit)/d(activations), if needed
    targets: Tensor  # (B,) class index per sample
    logits: Tensor  # (B, num_classes), detached
    inputs: Tensor  # (B, 3, H, W) normalised model input
    head_weight: Tensor | None  # (num_classes, C) of a GAP + linear head, if present
    forward: Callable[[Tensor], Tensor]  # batched logits of extra inputs (no grad)
    chunk_size: int  # how many extra inputs one forward may take


class Method:
    """Common metadata; see the subclasses for what a method computes."""

    name: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str]  # authors, year, venue
    url: ClassVar[str]
    needs: ClassVar[str]  # what the model must offer, for `camcli methods`
    cost: ClassVar[str]  # relative cost, for `camcli methods`
    needs_gradient: ClassVar[bool] = False
    needs_linear_head: ClassVar[bool] = False
    in_all: ClassVar[bool] = True  # False: a baseline or tool that `-m all` leaves out unless named


class CamMethod(Method):
    """A class activation map: relu(sum_c w_c * A_c), with w from `weights`."""

    def weights(self, ctx: CamContext) -> Tensor:
        """Return (B, C) channel weights, (B, C, h, w) element-wise weights, or a (B, h, w)
        map of the method's own (a baseline that does not weigh channels)."""
        raise NotImplementedError


class InputGradientMethod(Method):
    """An input gradient in which every rectifier uses `rectifier_backward`."""

    needs_gradient = True

    @staticmethod
    def rectifier_backward(grad_out: Tensor, x: Tensor, lo: float, hi: float) -> Tensor:
        """Gradient passed to the input x of clamp(x, lo, hi), given grad_out."""
        raise NotImplementedError


class CombinedMethod(Method):
    """A product of other methods' results (e.g. guided Grad-CAM)."""

    requires: ClassVar[tuple[str, str]]  # (input-gradient method, CAM method)

    def combine(self, gradient: Tensor, cam: Tensor) -> Tensor:
        """gradient (B, 3, H, W), cam (B, H, W) in [0, 1] -> (B, 3, H, W)."""
        raise NotImplementedError
