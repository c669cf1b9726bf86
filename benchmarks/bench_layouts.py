"""Grad-CAM on torchvision's vit_b_16 and swin_t: batch time / forward-only time.

Contenders interleaved, best of several rounds after one warm-up, random weights, 224 px,
on the CPU. The Grad-CAM pass runs the model as it is up to the layer (frozen weights, no
graph: torchvision's fused attention path) and records the graph from the layer on only.
Beside it, the same pass with autograd's plain graph (no `_LeanGraph`), for comparison.
Run: PYTHONPATH=. python benchmarks/bench_layouts.py [--batch 4] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import best_times, plain_graph  # noqa: E402  (benchmarks/bench.py, beside this script)

from camcli.allocator import reuse_freed_memory  # noqa: E402
from camcli.engine import Explainer, TargetSpec  # noqa: E402
from camcli.methods import parse_methods  # noqa: E402
from camcli.models import InputSpec, resolve_layer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a busy machine")
    args = parser.parse_args()
    reuse_freed_memory()  # as the CLI's process does
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = InputSpec(224, (0.5,) * 3, (0.5,) * 3)
    inputs = torch.randn(args.batch, 3, 224, 224)
    for name in ("vit_b_16", "swin_t"):
        model = torchvision.models.get_model(name, weights=None).eval()
        torch.nn.init.normal_(model.heads.head.weight if name == "vit_b_16" else model.head.weight, std=0.02)
        info = resolve_layer(model, "auto", spec, torch.device("cpu"))
        explainer = Explainer(model, info, parse_methods("gradcam"))
        x = inputs.contiguous(memory_format=explainer.memory_format)

        def forward(model: torch.nn.Module = model, x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                model(x)

        contenders = {
            "forward": forward,
            "gradcam": lambda e=explainer, x=x: e.explain(x, TargetSpec()),
            "plain": lambda e=explainer, x=x: plain_graph(e, x),
        }
        times = best_times(contenders, args.rounds)
        forward_s = times["forward"]
        print(
            f"{name}: layer {info.name} ({info.layout.describe()}); batch {args.batch}: forward {forward_s:.3f} s, "
            f"gradcam {times['gradcam']:.3f} s, ratio {times['gradcam'] / forward_s:.2f} "
            f"(with autograd's plain graph after the layer: {times['plain'] / forward_s:.2f})"
        )


if __name__ == "__main__":
    main()
