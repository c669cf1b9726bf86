"""GradientSHAP: Lundberg, Lee, "A Unified Approach to Interpreting Model Predictions",
NeurIPS 2017, in captum's form (`GradientShap`: expected gradients with input noise).

phi_i = E_{e, a} [ (x~_i - x'_i) * d F(x' + a (x~ - x')) / d x_i ], x~ = x + e, e ~ N(0,
sigma^2) with sigma = `noise` x the input's range, a ~ U(0, 1), estimated from `samples`
draws of a seeded generator (same input, same map); x' the baseline (`black`, `mean`,
`blur` or a colour, as for integrated-gradients). The map is phi summed over colours.
All draws x images run in chunks of `--chunk-size` inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import GradientContext, InputGradientMethod, Setting
from camcli.methods.integrated_gradients import BASELINE, baseline_image

if TYPE_CHECKING:
    from torch import Tensor

SEED = 0


@register
class GradientShap(InputGradientMethod):
    name = "gradient-shap"
    title = "GradientSHAP"
    paper = "Lundberg, Lee, NeurIPS 2017"
    url = "https://arxiv.org/abs/1705.07874"
    needs = "gradient to the input"
    cost = "n forwards + full backwards (samples), in chunks"
    in_all = False
    settings = (
        Setting("samples", int, 20, "random points (noise, baseline-to-input fraction)", minimum=1),
        Setting("noise", float, 0.0, "input noise std as a fraction of the input's range", minimum=0),
        BASELINE,
    )

    def __init__(self, samples: int = 20, noise: float = 0.0, baseline: str | tuple[float, ...] = "black") -> None:
        self.samples = samples
        self.noise = noise
        self.baseline = baseline

    def draws(self, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Noisy inputs (S, B, 3, H, W), fractions a (S, B) and the baseline (B, 3, H, W)."""
        import torch

        generator = torch.Generator(device=inputs.device).manual_seed(SEED)
        flat = inputs.flatten(1)
        sigma = self.noise * (flat.amax(1) - flat.amin(1))
        shape = (self.samples, *inputs.shape)
        noise = torch.randn(shape, generator=generator, device=inputs.device, dtype=inputs.dtype)
        alphas = torch.rand(shape[:2], generator=generator, device=inputs.device, dtype=inputs.dtype)
        noisy = inputs + noise * sigma.view(1, -1, 1, 1, 1)
        return noisy, alphas, baseline_image(inputs, self.baseline, self.name)

    def inputs_for(self, inputs: Tensor) -> Tensor:
        noisy, alphas, base = self.draws(inputs)
        return base + alphas[:, :, None, None, None] * (noisy - base)

    def finish(self, ctx: GradientContext) -> Tensor:
        noisy, _, base = self.draws(ctx.inputs)
        return ((noisy - base) * ctx.gradients).mean(0).sum(1)
