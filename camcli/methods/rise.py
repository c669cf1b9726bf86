"""RISE: Petsiuk, Das, Saenko, "RISE: Randomized Input Sampling for Explanation of
Black-box Models", BMVC 2018.

S(x) = 1 / (N p) sum_i P_c(I ⊙ M_i) M_i(x) (eq. 6, Monte Carlo with E[M] = p): N random
masks M_i, each a `cells` x `cells` grid of Bernoulli(p) cells upsampled bilinearly to
(cells + 1) x the cell size and cropped at a random shift (section 3.2), so the mask is
smooth and not aligned to the grid; P_c the target's softmax probability on the masked
image (masked pixels become 0 in normalised input, the dataset mean). The grids and
shifts come from a seeded generator and do not depend on `--chunk-size`; each mask is
made when its chunk runs, and all (image, mask) pairs of a batch run in chunks of
`--chunk-size` forwards under `inference_mode`. Every target rank reads the same forwards.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import ModelContext, PerturbationMethod, Setting

if TYPE_CHECKING:
    import torch
    from torch import Tensor


def mask_draws(count: int, cells: int, p: float, seed: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The random part of RISE's masks: (N, cells, cells) grids in {0, 1} and (N, 2) shifts in [0, 1)."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    grids = (torch.rand(count, cells, cells, generator=generator) < p).float()
    shifts = torch.rand(count, 2, generator=generator)
    return grids.to(device), shifts.to(device)


def make_masks(grids: Tensor, shifts: Tensor, height: int, width: int) -> Tensor:
    """(N, H, W) smooth masks: each grid upsampled bilinearly to (cells + 1) cells of
    ceil(H / cells) x ceil(W / cells) pixels, then an H x W window at its shift."""
    import torch
    import torch.nn.functional as F

    cells = grids.shape[-1]
    cell_h, cell_w = math.ceil(height / cells), math.ceil(width / cells)
    big = F.interpolate(grids[:, None], size=((cells + 1) * cell_h, (cells + 1) * cell_w), mode="bilinear")[:, 0]
    dy = (shifts[:, 0] * cell_h).long()
    dx = (shifts[:, 1] * cell_w).long()
    rows = dy[:, None] + torch.arange(height, device=grids.device)  # (N, H)
    cols = dx[:, None] + torch.arange(width, device=grids.device)  # (N, W)
    index = torch.arange(len(grids), device=grids.device)[:, None, None]
    return big[index, rows[:, :, None], cols[:, None, :]]


@register
class RISE(PerturbationMethod):
    name = "rise"
    title = "RISE (randomized input sampling)"
    paper = "Petsiuk, Das, Saenko, BMVC 2018"
    url = "https://arxiv.org/abs/1806.07421"
    needs = "N forwards (N = masks)"
    cost = "1 + N forwards"
    in_all = False
    settings = (
        Setting("masks", int, 2000, "random masks per image", minimum=1),
        Setting("cells", int, 7, "grid cells per side of a mask", minimum=1),
        Setting(
            "p",
            float,
            0.5,
            "probability that a cell is kept",
            check=lambda p: None if 0 < p <= 1 else "must be in (0, 1]",
        ),
        Setting("seed", int, 0, "seed of the masks (same seed, same map)"),
    )

    def __init__(self, masks: int = 2000, cells: int = 7, p: float = 0.5, seed: int = 0) -> None:
        self.masks = masks
        self.cells = cells
        self.p = p
        self.seed = seed

    def attribute(self, ctx: ModelContext) -> Tensor:
        import torch

        inputs = ctx.inputs
        batch, _, height, width = inputs.shape
        grids, shifts = mask_draws(self.masks, self.cells, self.p, self.seed, inputs.device)
        targets = ctx.targets.T  # (B, R)
        total = torch.zeros(targets.shape[1], batch, height * width, device=inputs.device)
        with torch.inference_mode():
            for chunk in ctx.chunks(torch.arange(batch * self.masks, device=inputs.device)):
                b, m = chunk // self.masks, chunk % self.masks
                masks = make_masks(grids[m], shifts[m], height, width)  # (n, H, W)
                probs = ctx.forward(inputs[b] * masks[:, None].to(inputs.dtype)).float().softmax(-1)
                scores = probs.gather(1, targets[b])  # (n, R)
                for rank in range(targets.shape[1]):
                    total[rank].index_add_(0, b, scores[:, rank, None] * masks.flatten(1).float())
        return (total / (self.masks * self.p)).view(-1, batch, height, width)
