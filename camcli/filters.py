"""What a layer's filters respond to: activation maximisation and first-layer kernels.

Activation maximisation (Erhan et al. 2009; Simonyan et al. 2014; the regularised
form of Yosinski et al., "Understanding Neural Networks Through Deep Visualization",
ICML-DL 2015): start from a grey image with a little noise and follow the gradient of
the mean activation of channel k of the layer, with random jitter (a shift of up to
`jitter` pixels each step) and a small Gaussian blur every `blur_every` steps, so the
result shows a pattern rather than high-frequency noise. The first N channels are
optimised together, one image per channel in one batch (the model is in eval mode, so
the images do not interact). The forward stops at the layer: nothing after it runs.

The defaults (64 px, 48 Adam steps, lr 0.05 in [0, 1] pixel space) keep a CPU run
for a middle layer of the default model under a minute (about 30 s for `_blocks.5` on
a busy 2-core CPU, loading included); more steps and pixels give crisper patterns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from camcli.errors import UsageError

if TYPE_CHECKING:  # torch is imported by the functions that compute: `camcli --help` reads AscentOptions
    import numpy as np
    from torch import Tensor, nn

    from camcli.models import InputSpec, LayerInfo
    from camcli.models.layouts import Layout


@dataclass(frozen=True)
class AscentOptions:
    """Gradient-ascent settings (see the module docstring for the defaults' reasons)."""

    steps: int = 48
    size: int = 64
    lr: float = 0.05
    jitter: int = 4
    blur_every: int = 4
    blur_sigma: float = 0.5
    noise: float = 0.02  # std of the start image's noise around grey (0.5)
    seed: int = 0


def maximise_channels(
    model: nn.Module,
    layer: str,
    channels: Tensor,
    spec: InputSpec,
    options: AscentOptions = AscentOptions(),  # noqa: B008 - frozen dataclass
    layout: Layout | None = None,
) -> Tensor:
    """(N, 3, S, S) images in [0, 1], image i maximising the mean of `channels[i]` (the layer
    read as (B, C, h, w) by its detected `layout`)."""
    import torch
    from torchvision.transforms.functional import gaussian_blur

    from camcli.engine import frozen, layer_output
    from camcli.models.layouts import NCHW_DEFAULT

    layout = layout or NCHW_DEFAULT

    modules = dict(model.named_modules())
    if layer not in modules:
        raise UsageError(f"no layer named {layer!r} in the model (`camcli layers` lists them)")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(options.seed)
    count = len(channels)
    shape = (count, 3, options.size, options.size)
    image = 0.5 + options.noise * torch.randn(shape, generator=generator, device=device)
    image.requires_grad_(True)
    optimiser = torch.optim.Adam([image], lr=options.lr)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    rows = torch.arange(count, device=device)
    channels = channels.to(device)
    with frozen(model):
        for step in range(options.steps):
            dy, dx = torch.randint(-options.jitter, options.jitter + 1, (2,), generator=generator, device=device)
            shifted = torch.roll(image, (int(dy), int(dx)), dims=(2, 3))
            with torch.enable_grad():
                raw = layer_output(model, modules[layer], (shifted - mean) / std)
                acts = layout.to_map(raw, (options.size, options.size))
                objective = acts[rows, channels].mean(dim=(1, 2)).sum()
                (gradient,) = torch.autograd.grad(objective, image)
            image.grad = -gradient  # ascent
            optimiser.step()
            with torch.no_grad():
                image.clamp_(0.0, 1.0)
                if options.blur_every and (step + 1) % options.blur_every == 0:
                    image.copy_(gaussian_blur(image, [3, 3], [options.blur_sigma] * 2))
    return image.detach()


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The first convolution that reads the RGB input, with its name."""
    from torch import nn

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and module.groups == 1:
            return name, module
    raise UsageError("the model has no convolution with 3 input channels")


def first_conv_kernels(model: nn.Module) -> Tensor:
    """(C, 3, k, k) weights of the first convolution that reads the RGB input."""
    return first_conv(model)[1].weight.detach()


# Dead first-layer features (Zeiler & Fergus, section 4.1 and fig. 6: filters that are
# nearly zero or without structure). A kernel is
# - "zero" when its L2 norm is under ZERO_FRACTION of the median kernel norm of the layer
#   (it barely responds to anything, next to its siblings), and
# - "uniform" when under UNIFORM_FRACTION of its L2 norm is spatial structure,
#   ||w - spatial mean of w|| / ||w|| (per colour plane): it sees only the mean colour of
#   its window, a grey or flat-colour tile in the kernel grid.
ZERO_FRACTION = 0.05
UNIFORM_FRACTION = 0.1


def dead_kernels(weight: Tensor) -> list[dict[str, object]]:
    """Per kernel of a (C, 3, k, k) weight: its norm, its structure fraction, and whether
    it is dead ("zero", "uniform" or None), by the thresholds above."""
    w = weight.detach().float().flatten(2)  # (C, 3, k*k)
    norm = w.flatten(1).norm(dim=1)
    structure = (w - w.mean(2, keepdim=True)).flatten(1).norm(dim=1) / norm.clamp(min=1e-12)
    median = norm.median()
    kernels = []
    for c in range(len(w)):
        dead = None
        if norm[c] < ZERO_FRACTION * median:
            dead = "zero"
        elif structure[c] < UNIFORM_FRACTION:
            dead = "uniform"
        kernels.append({"index": c, "norm": float(norm[c]), "structure": float(structure[c]), "dead": dead})
    return kernels


def kernels_report(model: nn.Module) -> dict[str, object]:
    """What `camcli filters --kernels` writes as JSON: every first-layer kernel, the dead ones listed."""
    name, conv = first_conv(model)
    kernels = dead_kernels(conv.weight)
    return {
        "layer": name,
        "shape": list(conv.weight.shape),
        "thresholds": {
            "zero": f"L2 norm < {ZERO_FRACTION} x the median kernel norm",
            "uniform": f"||w - spatial mean of w|| / ||w|| < {UNIFORM_FRACTION}",
        },
        "dead": [k["index"] for k in kernels if k["dead"] is not None],
        "kernels": kernels,
    }


def stretch(images: Tensor, low: float = 0.01, high: float = 0.99) -> Tensor:
    """Per image contrast stretch between two quantiles, to [0, 1]: the optimised
    patterns (and kernels) use a small range, and each tile is read on its own."""
    import torch

    flat = images.flatten(1).float()
    q = torch.quantile(flat, torch.tensor([low, high], device=flat.device), dim=1)  # (2, N)
    lo, hi = q[0][:, None], q[1][:, None]
    return ((flat - lo) / (hi - lo).clamp(min=1e-8)).clamp(0.0, 1.0).view_as(images)


def _rgb(images: Tensor) -> np.ndarray:
    """(N, 3, h, w) in [0, 1] -> (N, h, w, 3) uint8, converted once for the writer."""
    import torch

    return images.permute(0, 2, 3, 1).mul(255.0).round().to(torch.uint8).cpu().numpy()


def filter_grid(model: nn.Module, layer: LayerInfo, spec: InputSpec, count: int, options: AscentOptions) -> np.ndarray:
    """The grid PNG of `camcli filters --layer`: channels 0..count-1, row by row."""
    import torch

    from camcli.render import tile_grid  # numpy: not at import time (`camcli --help` reads AscentOptions)

    channels = torch.arange(min(count, layer.channels))
    images = maximise_channels(model, layer.name, channels, spec, options, layer.layout)
    return tile_grid(_rgb(stretch(images)))


def kernel_grid(model: nn.Module, dead: Sequence[int] = ()) -> np.ndarray:
    """The first convolution's kernels as RGB tiles, each min-max scaled on its own; the
    `dead` ones framed in red."""
    from camcli.render import tile_grid

    tiles = _rgb(stretch(first_conv_kernels(model), 0.0, 1.0))
    scale = max(1, math.ceil(32 / max(tiles.shape[1:3])))
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    for index in dead:
        tiles[index, [0, 1, -2, -1], :] = (255, 0, 0)
        tiles[index, :, [0, 1, -2, -1]] = (255, 0, 0)
    return tile_grid(tiles, min_side=32)
