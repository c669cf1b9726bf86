"""The per-image stages every engine runs, local or on a cluster, in this order:

    decode(item)                  path -> RGB image + model input (never raises for a bad file)
    explain_batch(prepared, ...)  a batch on the model -> one CPU, picklable `Outcome` per image
    build_record(prepared, ...)   an outcome -> the per-image JSON record (camcli/schema)
    write_outputs(prepared, ...)  overlays, maps, grid, then the JSON: atomic, the JSON last
    prior_for(prepared, item)     what an earlier run left: is this image finished?

They hold no state of their own beyond `Prepared`, so the local executor's threads and
Ray's actors call the same functions and write the same files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from camcli import __version__
from camcli.boxes import box_iou, map_boxes
from camcli.engine import TargetSpec, stack_to_device
from camcli.errors import ImageError, UsageError
from camcli.io import (
    InputItem,
    atomic_write,
    decode_image,
    encode_image,
    json_bytes,
    npy_bytes,
    read_json,
    remove_stale_temps,
)
from camcli.methods.base import GRADIENT, HEATMAP, LABELS, TILES
from camcli.models import InputSpec
from camcli.render import (
    colorize,
    comparison_grid,
    draw_boxes,
    gradient_image,
    heatmap_at_size,
    label_map,
    labels_at_size,
    overlay,
    tile_grid,
)
from camcli.resume import Prior, Work, explanation_stem, output_files, prior_result, reusable, top_class

if TYPE_CHECKING:
    from camcli.engine import BatchResult
    from camcli.run.plan import Prepared

SCHEMA_VERSION = 1

# ITU-R BT.601 luma, the weights of Pillow's convert("L") and OpenCV's RGB2GRAY
LUMINANCE = (0.299, 0.587, 0.114)

SCORES = ("softmax", "sigmoid", "logit")


# -- decode --------------------------------------------------------------------------------


def preprocess(image: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> normalised (3, S, S): the whole image resized (no crop), so
    the heatmap covers the whole picture; antialiased like torchvision's transforms."""
    if not image.flags.writeable:  # np.asarray(PIL image) is read-only; torch would warn
        image = image.copy()
    x = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    if spec.channels == 1:
        x = (x * torch.tensor(LUMINANCE).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif spec.channel_order == "bgr":
        x = x.flip(1)
    if spec.interpolation == "nearest":
        x = F.interpolate(x, size=(spec.size, spec.size), mode="nearest")
    else:
        x = F.interpolate(
            x, size=(spec.size, spec.size), mode=spec.interpolation, antialias=True, align_corners=False
        ).clamp_(0.0, 1.0)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return ((x - mean) / std).squeeze(0)


@dataclass
class Decoded:
    """One input, decoded (or why it could not be)."""

    item: InputItem
    image: np.ndarray | None = None  # RGB uint8, original size
    tensor: torch.Tensor | None = None  # (C, S, S) normalised model input
    error: str | None = None
    prior: Prior | None = None  # what an earlier run left (kept explanations, files to remove)


def decode(item: InputItem, spec: InputSpec, max_pixels: int, prior: Prior | None = None) -> Decoded:
    """Read and preprocess one file; a broken file is an error entry, never an exception."""
    try:
        image = decode_image(item.path, max_pixels)
        return Decoded(item, image, preprocess(image, spec), prior=prior)
    except ImageError as exc:
        return Decoded(item, error=str(exc), prior=prior)
    except Exception as exc:  # noqa: BLE001 - a broken file must not stop the run
        return Decoded(item, error=f"cannot decode: {type(exc).__name__}: {exc}", prior=prior)


# -- explain -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapResult:
    """One method's result for one image and one target, on the CPU."""

    method: str
    kind: str  # camcli.methods.base.KINDS: how it is drawn and whether it is scored
    layer: str | None
    target: int
    score: float
    map: np.ndarray  # heatmap/labels (h, w); gradient (3, h, w); tiles (N, h, w)
    flat: bool
    raw: np.ndarray | None = None  # --save-heatmap raw: before ReLU and min-max
    channels: tuple[int, ...] | None = None  # tiles: the channel of each
    metrics: dict[str, float | bool | None] | None = None
    layout: str | None = None  # layer methods: how the layer was read
    details: dict[str, float] | None = None
    contrast: tuple[int, float] | None = None  # --contrast: (class, its score)

    @property
    def grid(self) -> list[int] | None:
        return None if self.layout is None else [int(v) for v in self.map.shape[-2:]]


@dataclass(frozen=True)
class Outcome:
    """Everything the record and the writers need of one image (picklable: Ray moves it)."""

    item: InputItem
    image: np.ndarray | None  # RGB uint8, None for a failed image
    error: str | None = None
    predictions: tuple[tuple[int, float], ...] = ()  # top-5 (index, score)
    maps: tuple[MapResult, ...] = ()  # in the explainer's order: rank by rank, method by method
    prior: Prior | None = field(default=None, repr=False)


def class_scores(logits: torch.Tensor, score: str = "softmax") -> torch.Tensor:
    """What the JSON calls a class's score: its softmax probability (one class of many),
    its sigmoid (multi-label, and a binary model's [-z, z]) or the logit itself. All three
    rank a sample's classes alike, by logit."""
    if score == "softmax":
        return logits.float().softmax(1)
    if score == "sigmoid":
        return logits.float().sigmoid()
    return logits.float()


def choose_score(choice: str | None, multi_label: bool, binary: bool) -> str:
    """`--score`: softmax by default; sigmoid for -t positive and for one-logit models,
    whose two classes [-z, z] have no softmax of their own."""
    if choice is None:
        return "sigmoid" if multi_label or binary else "softmax"
    if choice not in SCORES:
        raise UsageError(f"unknown --score {choice!r}; use one of {', '.join(SCORES)}")
    if binary and choice == "softmax":
        raise UsageError("a model with one logit has no softmax: use --score sigmoid (its probability) or logit")
    return choice


def explain_batch(prepared: Prepared, decoded: Sequence[Decoded]) -> list[Outcome]:
    """The images' missing explanations, one engine pass per group of images that need the
    same methods for as many classes of their own (a re-run adds only the missing pairs);
    failed decodes pass through as error outcomes, order kept."""
    groups: dict[tuple[tuple[str, ...], int | None], list[tuple[Decoded, Work]]] = {}
    for entry in decoded:
        if entry.error is None:
            # nothing left (another run finished it since it was planned): redone whole, kept consistent
            for work in prepared.todo(entry.prior) or prepared.todo(None):
                ranks = None if work.classes is None else len(work.classes)
                groups.setdefault((work.methods, ranks), []).append((entry, work))
    parts: dict[int, list[Outcome]] = {}
    for (names, ranks), members in groups.items():
        good = [entry for entry, _ in members]
        classes = None if ranks is None else tuple(work.classes for _, work in members)  # type: ignore[misc]
        for entry, outcome in zip(good, _explain_group(prepared, names, good, classes), strict=True):
            parts.setdefault(id(entry), []).append(outcome)
    return [
        _joined(prepared, parts[id(entry)])
        if id(entry) in parts
        else Outcome(entry.item, None, entry.error, prior=entry.prior)
        for entry in decoded
    ]


def _joined(prepared: Prepared, parts: list[Outcome]) -> Outcome:
    """One image's outcome from its groups' (each other pairs): maps class by class in the
    asked order, method by method, as a fresh run orders them."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    classes = first.prior.classes if first.prior is not None and first.prior.classes is not None else ()
    methods = prepared.method_names
    maps = sorted(
        (m for part in parts for m in part.maps),
        key=lambda m: (classes.index(m.target) if m.target in classes else len(classes), methods.index(m.method)),
    )
    return Outcome(first.item, first.image, predictions=first.predictions, maps=tuple(maps), prior=first.prior)


def _explain_group(
    prepared: Prepared, names: tuple[str, ...], good: list[Decoded], classes: tuple[tuple[int, ...], ...] | None
) -> list[Outcome]:
    """`classes`: each image's own classes (a re-run's missing ones), else the run's target."""
    explainer = prepared.explainer_for(names)
    batch = stack_to_device([d.tensor for d in good], prepared.device)  # type: ignore[misc]
    target = prepared.target
    boxes = prepared.boxes
    if classes is not None:
        target = TargetSpec(classes=classes)
    elif boxes is not None:  # a box's class is its image's target
        target = TargetSpec(target.index, per_sample=boxes.targets([d.item for d in good]))
    result = explainer.explain(batch, target)
    metrics = None
    if prepared.metrics is not None:
        from camcli.metrics import evaluate_batch

        sizes = [d.image.shape[:2] for d in good]  # type: ignore[union-attr]
        found = [boxes.lookup(d.item) for d in good] if boxes is not None else None
        per_image = [b.boxes if b is not None else None for b in found] if found is not None else None
        scored = [e for e in result.explanations if e.kind in (HEATMAP, GRADIENT)]
        # the curves need logits only: the folded inference copy, never the user's model object
        folded = explainer.inference_model(batch)
        inputs = batch.contiguous(memory_format=explainer.memory_format)
        values = iter(evaluate_batch(folded, inputs, scored, sizes, per_image, prepared.metrics, result.logits))
        metrics = [next(values) if e.kind in (HEATMAP, GRADIENT) else None for e in result.explanations]
    return _outcomes(result, metrics, prepared.score, good)


def _outcomes(
    result: BatchResult, metrics: list[dict[str, torch.Tensor] | None] | None, score: str, good: list[Decoded]
) -> list[Outcome]:
    """The batch moved to the CPU and into numpy once, then cut into one outcome per image."""
    probs = class_scores(result.logits, score)
    top = probs.topk(min(5, probs.shape[1]), dim=1)
    top_index, top_score = top.indices.cpu().numpy(), top.values.cpu().numpy()
    per_image: list[list[MapResult]] = [[] for _ in good]
    for n, e in enumerate(result.explanations):
        maps = e.maps.float()
        if e.kind == GRADIENT and maps.shape[1] == 1:  # a 1-channel model's input gradient: grey
            maps = maps.expand(-1, 3, -1, -1)
        maps_np = maps.cpu().numpy()
        if e.kind == LABELS:
            maps_np = maps_np.astype(np.int64)
        targets = e.targets.cpu().numpy()
        scores = probs.gather(1, e.targets[:, None]).squeeze(1).cpu().numpy()
        raw = None if e.raw is None else e.raw.cpu().numpy()
        valid = None if e.valid is None else e.valid.cpu().numpy()
        flat = e.flat.cpu().numpy()
        channels = None if e.channels is None else e.channels.cpu().numpy()
        details = None if e.details is None else {k: v.float().cpu().numpy() for k, v in e.details.items()}
        scored = None if metrics is None or metrics[n] is None else {k: v.cpu().numpy() for k, v in metrics[n].items()}
        contrasts = None if e.contrasts is None else e.contrasts.cpu().numpy()
        contrast_scores = (
            None if e.contrasts is None else probs.gather(1, e.contrasts[:, None]).squeeze(1).cpu().numpy()
        )
        for i in range(len(good)):
            if valid is not None and not valid[i]:  # -t positive: no class of its own at this rank
                continue
            per_image[i].append(
                MapResult(
                    method=e.method,
                    kind=e.kind,
                    layer=e.layer,
                    target=int(targets[i]),
                    score=float(scores[i]),
                    map=maps_np[i],
                    flat=bool(flat[i]),
                    raw=None if raw is None else raw[i].astype(np.float32),
                    channels=None if channels is None else tuple(int(c) for c in channels[i]),
                    metrics=None if scored is None else _metrics_json(scored, i),
                    layout=e.layout,
                    details=None if details is None else {k: float(v[i]) for k, v in details.items()},
                    contrast=None if contrasts is None else (int(contrasts[i]), float(contrast_scores[i])),  # type: ignore[index]
                )
            )
    return [
        Outcome(
            d.item,
            d.image,
            predictions=tuple((int(c), float(s)) for c, s in zip(top_index[i], top_score[i], strict=True)),
            maps=tuple(per_image[i]),
            prior=d.prior,
        )
        for i, d in enumerate(good)
    ]


def _metrics_json(metrics: dict[str, np.ndarray], i: int) -> dict[str, float | bool | None]:
    """One image's metrics: floats, the pointing game and increase as booleans, null
    where an image has no boxes."""
    out: dict[str, float | bool | None] = {}
    for name, values in metrics.items():
        value = float(values[i])
        if np.isnan(value):
            out[name] = None
        elif name in ("pointing_game", "increase_in_confidence"):
            out[name] = bool(value)
        else:
            out[name] = value
    return out


# -- records -------------------------------------------------------------------------------


def _torchvision_version() -> str:
    """torchvision's version without importing it (the default model does not need it)."""
    try:
        return metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        return "not installed"


def build_record(prepared: Prepared, outcome: Outcome, image: str | None = None) -> dict[str, Any]:
    """The per-image JSON record (camcli/schema), its files named as the writers name them.
    `image`: the name the record gives the image (default: its path)."""
    config, loaded = prepared.config, prepared.loaded
    name = Path(outcome.item.key).name
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "image": str(outcome.item.path) if image is None else image,
        "width": None,
        "height": None,
        "model": loaded.name,
        "weights": loaded.weights,
        "input": loaded.input.to_json(),
        "device": str(prepared.device),
        "versions": {"camcli": __version__, "torch": torch.__version__, "torchvision": _torchvision_version()},
        "predictions": [],
        "explanations": [],
        "error": outcome.error,
        "request": prepared.request,
    }
    if loaded.random_weights:  # said in the JSON as on stderr: nothing was loaded
        record["random_weights"] = True
    if loaded.adapted:  # said in the JSON as on stderr: the model was resized for --input-size
        record["adapted"] = loaded.adapted
    if prepared.score != "softmax":
        record["score"] = prepared.score
    if outcome.image is None:
        return record
    record["height"], record["width"] = (int(v) for v in outcome.image.shape[:2])
    record["predictions"] = [{"index": c, "label": loaded.label(c), "score": s} for c, s in outcome.predictions]
    truth = prepared.boxes.lookup(outcome.item) if prepared.boxes is not None else None
    top1 = outcome.predictions[0][0] if outcome.predictions else None
    for m in outcome.maps:
        meta = _explanation_json(prepared, m, record, truth.boxes if truth else None)
        record["explanations"].append(meta | _file_names(config, meta, name, top1))
    if config.grid:
        record["grid"] = f"{name}.grid.png"
    return record


def _file_names(config: Any, meta: dict[str, Any], name: str, top1: int | None) -> dict[str, str | None]:
    """An explanation's files, named by its (method, class) and the image's top-1 (`explanation_stem`)."""
    stem = explanation_stem(name, meta["method"], meta["target"]["index"], top1)
    names: dict[str, str | None] = {
        "overlay": f"{stem}.{config.overlay_format}",
        "heatmap": f"{stem}.npy" if config.save_heatmap else None,
    }
    if "raw_heatmap" in meta:
        names["raw_heatmap"] = f"{stem}.raw.npy"
    return names


def _explanation_json(
    prepared: Prepared, m: MapResult, record: dict[str, Any], truth: list[list[int]] | None
) -> dict[str, Any]:
    """One explanation's entry, its file names aside (`_file_names`)."""
    config, loaded = prepared.config, prepared.loaded
    target: dict[str, Any] = {"index": m.target, "label": loaded.label(m.target), "score": m.score}
    if prepared.layers[0].binary:  # which sign of the model's one logit was explained
        target["gradient_of"] = "logit" if m.target == 1 else "-logit"
    meta: dict[str, Any] = {
        "method": m.method,
        "layer": m.layer,
        "target": target,
        "overlay": None,
        "heatmap": None,
        "warning": "flat map" if m.flat else None,
    }
    if m.metrics is not None:
        meta["metrics"] = dict(m.metrics)
    if m.channels is not None:
        meta["channels"] = list(m.channels)
    if m.kind == LABELS:  # a label map: the classes it shows, by share of the picture
        indices, counts = np.unique(m.map, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        meta["classes"] = [
            {"index": int(indices[n]), "label": loaded.label(int(indices[n])), "share": float(counts[n] / counts.sum())}
            for n in order
        ]
    if config.save_raw and m.raw is not None:
        meta |= {"raw_heatmap": None, "raw_min": float(m.raw.min()), "raw_max": float(m.raw.max())}
    if m.contrast is not None:
        other, other_score = m.contrast
        meta["contrast"] = {"index": other, "label": loaded.label(other), "score": other_score}
    if m.details is not None:
        meta["details"] = dict(m.details)
    if m.layout is not None:  # a layer method: the grid it was computed on and how it was read
        meta["grid"], meta["layout"] = m.grid, m.layout
    if config.box_threshold is not None and m.kind == HEATMAP:
        heat = heatmap_at_size(m.map, record["width"], record["height"])
        meta["boxes"] = map_boxes(heat, config.box_threshold)
        if truth is not None:  # the largest box against the best-matching labelled one
            found = meta["boxes"][:1]
            iou = max((box_iou(found[0], b) for b in truth), default=0.0) if found else 0.0
            meta.setdefault("metrics", {})["localisation_iou"] = iou if truth else None
    return meta


# -- resume --------------------------------------------------------------------------------


def json_path(prepared: Prepared, item: InputItem) -> Path:
    return prepared.config.out / f"{item.key}.json"


def prior_for(prepared: Prepared, item: InputItem) -> Prior | None:
    """What an earlier run left for `item` (None for `compare`, which keeps nothing);
    ``.finished``: it has every requested (method, class) pair, so the image is skipped."""
    if prepared.config.grid_only:
        return None
    prior = prior_result(prepared.config.out, item, prepared.request, categories=prepared.loaded.categories)
    if prepared.config.overwrite:
        return Prior(prior.record, False, prepared.todo(None))
    return prior


# -- write ---------------------------------------------------------------------------------


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive, across processes, while one image's files in `folder` are replaced: two
    runs on the same --out (two shells, `xargs -P`, Ray workers) never interleave their
    writes of one image. A lock on the folder itself, so no lock file is left behind;
    where the platform has no flock (Windows) writes stay atomic but unserialised."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def remove_stale(prepared: Prepared, items: Sequence[InputItem]) -> None:
    """Delete the temporary files a killed run left beside these images' outputs: one
    listing per output folder, under its lock, so no live writer's file is taken."""
    folders: dict[Path, list[str]] = {}
    for item in items:
        folders.setdefault(json_path(prepared, item).parent, []).append(item.key)
    for folder, keys in folders.items():
        if folder.is_dir():
            with folder_lock(folder):
                remove_stale_temps(prepared.config.out, keys)


def write_outputs(prepared: Prepared, outcome: Outcome, record: dict[str, Any]) -> dict[str, Any]:
    """Render and write one image's files, the JSON last (it marks the image done), and
    return the record as written.

    Under the folder's lock the JSON on disk is read again: a result another run finished
    meanwhile is merged with (its other methods kept) or replaced (its files removed
    first, so a crash leaves a JSON naming a missing file, which is redone, never an orphan).
    """
    config = prepared.config
    path = json_path(prepared, outcome.item)
    folder = path.parent
    with folder_lock(folder):
        current = None if config.grid_only else read_json(path)
        kept = _mergeable(prepared, current, outcome)
        if kept is not None and outcome.image is not None:
            record = _merged(prepared, kept, record, Path(outcome.item.key).name)
        for name in sorted(set(output_files(current)) - set(output_files(record))):
            (folder / name).unlink(missing_ok=True)
        try:
            _write_files(prepared, outcome, record, folder)
        except BaseException:  # a full disk: no file of this image that no JSON names
            if not config.grid_only:
                for name in set(output_files(record)) - set(output_files(current if kept else None)):
                    (folder / name).unlink(missing_ok=True)
            raise
        if not config.grid_only:
            atomic_write(path, json_bytes(record))
    return record


def _mergeable(prepared: Prepared, current: dict[str, Any] | None, outcome: Outcome) -> dict[str, Any] | None:
    """The record on disk if this image's new maps are to be added to it, else None."""
    if current is None or prepared.config.overwrite or prepared.config.grid_only:
        return None
    return current if reusable(json_path(prepared, outcome.item), current, prepared.request) else None


def _merged(prepared: Prepared, kept: dict[str, Any], record: dict[str, Any], name: str) -> dict[str, Any]:
    """The earlier record's explanations of (method, class) pairs not computed now, then the
    new ones; its request is this run's, its methods all those explained. File names follow
    the earlier record's top-1 (the same unless the two runs' logits differ at a near tie)."""
    top1 = top_class(kept)
    new = record["explanations"]
    if top1 != top_class(record):
        new = [e | _file_names(prepared.config, e, name, top1) for e in new]
        record = dict(record, predictions=kept["predictions"])
    pairs = {(e["method"], e["target"]["index"]) for e in new}
    explanations = [
        e
        for e in kept.get("explanations", [])
        if isinstance(e, dict) and (e.get("method"), e.get("target", {}).get("index")) not in pairs
    ]
    explanations += new
    # in the explanations' order, then those without one (-t positive: an image with no positive class)
    methods = [e["method"] for e in explanations] + kept["request"].get("methods", []) + prepared.request["methods"]
    return dict(record, explanations=explanations, request=dict(prepared.request, methods=list(dict.fromkeys(methods))))


def _picture(config: Any, m: MapResult, meta: dict[str, Any], image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(what the overlay file shows, the map at the image's size as `.npy` holds it), by kind."""
    height, width = image.shape[:2]
    if m.kind == TILES:  # layer channels (N, h, w): one tile each
        return tile_grid(colorize(m.map, config.colormap)), m.map
    if m.kind == LABELS:  # class indices (h, w): a label map with a legend
        labels = labels_at_size(m.map, width, height)
        legend = [(c["index"], f"{c['label']} ({c['share']:.0%})") for c in meta["classes"]]
        return label_map(image, labels, legend, config.alpha), labels
    heat = heatmap_at_size(m.map, width, height)
    if m.kind == GRADIENT:  # input gradient (H, W, 3): a deprocessed image
        return gradient_image(heat), heat
    picture = overlay(image, heat, config.colormap, config.alpha)
    if config.draw_boxes and meta.get("boxes"):
        picture = draw_boxes(picture, meta["boxes"])
    return picture, heat


def _write_files(prepared: Prepared, outcome: Outcome, record: dict[str, Any], folder: Path) -> None:
    config = prepared.config
    if outcome.image is None:
        return
    panels = []
    new = record["explanations"][len(record["explanations"]) - len(outcome.maps) :]
    for m, meta in zip(outcome.maps, new, strict=True):
        picture, at_size = _picture(config, m, meta, outcome.image)
        panels.append((picture, meta))
        if config.grid_only:
            continue
        atomic_write(folder / meta["overlay"], encode_image(picture, config.overlay_format))
        if meta["heatmap"]:
            atomic_write(folder / meta["heatmap"], npy_bytes(at_size.astype(np.float32)))
        if meta.get("raw_heatmap"):
            atomic_write(folder / meta["raw_heatmap"], npy_bytes(m.raw))  # type: ignore[arg-type]
    if config.grid or config.grid_only:
        grid = _grid(outcome.image, record, panels, len(prepared.explainer.methods), config.panel_size)
        atomic_write(folder / f"{Path(outcome.item.key).name}.grid.png", encode_image(grid))


def _grid(
    image: np.ndarray, record: dict[str, Any], panels: list[tuple[np.ndarray, dict[str, Any]]], per_rank: int, size: int
) -> np.ndarray:
    """The comparison grid: the image, then one row per target rank with one panel per method."""
    top = record["predictions"][0]
    original = (image, "original", f"top-1: {top['label']} {top['score']:.1%}")
    rows: list[list[Any]] = []
    for start in range(0, len(panels), per_rank):
        row: list[Any] = [original if not rows else None]
        for picture, meta in panels[start : start + per_rank]:
            target = meta["target"]
            row.append((picture, meta["method"], f"{target['label']} {target['score']:.1%}"))
        rows.append(row)
    return comparison_grid(rows, size)
