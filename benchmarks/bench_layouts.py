"""Grad-CAM on torchvision's vit_b_16 and swin_t: batch time / forward-only time.

Contenders interleaved, best of several rounds, random weights, 224 px, on the CPU.
Run: PYTHONPATH=. python benchmarks/bench_layouts.py [--batch 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

from camcli.engine import Explainer, TargetSpec
from camcli.methods import parse_methods
from camcli.models import InputSpec, resolve_layer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    spec = InputSpec(224, (0.5,) * 3, (0.5,) * 3)
    inputs = torch.randn(args.batch, 3, 224, 224)
    for name in ("vit_b_16", "swin_t"):
        model = torchvision.models.get_model(name, weights=None).eval()
        torch.nn.init.normal_(model.heads.head.weight if name == "vit_b_16" else model.head.weight, std=0.02)
        info = resolve_layer(model, "auto", spec, torch.device("cpu"))
        explainer = Explainer(model, info, parse_methods("gradcam"))
        x = inputs.contiguous(memory_format=explainer.memory_format)
        forward, gradcam = [], []
        for _ in range(args.rounds):  # interleaved
            start = time.perf_counter()
            with torch.inference_mode():
                model(x)
            forward.append(time.perf_counter() - start)
            start = time.perf_counter()
            explainer.explain(x, TargetSpec())
            gradcam.append(time.perf_counter() - start)
        print(
            f"{name}: layer {info.name} ({info.layout.describe()}); batch {args.batch}: forward {min(forward):.3f} s, "
            f"gradcam {min(gradcam):.3f} s, ratio {min(gradcam) / min(forward):.2f}"
        )


if __name__ == "__main__":
    main()
