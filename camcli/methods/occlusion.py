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

`--occlusion-target` picks what is measured under the occluder, the paper's three views:
- ``class`` (default, fig. 7 b/d): P_c as above.
- ``feature`` (fig. 7 b, first column): the total activation sum_yx A_k of the target
  layer's strongest channel k (the largest single activation on the clean image),
  M_ij = mean over covering patches of (S_k(x) - S_k(x with p occluded)): high where
  covering the image silences the feature, i.e. on that channel's receptive field. The
  forwards stop at the layer.
- ``winner`` (fig. 7 e): the most probable class with the occluder at each position; each
  pixel gets the winner of the position whose patch centre is nearest. Not a heatmap: a
  label map (class indices) that the writer draws with a legend and lists in the JSON.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.errors import OptionError, UsageError
from camcli.methods import register
from camcli.methods.base import HEATMAP, LABELS, ModelContext, PerturbationMethod, Setting, colour_or, colour_to_input

if TYPE_CHECKING:
    import torch
    from torch import Tensor

TARGETS = ("class", "feature", "winner")


def patch_starts(size: int, patch: int, stride: int, device: torch.device) -> Tensor:
    """Start offsets along one axis: every `stride`, plus the last one flush with the border."""
    import torch

    last = size - patch
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return torch.tensor(starts, device=device)


def patch_masks(height: int, width: int, patch: int, stride: int, device: torch.device) -> Tensor:
    """(P, H, W) bool: one mask per patch position, rows first."""
    import torch

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
    settings = (
        Setting("patch", int, 32, "patch side in model-input pixels", minimum=1, alias="--patch"),
        Setting("stride", int, None, "patch step in pixels (default: patch/2)", minimum=1, alias="--stride"),
        Setting(
            "fill",
            str,
            "mean",
            "what fills the patch: mean (the dataset mean), blur, or R,G,B in 0-255",
            choices=("mean", "blur", "R,G,B"),
            parse=colour_or("mean", "blur"),
            to_input=colour_to_input,
            alias="--occlusion-fill",
        ),
        Setting(
            "occlusion_target",
            str,
            "class",
            "what the occluder's effect is measured on: class (the target's probability), feature "
            "(the layer's strongest channel) or winner (the most probable class, a label map)",
            choices=TARGETS,
            alias="--occlusion-target",
        ),
    )

    def __init__(
        self,
        patch: int = 32,
        stride: int | None = None,
        fill: str | tuple[float, float, float] = "mean",
        occlusion_target: str = "class",
    ) -> None:
        stride = max(1, patch // 2) if stride is None else stride  # default: patches overlap by half
        if patch < 1 or stride < 1:
            raise UsageError(f"occlusion.patch and .stride must be at least 1, not {patch} and {stride}")
        if stride > patch:
            raise OptionError(
                f"{{stride}} {stride} is larger than {{patch}} {patch}: some pixels would never be occluded",
                "stride",
                "patch",
            )
        if isinstance(fill, str) and fill not in ("mean", "blur"):
            raise UsageError(f"occlusion.fill (--occlusion-fill) must be mean, blur or R,G,B, not {fill!r}")
        self.patch = patch
        self.stride = stride
        self.fill = fill  # "mean", "blur", or a colour in normalised input units
        self.target = occlusion_target
        self.reads_layer = occlusion_target == "feature"  # the engine passes the layer's forward
        self.kind = LABELS if occlusion_target == "winner" else HEATMAP  # a label map, or heat

    def baseline(self, inputs: Tensor) -> Tensor:
        """What an occluded pixel is replaced with, (B, 3, H, W)."""
        import torch

        if self.fill == "mean":
            return torch.zeros_like(inputs)
        if self.fill == "blur":  # sigma = patch / 4: the patch's content is gone, its colours stay
            from torchvision.transforms.functional import gaussian_blur

            sigma = max(self.patch / 4, 0.5)
            kernel = min(2 * round(3 * sigma) + 1, 2 * (min(inputs.shape[-2:]) // 2) - 1)
            return gaussian_blur(inputs, [kernel, kernel], [sigma, sigma])
        colour = torch.tensor(self.fill, device=inputs.device, dtype=inputs.dtype)
        return colour.view(1, 3, 1, 1).expand_as(inputs)

    def attribute(self, ctx: ModelContext) -> Tensor:
        """(R, B, H, W): the mean drop of the measured score over the patches covering each
        pixel (class, feature), or the winning class index at each pixel (winner)."""
        import torch

        inputs = ctx.inputs
        batch, _, height, width = inputs.shape
        patch = min(self.patch, height, width)
        masks = patch_masks(height, width, patch, self.stride, inputs.device)  # (P, H, W)
        positions = masks.shape[0]
        base = self.baseline(inputs)
        targets = ctx.targets.T  # (B, R)
        measure = self._measure(ctx)
        with torch.inference_mode():
            if self.target == "class":  # the clean forward is the engine's
                clean = ctx.logits.float().softmax(-1).gather(1, targets)  # (B, R)
            else:
                clean = measure(inputs, torch.arange(batch, device=inputs.device))  # (B, 1)
        occluded = torch.empty(batch * positions, clean.shape[1], device=inputs.device, dtype=clean.dtype)
        with torch.inference_mode():
            for chunk in ctx.chunks(torch.arange(batch * positions, device=inputs.device)):
                b, p = chunk // positions, chunk % positions
                hidden = masks[p].unsqueeze(1)
                occluded[chunk] = measure(torch.where(hidden, base[b], inputs[b]), b)
        if self.categorical:
            return self._label_map(occluded.view(batch, positions), height, width, patch, targets.shape[1])
        drop = clean[:, None, :] - occluded.view(batch, positions, -1)  # (B, P, R)
        covered = masks.flatten(1).float()  # (P, H*W)
        total = torch.einsum("bpr,pn->rbn", drop, covered)
        return (total / covered.sum(0)).view(-1, batch, height, width).expand(targets.shape[1], -1, -1, -1)

    def _measure(self, ctx: ModelContext):  # noqa: ANN202 - a closure over the clean batch
        """score(inputs (N, 3, H, W), sample (N,)) -> (N, R) or (N, 1): what the occluder changes."""
        import torch

        targets = ctx.targets.T  # (B, R)
        if self.target == "class":
            return lambda x, b: ctx.forward(x).float().softmax(-1).gather(1, targets[b])
        if self.target == "winner":
            return lambda x, b: ctx.forward(x).argmax(-1, keepdim=True)
        if ctx.layer_forward is None:
            raise UsageError("--occlusion-target feature needs a layer (--layer)")
        with torch.inference_mode():
            acts = ctx.layer_forward(ctx.inputs).float()  # (B, C, h, w)
        strongest = acts.flatten(2).amax(2).argmax(1)  # (B,): the channel with the largest activation
        self.strongest = strongest

        def feature_total(x: Tensor, b: Tensor) -> Tensor:
            occluded = ctx.layer_forward(x).float()
            return occluded[torch.arange(len(b), device=b.device), strongest[b]].sum((1, 2))[:, None]

        return feature_total

    def _label_map(self, winners: Tensor, height: int, width: int, patch: int, ranks: int) -> Tensor:
        """(B, P) winning class per position -> (R, B, H, W) class index of the position whose
        patch centre is nearest to each pixel (per axis), as floats."""
        import torch

        device = winners.device
        ys = patch_starts(height, patch, self.stride, device) + (patch - 1) / 2
        xs = patch_starts(width, patch, self.stride, device) + (patch - 1) / 2
        row = (torch.arange(height, device=device)[:, None] - ys[None]).abs().argmin(1)  # (H,)
        col = (torch.arange(width, device=device)[:, None] - xs[None]).abs().argmin(1)  # (W,)
        grid = winners.view(-1, len(ys), len(xs))
        labels = grid[:, row][:, :, col].float()  # (B, H, W)
        return labels.unsqueeze(0).expand(ranks, -1, -1, -1)
