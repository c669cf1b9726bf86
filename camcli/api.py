"""The Python API: the CLI's engine for code and notebooks.

    from camcli import explain, load_model, list_methods

    model = load_model("resnet50", weights="IMAGENET1K_V2")
    results = explain(["cat.jpg", pil_image, rgb_array], methods="gradcam,scorecam", model=model)
    heat = results[0].heatmap("gradcam")  # float32 (H, W) in [0, 1], at the image's size

Images go through exactly what `camcli explain` does to a file (`pipeline.preprocess`,
`engine.Explainer`, `render.heatmap_at_size`), so a heatmap here equals the `.npy`
that `--save-heatmap` writes for the same image.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from camcli.engine import Explainer, parse_target, resolve_device
from camcli.errors import UsageError
from camcli.io import decode_image, encode_image, json_text
from camcli.methods import added_by_all, list_methods, parse_methods
from camcli.models import DEFAULT_MODEL, LoadedModel, check_labels, load_model, resolve_layers
from camcli.pipeline import _kept, _to_numpy, choose_score, image_record, preprocess
from camcli.render import comparison_grid, gradient_image, heatmap_at_size, overlay

__all__ = ["Explanation", "ImageResult", "Prediction", "explain", "list_methods", "load_model"]

#: A path, an RGB array (H, W, 3) uint8 or float in [0, 1], a PIL image, or a tensor
#: (3, H, W) uint8 or float in [0, 1] (torchvision's layout).
ImageLike = str | os.PathLike | np.ndarray | torch.Tensor | Any


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float  # softmax probability (or the sigmoid / logit `score` asks for)


@dataclass(frozen=True)
class Explanation:
    """One method's map for one target, as in the JSON's ``explanations`` plus the array."""

    method: str
    layer: str | None  # None for input-gradient methods
    target: Prediction
    heatmap: np.ndarray  # float32: (H, W) in [0, 1] for CAMs, raw (H, W, 3) for input gradients
    flat: bool  # the map had no variation (then all zeros)


@dataclass(frozen=True)
class ImageResult:
    image: np.ndarray  # the RGB uint8 image that was explained
    predictions: list[Prediction]  # top-5, best first
    explanations: list[Explanation]  # method by method, target rank by rank
    record: dict[str, Any] = field(default_factory=dict, repr=False)  # the CLI's JSON record

    def to_json(self) -> str:
        """The per-image JSON record `camcli explain` writes for this image (camcli/schema;
        its file names are those the CLI would give the overlays)."""
        return json_text(self.record, indent=2)

    def overlays(self, colormap: str = "jet", alpha: float = 0.5) -> np.ndarray:
        """One RGB picture: the image, then each explanation as the CLI renders it, titled."""
        cells: list[Any] = [(self.image, "image", f"top-1: {self.predictions[0].label}")]
        for e in self.explanations:
            if e.heatmap.ndim == 3:
                picture = gradient_image(e.heatmap)
            else:
                picture = overlay(self.image, e.heatmap, colormap, alpha)
            cells.append((picture, e.method, f"{e.target.label} {e.target.score:.1%}"))
        return comparison_grid([cells], min(224, self.image.shape[0]))

    def _repr_png_(self) -> bytes:
        """Notebooks show the overlays inline."""
        return encode_image(self.overlays())

    def heatmap(self, method: str, target: int | None = None) -> np.ndarray:
        """The map of `method` (for class `target`, by default the first one explained)."""
        for e in self.explanations:
            if e.method == method and (target is None or e.target.index == target):
                return e.heatmap
        raise KeyError(f"no {method!r} explanation" + (f" for class {target}" if target is not None else ""))


def explain(
    images: ImageLike | Sequence[ImageLike],
    methods: str | Sequence[str] = "gradcam",
    *,
    model: str | LoadedModel = DEFAULT_MODEL,
    weights: str | None = None,
    layer: str = "auto",
    fuse: str = "mean",
    target: int | str | None = None,
    topk: int | None = None,
    device: str = "auto",
    batch_size: int = 8,
    chunk_size: int = 32,
    labels: str | Path | Sequence[str] | None = None,
    score: str | None = None,
    threshold: float = 0.5,
    settings: Mapping[str, Any] | None = None,
    precision: str = "fp32",
) -> list[ImageResult]:
    """Explain images with one or more methods; one `ImageResult` per image, in order.

    `images` is one image or a sequence (a 4-D array or tensor is a batch). `model`
    is a `--model` name or a `load_model` result (reuse it across calls: loading costs
    more than explaining a few images); `weights`, `labels` apply to a name only.
    `target` (a class index or name, or ``"positive"`` with `threshold`) and `topk` work as
    `--target` and `--topk`, `score` as `--score`.
    `settings` are methods' settings as `--set` takes them, `{"rise.masks": 500}`. `layer`
    and `fuse` as `--layer` (auto, fine, a name, a,b) and `--fuse` (mean, product).
    `target` (a class index or name) and `topk` work as `--target` and `--topk`;
    `precision` as `--precision` (fp32, bf16, fp16).
    Errors are `camcli.errors.CamcliError`s with the CLI's messages.
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model, weights, labels=labels)
    torch_device = resolve_device(device)
    loaded.model.to(torch_device)
    layers = resolve_layers(loaded.model, layer, loaded.input, torch_device, output_key=loaded.output_key)
    info = layers[0]
    check_labels(loaded, info.num_classes, "labels")
    spec = methods if isinstance(methods, str) else ",".join(methods)
    explainer = Explainer(
        loaded.model,
        layers,
        parse_methods(spec, settings, loaded.input),
        chunk_size=chunk_size,
        output_key=loaded.output_key,
        optional=added_by_all(spec),
        fuse=fuse,
    )
    target_spec = parse_target(
        None if target is None else str(target), topk, loaded.categories, info.num_classes, threshold
    )
    score = choose_score(score, target_spec.threshold is not None, info.binary)
    given = _as_list(images)
    rgb = [_as_rgb(image) for image in given]
    request = {
        "model": loaded.name,
        "weights": loaded.weights,
        "layer": explainer.layer_name,
        "input": loaded.input.to_json(),
        "methods": [m.name for m in explainer.methods],
        "target": "top1" if target is None else str(target),
        "topk": topk or 1,
        "heatmap": False,
        "overlay_format": "png",
    }
    results: list[ImageResult] = []
    for start in range(0, len(rgb), batch_size):
        chunk = rgb[start : start + batch_size]
        batch = torch.stack([preprocess(image, loaded.input) for image in chunk]).to(torch_device)
        arrays = _to_numpy(explainer.explain(batch, target_spec), score=score)
        for i, image in enumerate(chunk):
            source = given[start + i]
            name = str(source) if isinstance(source, (str, os.PathLike)) else f"image{start + i}"
            record = image_record(
                loaded, torch_device, request, name, Path(name).name, arrays, i, shape=image.shape, topk=(topk or 1) > 1
            )
            results.append(_result(image, arrays, i, loaded, record))
    return results


def _result(
    image: np.ndarray, arrays: dict[str, Any], i: int, loaded: LoadedModel, record: dict[str, Any]
) -> ImageResult:
    height, width = image.shape[:2]
    predictions = [
        Prediction(int(c), loaded.label(int(c)), float(s))
        for c, s in zip(arrays["top_index"][i], arrays["top_score"][i], strict=True)
    ]
    explanations = []
    for e in _kept(arrays, i):
        index = int(e["targets"][i])
        explanations.append(
            Explanation(
                method=e["method"],
                layer=e["layer"],
                target=Prediction(index, loaded.label(index), float(e["scores"][i])),
                heatmap=heatmap_at_size(e["maps"][i], width, height).astype(np.float32),
                flat=bool(e["flat"][i]),
            )
        )
    return ImageResult(image, predictions, explanations, record)


def _as_list(images: ImageLike | Sequence[ImageLike]) -> list[Any]:
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (str, os.PathLike, np.ndarray, torch.Tensor)) or _is_pil(images):
        return [images]
    return list(images)


def _is_pil(obj: Any) -> bool:
    return type(obj).__module__.startswith("PIL.")


def _as_rgb(image: ImageLike) -> np.ndarray:
    """Any accepted image as RGB uint8 (H, W, 3), the form the CLI decodes files to."""
    if isinstance(image, (str, os.PathLike)):
        return decode_image(Path(image))
    if _is_pil(image):
        return np.array(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise UsageError(f"cannot explain a {type(image).__name__}: give a path, an array, a PIL image or a tensor")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise UsageError(f"an image array must be (H, W), (H, W, 3) or (3, H, W), not {image.shape}")
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.floating):
            raise UsageError(f"image arrays must be uint8 or float in [0, 1], not {image.dtype}")
        image = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])
