"""Occlusion: Zeiler, Fergus, "Visualizing and Understanding Convolutional Networks",
ECCV 2014 (section 4.2, fig. 7).

A patch of side `--patch` (32 px) slides over the input with step `--stride` (half
the patch); under each
position the input is replaced by a baseline (`--occlusion-fill`: the dataset mean,
i.e. 0 in normalised input space, a colour, or a blurred copy of the image) and
M_ij = mean over the patches p covering pixel ij of (P_c(x) - P_c(x with p occluded)),
P_c the target's softmax probability. The probability, as in the paper's figure 7(b):
it is bounded, comparable between images, and a logit can drop while the class still
wins (or rise while it loses) because softmax depends on the other classes too. The
last position of each row and column is moved to the border so every pixel is covered.
All (sample, position) pairs of a batch run in chunks of `--chunk-size` forwards
without autograd; every target rank reads the same forwards.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from camcli.errors import UsageError
from camcli.methods import register
from camcli.methods.base import ModelContext, PerturbationMethod


def patch_starts(size: int, patch: int, stride: int, device: torch.device) -> Tensor:
    """Start offsets along one axis: every `stride`, plus the last one flush with the border."""
    last = size - patch
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return torch.tensor(starts, device=device)


def patch_masks(height: int, width: int, patch: int, stride: int, device: torch.device) -> Tensor:
    """(P, H, W) bool: one mask per patch position, rows first."""
    ys = patch_starts(height, patch, stride, device)
    xs = patch_starts(width, patch, stride, device)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = (rows >= ys[:, None]) & (rows < ys[:, None] + patch)  # (ny, H)
    in_cols = (cols >= xs[:, None]) & (cols < xs[:, None] + patch)  # (nx, W)
    return (in_rows[:, None, :, None] & in_cols[None, :, None, :]).flatten(0, 1)


@register
class Occlusion(PerturbationMethod):
    name = "occlusion"
    title = "Occlusion"
    paper = "Zeiler, Fergus, ECCV 2014"
    url = "https://arxiv.org/abs/1311.2901"
    needs = "P forwards (P = patch positions)"
    cost = "1 + P forwards"
    needs_fp32 = True  # bf16 vs fp32 Pearson 0.68-0.98 on the samples (benchmarks/RESULTS.md)
    in_all = False
    settings = ("patch", "stride", "fill")

    def __init__(
        self, patch: int = 32, stride: int | None = None, fill: str | tuple[float, float, float] = "mean"
    ) -> None:
        stride = max(1, patch // 2) if stride is None else stride  # default: patches overlap by half
        if patch < 1 or stride < 1:
            raise UsageError(f"--patch and --stride must be at least 1, not {patch} and {stride}")
        if stride > patch:
            raise UsageError(f"--stride {stride} is larger than --patch {patch}: some pixels would never be occluded")
        if isinstance(fill, str) and fill not in ("mean", "blur"):
            raise UsageError(f"--occlusion-fill must be mean, blur or R,G,B, not {fill!r}")
        self.patch = patch
        self.stride = stride
        self.fill = fill  # "mean", "blur", or a colour in normalised input units

    def baseline(self, inputs: Tensor) -> Tensor:
        """What an occluded pixel is replaced with, (B, 3, H, W)."""
        if self.fill == "mean":
            return torch.zeros_like(inputs)
        if self.fill == "blur":  # sigma = patch / 4: the patch's content is gone, its colours stay
            sigma = max(self.patch / 4, 0.5)
            kernel = min(2 * round(3 * sigma) + 1, 2 * (min(inputs.shape[-2:]) // 2) - 1)
            return gaussian_blur(inputs, [kernel, kernel], [sigma, sigma])
        colour = torch.tensor(self.fill, device=inputs.device, dtype=inputs.dtype)
        return colour.view(1, 3, 1, 1).expand_as(inputs)

    def attribute(self, ctx: ModelContext) -> Tensor:
        inputs = ctx.inputs
        batch, _, height, width = inputs.shape
        patch = min(self.patch, height, width)
        masks = patch_masks(height, width, patch, self.stride, inputs.device)  # (P, H, W)
        positions = masks.shape[0]
        base = self.baseline(inputs)
        targets = ctx.targets.T  # (B, R)
        clean = ctx.logits.float().softmax(-1).gather(1, targets)  # (B, R)
        occluded = torch.empty(batch * positions, targets.shape[1], device=inputs.device)
        with torch.inference_mode():
            for chunk in torch.arange(batch * positions, device=inputs.device).split(ctx.chunk_size):
                b, p = chunk // positions, chunk % positions
                hidden = masks[p].unsqueeze(1)
                probs = ctx.forward(torch.where(hidden, base[b], inputs[b])).float().softmax(-1)
                occluded[chunk] = probs.gather(1, targets[b])
        drop = clean[:, None, :] - occluded.view(batch, positions, -1)  # (B, P, R)
        covered = masks.flatten(1).float()  # (P, H*W)
        total = torch.einsum("bpr,pn->rbn", drop, covered)
        return (total / covered.sum(0)).view(-1, batch, height, width)
