"""One typed plan of an explain request, and the one place it becomes a model and an explainer.

`ExplainConfig` is everything a request asks for, frozen and torch-free (a re-run checks
it against earlier JSON before loading anything; the Ray actors receive it pickled).
`prepare(config, device)` loads the model, resolves the layer(s), builds the explainer
and the target: the CLI (explain, compare, evaluate), the Python API and the Ray actors
all call it, so an option added here works everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from camcli.choices import COLORMAPS, FUSIONS, SUBSTRATES
from camcli.errors import UsageError
from camcli.io import DEFAULT_MAX_PIXELS, OVERLAY_FORMATS
from camcli.models.spec import DEFAULT_MODEL

if TYPE_CHECKING:
    import torch

    from camcli.boxes import BoxIndex
    from camcli.engine import Explainer, TargetSpec
    from camcli.methods import Method
    from camcli.metrics import MetricOptions
    from camcli.models import LayerInfo, LoadedModel
    from camcli.resume import Prior, Work


@dataclass(frozen=True)
class ExplainConfig:
    """What `camcli explain` (or `camcli.explain`) is asked to do; the defaults are the CLI's."""

    # the model
    model: str = DEFAULT_MODEL
    weights: str | None = None
    input_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    labels: str | None = None  # a class-name file (one per line, or a JSON list)
    channels: int | None = None  # input channels: 1 (luminance) or 3
    output_key: str | int | None = None  # which output holds the logits
    trust_remote_code: bool = False
    # what to explain, and for which class
    methods: str = "gradcam"  # a comma list, or "all"
    settings: Mapping[str, Any] = field(default_factory=dict)  # {"method.name": value}, as --set gives them
    layer: str = "auto"
    fuse: str = "mean"
    target: str | None = None  # top1 (None), positive, an index or a class name
    topk: int | None = None
    threshold: float = 0.5  # -t positive
    score: str | None = None  # softmax, sigmoid or logit (None: by the head)
    contrast: str | None = None
    smooth: str | None = None
    precision: str = "fp32"
    chunk_size: int | None = None  # extra inputs per forward; None: tuned on the run (camcli.chunking)
    # scores of each map
    metrics: bool = False
    boxes: str | None = None  # a JSON of boxes per image (implies metrics)
    steps: int = 20
    substrate: str = "zero"
    road: bool = False
    # what is written, and where
    out: Path = Path("camcli-out")
    overlay_format: str = "png"
    colormap: str = "jet"
    alpha: float = 0.5
    save_heatmap: bool = False
    save_raw: bool = False  # --save-heatmap raw
    grid: bool = False  # also <name>.grid.png
    grid_only: bool = False  # `camcli compare`: only the grids, no overlays or JSON
    panel_size: int = 224
    box_threshold: float | None = None
    draw_boxes: bool = False
    overwrite: bool = False
    # how the work is run
    device: str = "auto"
    batch_size: int = 8
    workers: int = 2  # decode threads
    max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def positive(self) -> bool:
        return self.target is not None and self.target.lower() == "positive"

    @property
    def scores_maps(self) -> bool:
        return self.metrics or self.boxes is not None

    def check(self) -> list[Method]:
        """Every usage error that needs no model, before anything is loaded or created;
        returns the methods as parsed without the model (their settings checked)."""
        from camcli.methods import parse_methods
        from camcli.precision import PRECISIONS

        if self.colormap not in COLORMAPS:
            raise UsageError(f"unknown colormap {self.colormap!r}; use one of {', '.join(COLORMAPS)}")
        if self.overlay_format not in OVERLAY_FORMATS:
            raise UsageError(f"unknown overlay format {self.overlay_format!r}; use one of {', '.join(OVERLAY_FORMATS)}")
        if self.target is not None and self.topk is not None:
            raise UsageError("--target and --topk exclude each other")
        if self.fuse not in FUSIONS:
            raise UsageError(f"unknown --fuse {self.fuse!r}; use one of {', '.join(FUSIONS)}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}: use {', '.join(PRECISIONS)}")
        if self.substrate not in SUBSTRATES:
            raise UsageError(f"unknown substrate {self.substrate!r}; use one of {', '.join(SUBSTRATES)}")
        if self.boxes is not None and self.topk is not None:
            raise UsageError("--boxes and --topk exclude each other: a box names one target per image")
        if self.draw_boxes and self.box_threshold is None:
            raise UsageError("--draw-boxes draws the boxes of --box-threshold F (e.g. 0.15): give it too")
        return parse_methods(self.methods, dict(self.settings))

    def request(self, methods: list[Method] | None = None) -> dict[str, Any]:
        """The JSON's ``request`` as far as it is known before loading: what a re-run must
        match to keep an image's earlier results. Keys appear only when not at their
        default, so earlier runs' JSON still matches."""
        methods = self.check() if methods is None else methods
        asked = {
            "model": self.model,
            "weights": self.weights,
            "layer": self.layer,
            "input_size": self.input_size,
            "mean": self.mean,
            "std": self.std,
            "labels": self.labels,
        }
        if self.fuse != "mean":  # the JSON's "fuse" is known only once the layers are (one: none)
            asked["fuse"] = self.fuse
        request: dict[str, Any] = {
            "methods": [m.name for m in methods],
            "target": "positive" if self.positive else self.target or "top1",
            "topk": self.topk or 1,
            "heatmap": self.save_heatmap,
            "overlay_format": self.overlay_format,
            "asked": json.loads(json.dumps(asked)),  # as a JSON file gives it back (tuples as lists)
        }
        if self.scores_maps:
            request["metrics"] = {"steps": self.steps, "substrate": self.substrate, "boxes": self.boxes}
            if self.road:
                request["metrics"]["road"] = True
        if self.grid:
            request["grid"] = True
        extras = {
            "score": self.score,  # as asked: the default depends on the head, known once loaded
            "threshold": self.threshold if self.positive else None,
            "output_key": self.output_key,
            "channels": self.channels,
            "heatmap_raw": True if self.save_raw else None,
            "box_threshold": self.box_threshold,
            "draw_boxes": True if self.draw_boxes else None,
            "precision": self.precision if self.precision != "fp32" else None,
            "contrast": self.contrast,
            "smooth": self.smooth,
        }
        request |= {key: value for key, value in extras.items() if value is not None}
        if self.settings:  # a changed setting (--set rise.masks=500) redoes the images
            request["method_options"] = dict(self.settings)
        return request

    def metric_options(self) -> MetricOptions | None:
        if not self.scores_maps:
            return None
        from camcli.chunking import DEFAULT_LIMIT
        from camcli.metrics import MetricOptions

        chunk_size = DEFAULT_LIMIT if self.chunk_size is None else self.chunk_size
        return MetricOptions(steps=self.steps, substrate=self.substrate, chunk_size=chunk_size, road=self.road)

    def box_index(self) -> BoxIndex | None:
        if self.boxes is None:
            return None
        from camcli.boxes import load_boxes

        return load_boxes(Path(self.boxes))

    @property
    def class_name(self) -> str | None:
        """`-t` when it names a class (not top1, positive or an index)."""
        target = self.target
        if target is None or target.lower() in ("top1", "positive") or target.lstrip("-").isdigit():
            return None
        return target

    def known_categories(self) -> list[str] | None:
        """The class names known before loading: --labels, or the zoo's metadata (None: once loaded)."""
        from camcli.models.spec import read_labels
        from camcli.models.zoo import known_categories

        if self.labels is not None:
            return read_labels(Path(self.labels))
        return known_categories(self.model, self.weights)

    def check_target_early(self) -> None:
        """A class-name target checked before loading, where the class list is known from
        the zoo's metadata or --labels (otherwise once loaded, still before --out is made)."""
        if self.class_name is None:
            return
        categories = self.known_categories()
        if categories is not None:
            from camcli.models.spec import class_by_name

            class_by_name(self.class_name, categories)


@dataclass
class Prepared:
    """A config made real on one device: the model, its layer(s), the explainer, the target."""

    config: ExplainConfig
    loaded: LoadedModel
    device: torch.device
    layers: list[LayerInfo]
    explainer: Explainer
    target: TargetSpec
    score: str  # what the JSON calls a class's score
    request: dict[str, Any]  # the full ``request`` every record of this run carries
    metrics: MetricOptions | None
    boxes: BoxIndex | None
    _explainers: dict[tuple[str, ...], Explainer] = field(default_factory=dict, repr=False)

    @property
    def method_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.explainer.methods)

    def explainer_for(self, names: tuple[str, ...]) -> Explainer:
        """The explainer of a subset of the methods (a re-run adds only what is missing)."""
        if names == self.method_names:
            return self.explainer
        if names not in self._explainers:
            self._explainers[names] = self.explainer.with_methods(
                [m for m in self.explainer.methods if m.name in names]
            )
        return self._explainers[names]

    def todo(self, prior: Prior | None) -> tuple[Work, ...]:
        """What to explain for an image: the (method, class) pairs an earlier, reusable result
        lacks, or every method for the classes the target finds."""
        if prior is not None and prior.reusable and not self.config.overwrite:
            return prior.todo
        from camcli.resume import Work

        return (Work(self.method_names, None),)


def prepare(
    config: ExplainConfig, device: torch.device | str | None = None, loaded: LoadedModel | None = None
) -> Prepared:
    """Load (unless `loaded` is given), resolve layers, build the explainer and the target
    spec; every usage error is raised here, before any output is written."""
    import torch

    from camcli.engine import Explainer, parse_contrast, parse_target, resolve_device
    from camcli.methods import added_by_all, parse_methods
    from camcli.models import check_labels, load_model, resolve_layers
    from camcli.run.stages import choose_score

    base_request = config.request()
    box_index = config.box_index()
    metric_options = config.metric_options()
    device = resolve_device(config.device) if device is None else torch.device(device)
    if loaded is None:
        loaded = load_model(
            config.model,
            config.weights,
            input_size=config.input_size,
            mean=config.mean,
            std=config.std,
            labels=Path(config.labels) if config.labels is not None else None,
            channels=config.channels,
            output_key=config.output_key,
            trust_remote_code=config.trust_remote_code,
        )
    loaded.model.to(device)
    output_key = config.output_key if config.output_key is not None else loaded.output_key
    methods = parse_methods(config.methods, dict(config.settings), loaded.input)
    layers = resolve_layers(loaded.model, config.layer, loaded.input, device, output_key=output_key)
    check_labels(loaded, layers[0].num_classes)
    target = parse_target(config.target, config.topk, loaded.categories, layers[0].num_classes, config.threshold)
    score = choose_score(config.score, target.threshold is not None, layers[0].binary)
    explainer = Explainer(
        loaded.model,
        layers,
        methods,
        chunk_size=config.chunk_size,
        output_key=output_key,
        optional=added_by_all(config.methods),
        fuse=config.fuse,
        contrast=parse_contrast(config.contrast, loaded.categories, layers[0].num_classes),
        smooth=config.smooth,
        precision=config.precision,  # refused here, where the device lacks it
    )
    request = {
        "model": loaded.name,
        "weights": loaded.weights,
        "layer": explainer.layer_name,
        **({"fuse": config.fuse} if len(layers) > 1 else {}),  # one layer: nothing fused, JSON as before
        "input": loaded.input.to_json(),
        **base_request,
        "methods": [m.name for m in explainer.methods],
    }
    if explainer.skipped:  # -m all: what did not apply to this model, and why
        request["skipped_methods"] = [{"method": name, "reason": why} for name, why in explainer.skipped]
    if explainer.fp32_methods:  # --precision bf16/fp16: the methods kept in fp32
        request["fp32_methods"] = explainer.fp32_methods
    return Prepared(config, loaded, device, layers, explainer, target, score, request, metric_options, box_index)
