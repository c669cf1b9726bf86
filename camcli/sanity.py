"""Sanity checks for saliency maps: Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018.

* Model-parameter randomisation, cascading: the parameters of the model's blocks are
  replaced by random values block by block, from the head down to the first layer, and
  after each step every method's map is compared with its map on the trained model
  (Spearman rank correlation and SSIM). A map that explains the model must change; one
  that stays put shows the image (edges), not what the model learned.
* Random logit: each image is also explained for a random other class. A class-sensitive
  method's map must change; a class-agnostic one (Eigen-CAM) cannot.

Everything runs on a deep copy of the model: the caller's model is only read. A block is
a top-level child of the model, or a child of a top-level Sequential / ModuleList
(`_blocks.3`, `layer2.1`, `features.4`), in the order their parameters are defined.
"Random" keeps each tensor's scale: its values are drawn from a Gaussian with the
tensor's own mean and standard deviation (seeded), so activations stay in range and the
maps stay defined; buffers (batch-norm statistics) are kept.

Maps are compared at the model input's size: CAM maps upsampled bilinearly, input
gradients as max_c |g_c| (as `camcli.metrics.saliency`). Spearman uses average ranks
for ties (a relu'd map has many zeros); SSIM is Wang et al. (2004) with an 11-px
Gaussian window, sigma 1.5, data range 1.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camcli.engine import Explainer, TargetSpec
from camcli.methods import Method
from camcli.metrics import saliency, upsample
from camcli.models import LayerInfo
from camcli.render import LABEL_COLOURS

#: A method passes a test when the mean rank correlation of its changed map with the
#: original falls below this (Adebayo et al. judge by eye; 0.5 is "clearly different").
PASS_BELOW = 0.5


@dataclass
class SanityResult:
    methods: list[str]
    steps: list[str]  # "none", then the block randomised at each step (cumulative), head first
    images: list[str]
    # method -> (steps, images) similarity of the map after each step to the original
    spearman: dict[str, list[list[float]]] = field(default_factory=dict)
    ssim: dict[str, list[list[float]]] = field(default_factory=dict)
    # method -> (images,) similarity of the random-class map to the target's map
    logit_spearman: dict[str, list[float]] = field(default_factory=dict)
    logit_ssim: dict[str, list[float]] = field(default_factory=dict)
    targets: list[int] = field(default_factory=list)
    random_classes: list[int] = field(default_factory=list)

    def mean_curve(self, method: str, metric: str = "spearman") -> list[float]:
        rows = (self.spearman if metric == "spearman" else self.ssim)[method]
        return [sum(r) / len(r) for r in rows]

    def passes(self, method: str) -> tuple[bool, bool]:
        """(model randomisation, random logit): the fully randomised map, and the random
        class's map, have mean Spearman below PASS_BELOW."""
        model_test = self.mean_curve(method)[-1] < PASS_BELOW
        values = self.logit_spearman[method]
        return model_test, sum(values) / len(values) < PASS_BELOW

    def to_json(self) -> dict[str, Any]:
        methods = {}
        for m in self.methods:
            model_ok, logit_ok = self.passes(m)
            methods[m] = {
                "spearman": self.mean_curve(m, "spearman"),
                "ssim": self.mean_curve(m, "ssim"),
                "spearman_per_image": self.spearman[m],
                "ssim_per_image": self.ssim[m],
                "random_logit": {
                    "spearman": self.logit_spearman[m],
                    "ssim": self.logit_ssim[m],
                },
                "passes_model_randomisation": model_ok,
                "passes_random_logit": logit_ok,
            }
        return {
            "test": "Adebayo et al. 2018: cascading model-parameter randomisation and random logit",
            "pass_below": PASS_BELOW,
            "steps": self.steps,
            "images": self.images,
            "targets": self.targets,
            "random_classes": self.random_classes,
            "methods": methods,
        }


def blocks(model: nn.Module) -> list[str]:
    """The model's parameterised blocks (names), in the order their parameters are defined."""
    children = dict(model.named_children())
    found: dict[str, None] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        top = children.get(parts[0])
        depth = 2 if isinstance(top, nn.Sequential | nn.ModuleList) and len(parts) > 2 else 1
        found[".".join(parts[:depth])] = None
    return list(found)


def randomise(model: nn.Module, block: str, generator: torch.Generator) -> None:
    """Replace every parameter under `block` by Gaussian values of its own mean and std."""
    prefix = block + "."
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(prefix):
                values = param.detach().float()
                std = values.std() if values.numel() > 1 else values.abs().reshape(())
                noise = torch.randn(param.shape, generator=generator).to(param.device)
                param.copy_((values.mean() + std * noise).to(param.dtype))


def comparable(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Engine maps (CAM (B, h, w) or input gradients (B, 3, H, W)) -> (B, *size) in [0, 1]."""
    return upsample(saliency(maps), size)


def average_ranks(values: Tensor) -> Tensor:
    """(M, N) -> (M, N) ranks 0..N-1 of each row, ties sharing their average rank."""
    ranks = torch.empty_like(values, dtype=torch.float64)
    for row, out in zip(values, ranks, strict=True):  # rows are maps: a handful per call
        unique, inverse, counts = torch.unique(row, return_inverse=True, return_counts=True)
        starts = counts.cumsum(0) - counts
        out.copy_((starts.double() + (counts.double() - 1) / 2)[inverse])
    return ranks


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """(M, ...) x (M, ...) -> (M,) Spearman rank correlation per pair (0 where a map is flat)."""
    ra, rb = average_ranks(a.flatten(1)), average_ranks(b.flatten(1))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    denominator = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    return torch.where(denominator > 0, (ra * rb).sum(1) / denominator.clamp(min=1e-300), 0.0).float()


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> Tensor:
    """(M, H, W) x (M, H, W) -> (M,) mean SSIM (Wang et al. 2004), Gaussian window, valid part."""
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    kernel_1d = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel_1d = kernel_1d / kernel_1d.sum()
    kernel = (kernel_1d[:, None] * kernel_1d[None, :]).to(a.device)[None, None]
    x, y = a.double()[:, None], b.double()[:, None]

    def filt(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel)

    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    score = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return score.flatten(1).mean(1).float()


def _maps(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    methods: Sequence[Method],
    inputs: Tensor,
    targets: Sequence[int],
    batch_size: int,
    chunk_size: int,
) -> dict[str, Tensor]:
    """method -> (N, S, S) comparable maps of `inputs` for the given per-image classes."""
    explainer = Explainer(model, list(layers), methods, chunk_size=chunk_size)
    size = tuple(inputs.shape[-2:])
    found: dict[str, list[Tensor]] = {m.name: [] for m in methods}
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        spec = TargetSpec(per_sample=tuple(targets[start : start + batch_size]))
        for e in explainer.explain(batch, spec).explanations:
            found[e.method].append(comparable(e.maps.detach(), size))  # type: ignore[arg-type]
    return {name: torch.cat(parts) for name, parts in found.items()}


def run_sanity(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    methods: Sequence[Method],
    inputs: Tensor,
    names: Sequence[str],
    *,
    seed: int = 0,
    batch_size: int = 8,
    chunk_size: int = 32,
    progress: Any = None,
) -> SanityResult:
    """Both tests for (N, 3, S, S) normalised inputs; `model` itself is never modified."""
    work = copy.deepcopy(model)
    with torch.inference_mode():  # the targets: each image's top-1 on the trained model, in chunks
        logits = torch.cat([work.eval()(chunk).float() for chunk in inputs.split(chunk_size)])
    targets = logits.argmax(1).tolist()
    generator = torch.Generator().manual_seed(seed)
    num_classes = logits.shape[1]
    random_classes = [
        (t + 1 + int(torch.randint(num_classes - 1, (1,), generator=generator))) % num_classes for t in targets
    ]
    order = list(reversed(blocks(work)))
    result = SanityResult([m.name for m in methods], ["none", *order], list(names))
    result.targets, result.random_classes = targets, random_classes
    original = _maps(work, layers, methods, inputs, targets, batch_size, chunk_size)
    other = _maps(work, layers, methods, inputs, random_classes, batch_size, chunk_size)
    for name in result.methods:
        result.logit_spearman[name] = spearman(original[name], other[name]).tolist()
        result.logit_ssim[name] = ssim(original[name], other[name]).tolist()
        result.spearman[name] = [[1.0] * len(inputs)]
        result.ssim[name] = [[1.0] * len(inputs)]
    for block in order:
        randomise(work, block, generator)
        changed = _maps(work, layers, methods, inputs, targets, batch_size, chunk_size)
        for name in result.methods:
            result.spearman[name].append(spearman(original[name], changed[name]).tolist())
            result.ssim[name].append(ssim(original[name], changed[name]).tolist())
        if progress is not None:
            progress()
    return result


def write(result: SanityResult, out_dir: Path, request: dict[str, Any], title: str) -> tuple[Path, Path]:
    """OUT/sanity.json (every number, per image too) and OUT/sanity.png (the curves)."""
    from camcli.io import atomic_write, encode_image, json_bytes

    json_path, png_path = out_dir / "sanity.json", out_dir / "sanity.png"
    atomic_write(json_path, json_bytes({"request": request, **result.to_json()}))
    atomic_write(png_path, encode_image(plot(result, title)))
    return json_path, png_path


def format_table(result: SanityResult) -> list[list[str]]:
    """Rows for the stdout table: method, Spearman and SSIM after the head, half and all of
    the model randomised, the random logit's, and the verdicts."""
    last = len(result.steps) - 1
    half = max(1, last // 2)
    rows = []
    for m in result.methods:
        sp, ss = result.mean_curve(m, "spearman"), result.mean_curve(m, "ssim")
        logit_sp = sum(result.logit_spearman[m]) / len(result.logit_spearman[m])
        logit_ss = sum(result.logit_ssim[m]) / len(result.logit_ssim[m])
        model_ok, logit_ok = result.passes(m)
        rows.append(
            [
                m,
                f"{sp[1]:.2f} / {ss[1]:.2f}",
                f"{sp[half]:.2f} / {ss[half]:.2f}",
                f"{sp[last]:.2f} / {ss[last]:.2f}",
                "pass" if model_ok else "FAIL",
                f"{logit_sp:.2f} / {logit_ss:.2f}",
                "pass" if logit_ok else "FAIL",
            ]
        )
    return rows


# -- the plot ---------------------------------------------------------------------------

_COLOURS = [tuple(int(v) for v in c) for c in LABEL_COLOURS[:10]]  # tab10, RGB: one per method


def plot(result: SanityResult, title: str = "") -> np.ndarray:
    """RGB uint8 picture: Spearman and SSIM against the number of blocks randomised (from the
    head), one line per method, legend with the random-logit Spearman; drawn with OpenCV."""
    import cv2

    panel_w, panel_h, left, right, top, bottom = 620, 440, 70, 20, 50, 150
    width, height = 2 * (left + panel_w + right), top + panel_h + bottom + 30 + 22 * len(result.methods)
    canvas = np.full((height, width, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    black, grey = (0, 0, 0), (215, 215, 215)
    if title:
        cv2.putText(canvas, title, (left, 22), font, 0.6, black, 1, cv2.LINE_AA)
    steps = len(result.steps)
    lo = min(-0.2, *(min(result.mean_curve(m, k)) for m in result.methods for k in ("spearman", "ssim")))
    lo = math.floor(lo * 5) / 5
    for panel, metric in enumerate(("spearman", "ssim")):
        x0 = panel * (left + panel_w + right) + left
        y0 = top

        def point(step: int, value: float, x0: int = x0, y0: int = y0) -> tuple[int, int]:
            x = x0 + round(step * panel_w / max(steps - 1, 1))
            y = y0 + round((1.0 - value) / (1.0 - lo) * panel_h)
            return x, y

        tick = lo
        while tick <= 1.0 + 1e-9:
            _, y = point(0, tick)
            cv2.line(canvas, (x0, y), (x0 + panel_w, y), grey if abs(tick) > 1e-9 else (150, 150, 150), 1)
            cv2.putText(canvas, f"{tick:.1f}", (x0 - 42, y + 5), font, 0.45, black, 1, cv2.LINE_AA)
            tick += 0.2
        cv2.rectangle(canvas, (x0, y0), (x0 + panel_w, y0 + panel_h), black, 1)
        label = (
            "Spearman rank correlation with the original map" if metric == "spearman" else "SSIM with the original map"
        )
        cv2.putText(canvas, label, (x0, y0 - 10), font, 0.55, black, 1, cv2.LINE_AA)
        for step, name in enumerate(result.steps):  # tick labels, vertical: the block randomised last
            x, y = point(step, lo)
            cv2.line(canvas, (x, y), (x, y + 5), black, 1)
            text = name if len(name) <= 18 else name[:17] + "~"
            (tw, th), _ = cv2.getTextSize(text, font, 0.4, 1)
            label_img = np.full((th + 6, tw + 4, 3), 255, np.uint8)
            cv2.putText(label_img, text, (2, th + 2), font, 0.4, black, 1, cv2.LINE_AA)
            label_img = cv2.rotate(label_img, cv2.ROTATE_90_COUNTERCLOCKWISE)
            lh, lw = label_img.shape[:2]
            ys, xs = y + 8, x - lw // 2
            if xs >= 0 and xs + lw <= width and ys + lh <= height:
                canvas[ys : ys + lh, xs : xs + lw] = np.minimum(canvas[ys : ys + lh, xs : xs + lw], label_img)
        axis = "blocks randomised, cumulatively from the head (each tick: the block added)"
        cv2.putText(canvas, axis, (x0, top + panel_h + bottom - 8), font, 0.45, black, 1, cv2.LINE_AA)
        for n, method in enumerate(result.methods):
            colour = _COLOURS[n % len(_COLOURS)]
            points = [point(i, v) for i, v in enumerate(result.mean_curve(method, metric))]
            cv2.polylines(canvas, [np.array(points, np.int32)], False, colour, 2, cv2.LINE_AA)
            for p in points:
                cv2.circle(canvas, p, 3, colour, -1, cv2.LINE_AA)
    y = top + panel_h + bottom + 20
    cv2.putText(canvas, "method (mean over images; random-logit Spearman; verdicts)", (left, y), font, 0.5, black, 1)
    for n, method in enumerate(result.methods):
        y += 22
        colour = _COLOURS[n % len(_COLOURS)]
        cv2.line(canvas, (left, y - 5), (left + 30, y - 5), colour, 3)
        model_ok, logit_ok = result.passes(method)
        logit = sum(result.logit_spearman[method]) / len(result.logit_spearman[method])
        text = (
            f"{method}: randomised model {'pass' if model_ok else 'FAIL'}, "
            f"random logit {logit:.2f} {'pass' if logit_ok else 'FAIL'}"
        )
        cv2.putText(canvas, text, (left + 40, y), font, 0.5, black, 1, cv2.LINE_AA)
    return canvas
