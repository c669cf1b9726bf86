"""The anchors' methods in camcli: each one's cost per image as a multiple of one forward,
next to the anchor's on the same model, layer, input and settings, measured in one run.

    python benchmarks/bench_methods.py            # ~10 min on a busy 2-core CPU
    python benchmarks/bench_methods.py --quick    # one round, a smoke run

Random-weight ResNet-18, a batch of 2 seeded inputs at 96 px, layer4 for gradient CAMs and
layer3 (256 channels) for the methods with one forward per channel; the settings (below)
are smaller than the defaults so that every method fits in a run, and each row names the
extra forwards its settings imply. "x forward" = the method's time per batch / one
inference-mode forward of the same batch. Contenders run interleaved, round after round,
each keeping its best time (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import best_times  # noqa: E402  (benchmarks/bench.py, beside this script)

from camcli.engine import Explainer, TargetSpec  # noqa: E402
from camcli.methods import parse_methods  # noqa: E402
from camcli.models import IMAGENET_MEAN, IMAGENET_STD, InputSpec, load_model, resolve_layer  # noqa: E402

CPU = torch.device("cpu")
SIZE = 96
BATCH = 2
CHUNK = 64

# camcli method, its settings, its layer, extra forwards per image the settings imply
CASES: list[tuple[str, dict[str, object], str, str]] = [
    ("gradcam", {}, "layer4", "0 (+ partial backward)"),
    ("input-x-gradient", {}, "layer4", "0 (+ full backward)"),
    ("integrated-gradients", {"steps": 16, "baseline": "mean"}, "layer4", "16 + 1 (+ backwards)"),
    ("gradient-shap", {"samples": 16, "baseline": "mean"}, "layer4", "16 (+ backwards)"),
    ("eigengradcam", {}, "layer4", "0 (+ partial backward)"),
    ("kpca-cam", {}, "layer4", "0"),
    ("fullgrad", {}, "layer4", "0 (+ full backward)"),
    ("smoothgradcam++", {"samples": 4}, "layer4", "4 (+ partial backwards)"),
    ("ablationcam", {}, "layer3", "K = 256 (non-zero channels)"),
    ("sscam", {"samples": 1, "std": 2.0}, "layer3", "N x C = 256"),
    ("iscam", {"samples": 2}, "layer3", "N x C = 512"),
    ("rise", {"masks": 256}, "layer4", "256"),
]


def anchors(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The anchors' implementations of the same methods and settings, each on its own copy."""
    found: dict[str, Callable[[], object]] = {}
    target_list = [int(t) for t in targets]
    try:
        import captum.attr as captum_attr
    except ImportError:
        captum_attr = None
    if captum_attr is not None:
        ig = captum_attr.IntegratedGradients(copy.deepcopy(model))
        found["integrated-gradients"] = lambda: ig.attribute(
            x, target=targets, n_steps=16, internal_batch_size=CHUNK, baselines=torch.zeros_like(x)
        )
        ixg = captum_attr.InputXGradient(copy.deepcopy(model))
        found["input-x-gradient"] = lambda: ixg.attribute(x.clone().requires_grad_(), target=targets)
        shap = captum_attr.GradientShap(copy.deepcopy(model))
        found["gradient-shap"] = lambda: shap.attribute(x, baselines=torch.zeros_like(x), target=targets, n_samples=16)
    try:
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        pgc = None
    if pgc is not None:
        outputs = [ClassifierOutputTarget(t) for t in target_list]
        for name, cls, layer, kwargs in (
            ("gradcam", pgc.GradCAM, "layer4", {}),
            ("eigengradcam", pgc.EigenGradCAM, "layer4", {}),
            ("kpca-cam", pgc.KPCA_CAM, "layer4", {}),
            ("fullgrad", pgc.FullGrad, "layer4", {}),
            ("ablationcam", pgc.AblationCAM, "layer3", {"batch_size": CHUNK}),
        ):
            copied = copy.deepcopy(model)
            cam = cls(copied, target_layers=[dict(copied.named_modules())[layer]], **kwargs)
            found[name] = lambda cam=cam: cam(input_tensor=x.clone(), targets=outputs)
    try:
        import torchcam.methods as torchcam
    except ImportError:
        torchcam = None
    if torchcam is not None:
        for name, cls, layer, kwargs in (
            ("sscam", torchcam.SSCAM, "layer3", {"num_samples": 1, "std": 2.0, "batch_size": CHUNK}),
            ("iscam", torchcam.ISCAM, "layer3", {"num_samples": 2, "batch_size": CHUNK}),
            ("smoothgradcam++", torchcam.SmoothGradCAMpp, "layer4", {"num_samples": 4}),
        ):
            copied = copy.deepcopy(model).eval()
            extractor = cls(copied, target_layer=layer, input_shape=(3, SIZE, SIZE), **kwargs)

            def run(net: torch.nn.Module = copied, extractor=extractor) -> None:
                scores = net(x)
                extractor(class_idx=target_list, scores=scores)

            found[name] = run
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round (a smoke run)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best of)")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    torch.manual_seed(0)
    loaded = load_model("resnet18", "none", input_size=SIZE)
    model = loaded.model.eval()
    spec = InputSpec(SIZE, IMAGENET_MEAN, IMAGENET_STD)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # not inference_mode: captum's backward needs these as ordinary tensors
        targets = model(x).argmax(1)

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    contenders: dict[str, Callable[[], object]] = {"forward": forward}
    for name, settings, layer, _ in CASES:
        info = resolve_layer(model, layer, spec, CPU)
        explainer = Explainer(copy.deepcopy(model), info, parse_methods(name, settings, spec), chunk_size=CHUNK)
        contenders[name] = lambda e=explainer: e.explain(x, TargetSpec())
    found = anchors(model, x, targets)
    contenders |= {f"anchor {name}": run for name, run in found.items()}
    times = best_times(contenders, rounds)
    base = times["forward"]
    print(f"## resnet18 (random weights), batch {BATCH}, {SIZE} px, chunk {CHUNK}, best of {rounds} rounds\n")
    print(f"one forward: {base * 1e3:.1f} ms per batch\n")
    print("| method | settings | layer | extra forwards per image | camcli x forward | anchor x forward |")
    print("|---|---|---|---|---|---|")
    for name, settings, layer, extra in CASES:
        shown = ", ".join(f"{k}={v}" for k, v in settings.items()) or "-"
        anchor = times.get(f"anchor {name}")
        anchor_cell = "-" if anchor is None else f"{anchor / base:.1f}"
        print(f"| `{name}` | {shown} | {layer} | {extra} | {times[name] / base:.1f} | {anchor_cell} |")


if __name__ == "__main__":
    main()
