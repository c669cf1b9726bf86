"""What a method is: a small class that computes only its own part of an explanation.

The engine (`camcli.engine`) owns hooks, targets, gradients, upsampling and
normalisation. A CAM-family method returns channel weights for the captured
activations (or, through `cam_map`, a map of its own); an input-gradient method
states how a rectifier passes gradients backwards and how input gradients become
its result; a perturbation method scores modified inputs; a layer-image method
picks channels of the layer to show; a combined method multiplies the results of
the methods it needs. Options a method takes (`--samples`, `--patch`, ...) are
constructor arguments named in `settings`.
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
    # True: under --precision bf16/fp16 its result drifts from fp32 (Pearson < 0.99 measured on
    # the samples: pixel-level input gradients, small probability changes, near-tie channel picks),
    # so the engine computes it in fp32 whatever the precision asked for, and says so.
    needs_fp32: ClassVar[bool] = False
    settings: ClassVar[tuple[str, ...]] = ()  # constructor keywords taken from CLI options


class CamMethod(Method):
    """A class activation map: relu(sum_c w_c * A_c), with w from `weights`."""

    def weights(self, ctx: CamContext) -> Tensor:
        """Return (B, C) channel weights, or (B, C, h, w) element-wise weights."""
        raise NotImplementedError

    def cam_map(self, ctx: CamContext) -> Tensor:
        """(B, h, w) map before the engine's relu: sum_c w_c * A_c by default; a method
        whose map is not a weighted channel sum (Eigen-CAM, the centre baseline) overrides
        this instead."""
        weights = self.weights(ctx)
        if weights.ndim == 2:
            weights = weights[:, :, None, None]
        return (weights * ctx.activations).sum(1)


class InputGradientMethod(Method):
    """An input gradient in which every rectifier uses `rectifier_backward`.

    `rectifier_backward(grad_out, x, lo, hi)` is the gradient passed to the input x of
    clamp(x, lo, hi); None keeps autograd's own backward for every activation (a plain
    gradient, defined for any model). `inputs_for` may add noisy copies of the batch;
    `reduce` turns their gradients into the method's result.
    """

    needs_gradient = True
    rectifier_backward: ClassVar[Callable[[Tensor, Tensor, float, float], Tensor] | None] = None

    def inputs_for(self, inputs: Tensor) -> Tensor:
        """(S, B, 3, H, W): the S inputs per sample whose gradients `reduce` combines."""
        return inputs.unsqueeze(0)

    def reduce(self, gradients: Tensor) -> Tensor:
        """(S, B, 3, H, W) input gradients -> (B, 3, H, W) raw gradient (rendered as an
        image) or (B, H, W) map (relu, normalised and overlaid by the engine)."""
        return gradients.mean(0)


@dataclass(frozen=True)
class ModelContext:
    """What a perturbation method may read for one batch: the model as a function."""

    inputs: Tensor  # (B, 3, H, W) normalised model input
    logits: Tensor  # (B, num_classes), detached
    targets: Tensor  # (R, B) class index per target rank and sample
    forward: Callable[[Tensor], Tensor]  # batched logits of extra inputs (no grad)
    chunk_size: int  # how many extra inputs one forward may take


class PerturbationMethod(Method):
    """A map from the model's scores on modified inputs (no hooks, no gradient)."""

    def attribute(self, ctx: ModelContext) -> Tensor:
        """(R, B, h, w) map per target rank, before the engine's relu and normalisation."""
        raise NotImplementedError


class LayerImageMethod(Method):
    """Shows channels of the target layer themselves, one tile per channel."""

    def select(self, activations: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, N) indices of the channels to show, in display order."""
        raise NotImplementedError


class CombinedMethod(Method):
    """A product of other methods' results (e.g. guided Grad-CAM)."""

    requires: ClassVar[tuple[str, str]]  # (input-gradient method, CAM method)

    def combine(self, gradient: Tensor, cam: Tensor) -> Tensor:
        """gradient (B, 3, H, W), cam (B, H, W) in [0, 1] -> (B, 3, H, W)."""
        raise NotImplementedError
