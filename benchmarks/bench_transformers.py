"""The attention methods' cost on a vision transformer, as ratios measured in one run.

    python benchmarks/bench_transformers.py              # vit_b_16 (random weights), batch 4, 224 px
    python benchmarks/bench_transformers.py --quick      # a smoke run: batch 1, 2 rounds

For each method: camcli's batch time / forward-only time (inference_mode, torchvision's own
fused attention), and for LeGrad torchcam 0.5.0's `LeGrad` on all blocks beside it, with the
Pearson of the two maps. LeGrad needs one forward that keeps the attention probabilities
(explicit attention instead of the fused kernel) and one small backward per block; rollout
needs only the forward; gradient-weighted rollout one backward to every block's attention.

The machine is shared and noisy: contenders run interleaved, round after round, and each
keeps its best time, so a burst of load slows one round, not one contender.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import best_times  # noqa: E402

from camcli.engine import Explainer, TargetSpec  # noqa: E402
from camcli.methods import parse_methods  # noqa: E402
from camcli.models import LayerInfo  # noqa: E402

try:
    import torchcam.methods as torchcam_methods
except ImportError:  # the optional anchor
    torchcam_methods = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="batch 1, 2 rounds")
    args = parser.parse_args()
    batch, rounds = (1, 2) if args.quick else (args.batch, args.rounds)

    from torchvision.models import vit_b_16

    torch.manual_seed(0)
    model = vit_b_16(weights=None).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
    inputs = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    layer = LayerInfo("encoder.layers.encoder_layer_11.ln_1", False, 768, (1, 1), 1000, None)  # read by no method here
    explainers = {
        name: Explainer(model, layer, parse_methods(name), channels_last=False)
        for name in ("legrad", "rollout", "grad-rollout")
    }

    def forward() -> None:
        with torch.inference_mode():
            model(inputs)

    contenders: dict[str, Callable[[], object]] = {"forward": forward}
    for name, explainer in explainers.items():
        contenders[f"camcli {name}"] = lambda e=explainer: e.explain(inputs, TargetSpec())
    pearson = None
    if torchcam_methods is not None:

        def torchcam_legrad() -> torch.Tensor:  # hooks on for the call only, as camcli's
            with torchcam_methods.LeGrad(model, list(model.encoder.layers)) as extractor:
                scores = model(inputs)
                return extractor(scores.argmax(1).tolist(), scores)[0]

        contenders["torchcam LeGrad"] = torchcam_legrad
        ours = explainers["legrad"].explain(inputs, TargetSpec()).explanations[0].maps
        theirs = torchcam_legrad()
        pearson = float(np.corrcoef(ours.flatten().double().numpy(), theirs.flatten().double().numpy())[0, 1])

    best = best_times(contenders, rounds)
    print(
        f"vit_b_16 (random weights), batch {batch}, 224 px, best of {rounds} interleaved rounds; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    base = best["forward"]
    print(f"{'contender':<22}{'s / batch':>12}{'/ forward':>12}")
    for name, seconds in best.items():
        print(f"{name:<22}{seconds:>12.3f}{seconds / base:>12.2f}")
    if pearson is not None:
        print(f"Pearson(camcli legrad, torchcam LeGrad) = {pearson:.5f}")


if __name__ == "__main__":
    main()
