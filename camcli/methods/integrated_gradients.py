"""Integrated Gradients: Sundararajan, Taly, Yan, "Axiomatic Attribution for Deep
Networks", ICML 2017.

IG_i(x) = (x_i - x'_i) * integral_0^1 d F(x' + a (x - x')) / d x_i da (eq. 1), the path
integral of the target logit's gradient from a baseline x' to the input, approximated
with `steps` Gauss-Legendre points on [0, 1] (as captum's default). Completeness
(proposition 1): sum_i IG_i = F(x) - F(x'); the JSON reports both sides and their
difference per image (`details`), a check of the approximation (more steps, smaller
error). The map is the attributions summed over colours (the engine keeps the positive
part). The baseline: `black` (the paper's), `mean` (the dataset mean, i.e. zero
normalised input, captum's default) or `blur` (the image blurred, Sturmfels et al. 2020).
All steps x images run in chunks of `--chunk-size` inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.errors import UsageError
from camcli.methods import register
from camcli.methods.base import GradientContext, InputGradientMethod, Setting, colour_or, colour_to_input

if TYPE_CHECKING:
    from torch import Tensor

BASELINE = Setting(
    "baseline",
    str,
    "black",
    "where the path starts: black, mean (dataset mean), blur, or R,G,B in 0-255",
    choices=("black", "mean", "blur", "R,G,B"),
    parse=colour_or("black", "mean", "blur"),
    to_input=colour_to_input,
)


def baseline_image(inputs: Tensor, baseline: str | tuple[float, ...], method: str) -> Tensor:
    """(B, 3, H, W) baseline in normalised input units: a colour, the dataset mean (0) or a blur."""
    import torch
    from torchvision.transforms.functional import gaussian_blur

    if baseline == "mean":
        return torch.zeros_like(inputs)
    if baseline == "blur":  # sigma = 1/8 of the side: shapes gone, colours kept
        sigma = max(min(inputs.shape[-2:]) / 8, 0.5)
        kernel = min(2 * round(3 * sigma) + 1, 2 * (min(inputs.shape[-2:]) // 2) - 1)
        return gaussian_blur(inputs, [kernel, kernel], [sigma, sigma])
    if isinstance(baseline, str):
        raise UsageError(f"{method}: baseline {baseline} needs the model's input normalisation (pass input_spec)")
    colour = torch.tensor(baseline, device=inputs.device, dtype=inputs.dtype)
    return colour.view(1, 3, 1, 1).expand_as(inputs)


@register
class IntegratedGradients(InputGradientMethod):
    name = "integrated-gradients"
    title = "Integrated Gradients"
    paper = "Sundararajan, Taly, Yan, ICML 2017"
    url = "https://arxiv.org/abs/1703.01365"
    needs = "gradient to the input"
    cost = "n forwards + full backwards (steps), in chunks"
    in_all = False
    settings = (Setting("steps", int, 32, "points on the path (Gauss-Legendre)", minimum=1), BASELINE)

    def __init__(self, steps: int = 32, baseline: str | tuple[float, ...] = "black") -> None:
        self.steps = steps
        self.baseline = baseline

    def _path(self, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Baseline (B, 3, H, W), points a (S,) and weights (S,) of the quadrature on [0, 1]."""
        import numpy as np
        import torch

        nodes, weights = np.polynomial.legendre.leggauss(self.steps)
        alphas = torch.tensor(0.5 * (nodes + 1), device=inputs.device, dtype=inputs.dtype)
        steps = torch.tensor(0.5 * weights, device=inputs.device, dtype=inputs.dtype)
        return baseline_image(inputs, self.baseline, self.name), alphas, steps

    def inputs_for(self, inputs: Tensor) -> Tensor:
        base, alphas, _ = self._path(inputs)
        return base + alphas.view(-1, 1, 1, 1, 1) * (inputs - base)

    def attributions(self, ctx: GradientContext) -> Tensor:
        """(B, 3, H, W) IG_i of every input value."""
        base, _, steps = self._path(ctx.inputs)
        return (ctx.inputs - base) * (steps.view(-1, 1, 1, 1, 1) * ctx.gradients).sum(0)

    def finish(self, ctx: GradientContext) -> Tensor:
        return self.attributions(ctx).sum(1)

    def details(self, ctx: GradientContext, result: Tensor) -> dict[str, Tensor]:
        import torch

        base, _, _ = self._path(ctx.inputs)
        with torch.inference_mode():
            at_base = torch.cat([ctx.forward(chunk) for chunk in base.split(ctx.chunk_size)]).float()
        pick = ctx.targets[:, None]
        difference = (ctx.logits.float().gather(1, pick) - at_base.gather(1, pick)).squeeze(1)
        total = result.flatten(1).sum(1).float()
        return {
            "attribution_sum": total,
            "logit_difference": difference,
            "completeness_error": (total - difference).abs(),
        }
