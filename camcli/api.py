"""The Python API: the CLI's engine for code and notebooks.

    from camcli import explain, load_model, list_methods

    model = load_model("resnet50", weights="IMAGENET1K_V2")
    results = explain(["cat.jpg", pil_image, rgb_array], methods="gradcam,scorecam", model=model)
    heat = results[0].heatmap("gradcam")  # float32 (H, W) in [0, 1], at the image's size

Images go through exactly what `camcli explain` does to a file (the same plan,
`camcli.run.plan.prepare`, and the same stages, `camcli.run.stages`), so a heatmap here
equals the `.npy` that `--save-heatmap` writes for the same image.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from camcli.errors import UsageError
from camcli.io import InputItem, decode_image, encode_image, json_text
from camcli.methods import list_methods
from camcli.methods.base import GRADIENT, LABELS, TILES
from camcli.models import DEFAULT_MODEL, LoadedModel, load_model
from camcli.render import colorize, comparison_grid, gradient_image, heatmap_at_size, labels_at_size, overlay, tile_grid
from camcli.run.plan import ExplainConfig, prepare
from camcli.run.stages import Decoded, MapResult, Outcome, build_record, explain_batch, preprocess

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
    # float32 at the image's size: (H, W) in [0, 1] for heatmaps, raw (H, W, 3) for input
    # gradients, class indices (H, W) for label maps; tiles: (N, h, w) at the layer's size
    heatmap: np.ndarray
    flat: bool  # the map had no variation (then all zeros)
    kind: str = "heatmap"  # camcli.methods.base.KINDS
    metrics: dict[str, Any] | None = None  # metrics=True: the JSON's metrics of this map


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
            if e.kind == GRADIENT:
                picture = gradient_image(e.heatmap)
            elif e.kind == TILES:
                picture = tile_grid(colorize(e.heatmap, colormap))
            elif e.kind == LABELS:  # class indices: each class its own shade of the colormap
                picture = overlay(self.image, e.heatmap / max(float(e.heatmap.max()), 1.0), colormap, alpha)
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
    chunk_size: int | None = None,
    labels: str | Path | Sequence[str] | None = None,
    score: str | None = None,
    threshold: float = 0.5,
    settings: Mapping[str, Any] | None = None,
    precision: str = "fp32",
    metrics: bool = False,
    steps: int = 20,
    substrate: str = "zero",
    contrast: int | str | None = None,
    smooth: str | None = None,
) -> list[ImageResult]:
    """Explain images with one or more methods; one `ImageResult` per image, in order.

    `images` is one image or a sequence (a 4-D array or tensor is a batch). `model`
    is a `--model` name or a `load_model` result (reuse it across calls: loading costs
    more than explaining a few images); `weights`, `labels` apply to a name only.
    `target` (a class index or name, or ``"positive"`` with `threshold`) and `topk` work as
    `--target` and `--topk`, `score` as `--score`, `contrast` and `smooth` as `--contrast`
    and `--smooth`. `settings` are methods' settings as `--set` takes them,
    `{"rise.masks": 500}`. `layer` and `fuse` as `--layer` (auto, fine, a name, a,b) and
    `--fuse` (mean, product); `precision` as `--precision` (fp32, bf16, fp16); `metrics`,
    `steps` and `substrate` as `--metrics`, `--steps`, `--substrate` (each explanation's
    `metrics`).
    Errors are `camcli.errors.CamcliError`s with the CLI's messages.
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model, weights, labels=labels)
    config = ExplainConfig(
        model=loaded.name,
        weights=weights,
        methods=methods if isinstance(methods, str) else ",".join(methods),
        settings=dict(settings or {}),
        layer=layer,
        fuse=fuse,
        target=None if target is None else str(target),
        topk=topk,
        threshold=threshold,
        score=score,
        contrast=None if contrast is None else str(contrast),
        smooth=smooth,
        precision=precision,
        chunk_size=chunk_size,
        metrics=metrics,
        steps=steps,
        substrate=substrate,
        device=device,
        batch_size=batch_size,
    )
    config.check()
    prepared = prepare(config, loaded=loaded)
    given = _as_list(images)
    rgb = [_as_rgb(image) for image in given]
    results: list[ImageResult] = []
    with prepared.explainer.session():  # the model converted once for all batches, restored after
        for start in range(0, len(rgb), batch_size):
            decoded = []
            for i, image in enumerate(rgb[start : start + batch_size]):
                source = given[start + i]
                name = str(source) if isinstance(source, (str, os.PathLike)) else f"image{start + i}"
                decoded.append(Decoded(InputItem(Path(name), name), image, preprocess(image, loaded.input)))
            for outcome in explain_batch(prepared, decoded):
                results.append(_result(outcome, loaded, build_record(prepared, outcome)))
    return results


def _result(outcome: Outcome, loaded: LoadedModel, record: dict[str, Any]) -> ImageResult:
    image = outcome.image
    assert image is not None
    predictions = [Prediction(c, loaded.label(c), s) for c, s in outcome.predictions]
    explanations = [
        Explanation(
            method=m.method,
            layer=m.layer,
            target=Prediction(m.target, loaded.label(m.target), m.score),
            heatmap=_at_size(m, image),
            flat=m.flat,
            kind=m.kind,
            metrics=m.metrics,
        )
        for m in outcome.maps
    ]
    return ImageResult(image, predictions, explanations, record)


def _at_size(m: MapResult, image: np.ndarray) -> np.ndarray:
    """The map as the CLI's `.npy` holds it: at the image's size (tiles at the layer's)."""
    height, width = image.shape[:2]
    if m.kind == TILES:
        return m.map.astype(np.float32)
    if m.kind == LABELS:
        return labels_at_size(m.map, width, height)
    return heatmap_at_size(m.map, width, height).astype(np.float32)


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
