"""Folder runs: prefetch (decode + resize in threads) -> engine (one pass per batch) ->
writers (render + atomic writes in a background thread, the JSON last).

The model thread never waits on disk: decoding of batch n+1 runs while batch n is on
the model, and rendering/writing of batch n runs while batch n+1 is. Maps are moved to
the CPU and converted to numpy once per batch.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from camcli import __version__
from camcli.boxes import BoxIndex, box_iou, map_boxes
from camcli.engine import BatchResult, Explainer, TargetSpec
from camcli.errors import ImageError, UsageError
from camcli.io import (
    DEFAULT_MAX_PIXELS,
    InputItem,
    atomic_write,
    decode_image,
    encode_image,
    json_bytes,
    npy_bytes,
    read_json,
    remove_stale_temps,
)
from camcli.metrics import MetricOptions, evaluate_batch
from camcli.models import InputSpec, LoadedModel
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

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RunOptions:
    out_dir: Path
    # Defaults measured on a 2-core CPU (resnet50, 64 JPEGs of 640x480, whole run with start-up):
    # batch 4 / 8 / 16 took 9.4 / 10.0 / 9.5 s and 1 / 2 / 4 decode workers 9.4 / 10.0 / 10.2 s,
    # all within the machine's noise, so batch 8 (small in memory, enough to keep a GPU busy) and
    # 2 workers. torch keeps its own default of one intra-op thread per physical core: the model
    # is the bottleneck, and decoding/writing (cv2, which releases the GIL) fill its gaps.
    batch_size: int = 8
    colormap: str = "jet"
    alpha: float = 0.5
    save_heatmap: bool = False
    overwrite: bool = False
    overlay_format: str = "png"  # a key of camcli.io.OVERLAY_FORMATS
    workers: int = 2  # decode threads: cv2 and torch release the GIL
    metrics: MetricOptions | None = None  # --metrics: faithfulness (and box) metrics per map
    boxes: BoxIndex | None = None  # --boxes: per-image boxes and target classes
    grid: bool = False  # also write <name>.grid.png: the image, then every method (and target) side by side
    grid_only: bool = False  # `camcli compare`: write only the grids (no overlays, no JSON)
    panel_size: int = 224  # grid panel height in pixels
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused from their header
    score: str = "softmax"  # what a class's "score" is: softmax, sigmoid or logit (SCORES)
    save_raw: bool = False  # --save-heatmap raw: also the map before ReLU and min-max (feature resolution)
    box_threshold: float | None = None  # --box-threshold: boxes of each map's parts >= F x its maximum
    draw_boxes: bool = False  # draw those boxes on the overlay


@dataclass
class RunSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    interrupted: bool = False  # Ctrl-C: stopped after the batch on the model, writes finished
    errors: list[str] = field(default_factory=list)


@dataclass
class _Decoded:
    item: InputItem
    image: np.ndarray | None = None  # RGB uint8, original size
    tensor: torch.Tensor | None = None  # (3, S, S) normalised model input
    error: str | None = None


# ITU-R BT.601 luma, the weights of Pillow's convert("L") and OpenCV's RGB2GRAY
LUMINANCE = (0.299, 0.587, 0.114)


def preprocess(image: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> normalised (C, S, S): the whole image resized (no crop), so
    the heatmap covers the whole picture; antialiased like torchvision's transforms. A
    1-channel model gets the luminance (a grey PNG, decoded as R = G = B, stays itself)."""
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


class ExplainRun:
    """One `camcli explain` over a list of inputs."""

    def __init__(
        self,
        loaded: LoadedModel,
        explainer: Explainer,
        target: TargetSpec,
        device: torch.device,
        options: RunOptions,
        request: dict[str, Any],
    ) -> None:
        self.loaded = loaded
        self.explainer = explainer
        self.target = target
        self.device = device
        self.options = options
        self.request = request  # what a re-run must match to skip an image
        self._writes_pending = threading.BoundedSemaphore(4 * options.batch_size)

    def run(
        self,
        items: Sequence[InputItem],
        emit: Callable[[dict[str, Any]], None],
        report_error: Callable[[str], None],
        advance: Callable[[int], None],
    ) -> RunSummary:
        """Explain `items`; `emit` gets each image's record in input order.

        A first Ctrl-C stops the run after the batch on the model: writes already queued
        finish, nothing is left half-written, and the summary says ``interrupted``.
        """
        summary = RunSummary()
        writes: list[tuple[_Decoded, Future[None]]] = []
        remove_stale_temps(self.options.out_dir, (item.key for item in items))
        with (
            _stop_on_sigint() as stop,
            ThreadPoolExecutor(self.options.workers, thread_name_prefix="camcli-decode") as decoder,
            ThreadPoolExecutor(1, thread_name_prefix="camcli-write") as writer,
        ):
            for batch in self._batches(items, decoder):
                if stop.is_set():
                    summary.interrupted = True
                    decoder.shutdown(wait=False, cancel_futures=True)
                    break
                for entry in batch:
                    if isinstance(entry, dict):  # finished by an earlier run
                        summary.skipped += 1
                        emit(entry)
                advance_by = sum(isinstance(entry, dict) for entry in batch)
                decoded = [entry for entry in batch if isinstance(entry, _Decoded)]
                for entry, record, job in self._explain(decoded, summary, report_error):
                    emit(record)
                    self._writes_pending.acquire()  # bounds memory: at most 4 batches queued
                    future = writer.submit(job)
                    future.add_done_callback(lambda _: self._writes_pending.release())
                    writes.append((entry, future))
                advance(advance_by + len(decoded))
                writes = self._collect_finished(writes, summary, report_error, wait=False)
            self._collect_finished(writes, summary, report_error, wait=True)
        return summary

    # -- stages ---------------------------------------------------------------------------

    def _batches(self, items: Sequence[InputItem], decoder: ThreadPoolExecutor) -> Iterator[list[Any]]:
        """Batches of decoded inputs (or earlier records), decoding one batch ahead."""
        size = self.options.batch_size
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        pending: list[Any] | None = None
        for chunk in [*chunks, None]:
            submitted = None
            if chunk is not None:
                submitted = [self._finished_record(item) or decoder.submit(self._decode, item) for item in chunk]
            if pending is not None:
                yield [entry.result() if isinstance(entry, Future) else entry for entry in pending]
            pending = submitted

    def _decode(self, item: InputItem) -> _Decoded:
        try:
            image = decode_image(item.path, self.options.max_pixels)
            return _Decoded(item, image, preprocess(image, self.loaded.input))
        except ImageError as exc:
            return _Decoded(item, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - a broken file must not stop the run
            return _Decoded(item, error=f"cannot decode: {type(exc).__name__}: {exc}")

    def _explain(
        self, decoded: list[_Decoded], summary: RunSummary, report_error: Callable[[str], None]
    ) -> Iterator[tuple[_Decoded, dict[str, Any], Callable[[], None]]]:
        good = [d for d in decoded if d.error is None]
        result, metrics = None, None
        if good:
            batch = torch.stack([d.tensor for d in good]).to(self.device)  # type: ignore[misc]
            boxes = self.options.boxes
            target = self.target
            if boxes is not None:  # a box's class is its image's target
                target = TargetSpec(self.target.index, per_sample=boxes.targets([d.item for d in good]))
            result = self.explainer.explain(batch, target)
            if self.options.metrics is not None:
                sizes = [d.image.shape[:2] for d in good]  # type: ignore[union-attr]
                found = [boxes.lookup(d.item) for d in good] if boxes is not None else None
                per_image = [b.boxes if b is not None else None for b in found] if found is not None else None
                unscored = [e.is_tiles or e.categorical for e in result.explanations]  # no heatmap to score
                scored = [e for e, skip in zip(result.explanations, unscored, strict=True) if not skip]
                values = iter(
                    evaluate_batch(
                        self.explainer.net, batch, scored, sizes, per_image, self.options.metrics, result.logits
                    )
                )
                metrics = [None if skip else next(values) for skip in unscored]
        arrays = _to_numpy(result, metrics, self.options.score) if result is not None else None
        position = 0
        for entry in decoded:
            if entry.error is not None:
                summary.failed += 1
                message = f"{entry.item.path}: {entry.error}"
                summary.errors.append(message)
                report_error(message)
                record = self._record(entry, None, 0)
                yield entry, record, self._job(entry, record, None, 0)
                continue
            summary.done += 1
            record = self._record(entry, arrays, position)
            yield entry, record, self._job(entry, record, arrays, position)
            position += 1

    # -- records and files ----------------------------------------------------------------

    def _json_path(self, item: InputItem) -> Path:
        return self.options.out_dir / f"{item.key}.json"

    def is_finished(self, item: InputItem) -> bool:
        """Whether an earlier run already explained `item` the same way (it would be skipped)."""
        return self._finished_record(item) is not None

    def _finished_record(self, item: InputItem) -> dict[str, Any] | None:
        if self.options.overwrite or self.options.grid_only:
            return None
        path = self._json_path(item)
        record = read_json(path)
        if record is None or record.get("error") is not None or record.get("request") != self.request:
            return None
        outputs = [e.get("overlay") for e in record.get("explanations", [])]
        outputs += [e.get(k) for e in record.get("explanations", []) for k in ("heatmap", "raw_heatmap") if e.get(k)]
        outputs += [record["grid"]] if "grid" in record else []
        if not all(isinstance(o, str) and (path.parent / o).is_file() for o in outputs):
            return None
        return record

    def _record(self, entry: _Decoded, arrays: dict[str, Any] | None, i: int) -> dict[str, Any]:
        loaded = self.loaded
        record: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "image": str(entry.item.path),
            "width": None,
            "height": None,
            "model": loaded.name,
            "weights": loaded.weights,
            "input": loaded.input.to_json(),
            "device": str(self.device),
            "versions": {"camcli": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__},
            "predictions": [],
            "explanations": [],
            "error": entry.error,
            "request": self.request,
        }
        if loaded.random_weights:  # said in the JSON as on stderr: nothing was loaded
            record["random_weights"] = True
        if self.options.score != "softmax":
            record["score"] = self.options.score
        if arrays is None:
            return record
        assert entry.image is not None
        record["height"], record["width"] = (int(v) for v in entry.image.shape[:2])
        record["predictions"] = [
            {"index": int(c), "label": loaded.label(int(c)), "score": float(s)}
            for c, s in zip(arrays["top_index"][i], arrays["top_score"][i], strict=True)
        ]
        name = Path(entry.item.key).name
        options = self.options
        per_class = self.target.topk > 1 or self.target.threshold is not None
        binary = self.explainer.layer.binary
        truth = options.boxes.lookup(entry.item) if options.boxes is not None else None
        for e in _kept(arrays, i):
            index = int(e["targets"][i])
            stem = f"{name}.{e['method']}" + (f".c{index}" if per_class else "")
            target = {"index": index, "label": loaded.label(index), "score": float(e["scores"][i])}
            if binary:  # which sign of the model's one logit was explained
                target["gradient_of"] = "logit" if index == 1 else "-logit"
            meta: dict[str, Any] = {
                "method": e["method"],
                "layer": e["layer"],
                "target": target,
                "overlay": f"{stem}.{options.overlay_format}",
                "heatmap": f"{stem}.npy" if options.save_heatmap else None,
                "warning": "flat map" if e["flat"][i] else None,
            }
            if e["metrics"] is not None:
                meta["metrics"] = _metrics_json(e["metrics"], i)
            if e["channels"] is not None:
                meta["channels"] = [int(c) for c in e["channels"][i]]
            if e["categorical"]:  # a label map: the classes it shows, by share of the picture
                indices, counts = np.unique(e["maps"][i].astype(np.int64), return_counts=True)
                order = np.argsort(-counts, kind="stable")
                meta["classes"] = [
                    {
                        "index": int(indices[n]),
                        "label": loaded.label(int(indices[n])),
                        "share": float(counts[n] / counts.sum()),
                    }
                    for n in order
                ]
            if options.save_raw and e["raw"] is not None:
                raw = e["raw"][i]
                meta |= {"raw_heatmap": f"{stem}.raw.npy", "raw_min": float(raw.min()), "raw_max": float(raw.max())}
            if (
                options.box_threshold is not None
                and e["channels"] is None
                and not e["categorical"]
                and e["maps"][i].ndim == 2
            ):
                heat = heatmap_at_size(e["maps"][i], record["width"], record["height"])
                meta["boxes"] = map_boxes(heat, options.box_threshold)
                if truth is not None:  # the largest box against the best-matching labelled one
                    found = meta["boxes"][:1]
                    iou = max((box_iou(found[0], b) for b in truth.boxes), default=0.0) if found else 0.0
                    meta.setdefault("metrics", {})["localisation_iou"] = iou if truth.boxes else None
            record["explanations"].append(meta)
        if self.options.grid:
            record["grid"] = f"{name}.grid.png"
        return record

    def _job(
        self, entry: _Decoded, record: dict[str, Any], arrays: dict[str, Any] | None, i: int
    ) -> Callable[[], None]:
        """Render and write one image's files; the JSON goes last, so it marks 'done'."""
        json_path = self._json_path(entry.item)
        options = self.options

        def write() -> None:
            folder = json_path.parent
            if arrays is not None:
                assert entry.image is not None
                height, width = entry.image.shape[:2]
                panels = []
                for e, meta in zip(_kept(arrays, i), record["explanations"], strict=True):
                    if e["channels"] is not None:  # layer channels (N, h, w): one tile each
                        raw = e["maps"][i]
                        picture = tile_grid(colorize(raw, options.colormap))
                    elif e["categorical"]:  # class indices (h, w): a label map with a legend
                        raw = labels_at_size(e["maps"][i], width, height)
                        legend = [(c["index"], f"{c['label']} ({c['share']:.0%})") for c in meta["classes"]]
                        picture = label_map(entry.image, raw, legend, options.alpha)
                    else:
                        raw = heatmap_at_size(e["maps"][i], width, height)
                        if raw.ndim == 3:  # input gradient (H, W, 3): deprocessed image
                            picture = gradient_image(raw)
                        else:
                            picture = overlay(entry.image, raw, options.colormap, options.alpha)
                            if options.draw_boxes and meta.get("boxes"):
                                picture = draw_boxes(picture, meta["boxes"])
                    panels.append((picture, meta))
                    if options.grid_only:
                        continue
                    atomic_write(folder / meta["overlay"], encode_image(picture, options.overlay_format))
                    if meta["heatmap"]:
                        atomic_write(folder / meta["heatmap"], npy_bytes(raw.astype(np.float32)))
                    if meta.get("raw_heatmap"):
                        atomic_write(folder / meta["raw_heatmap"], npy_bytes(e["raw"][i].astype(np.float32)))
                if options.grid or options.grid_only:
                    grid = _grid(entry.image, record, panels, len(self.explainer.methods), options.panel_size)
                    atomic_write(folder / f"{Path(entry.item.key).name}.grid.png", encode_image(grid))
            if not options.grid_only:
                atomic_write(json_path, json_bytes(record))

        return write

    @staticmethod
    def _collect_finished(
        writes: list[tuple[_Decoded, Future[None]]],
        summary: RunSummary,
        report_error: Callable[[str], None],
        wait: bool,
    ) -> list[tuple[_Decoded, Future[None]]]:
        remaining = []
        for entry, future in writes:
            if not wait and not future.done():
                remaining.append((entry, future))
                continue
            error = future.exception()
            if error is None:
                continue
            if entry.error is None:  # counted as done when explained
                summary.done -= 1
                summary.failed += 1
            message = f"{entry.item.path}: cannot write outputs: {error}"
            summary.errors.append(message)
            report_error(message)
        return remaining


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


@contextmanager
def _stop_on_sigint() -> Iterator[threading.Event]:
    """An event set by the first SIGINT (a second one interrupts at once, as usual).

    Only the main thread can install signal handlers; elsewhere (and where SIGINT is
    ignored, as under nohup) Ctrl-C keeps its meaning.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) in (
        signal.SIG_IGN,
        None,  # a handler set outside Python: leave it alone
    ):
        yield stop
        return

    def request_stop(signum: int, frame: Any) -> None:
        stop.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


SCORES = ("softmax", "sigmoid", "logit")


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


def _kept(arrays: dict[str, Any], i: int) -> list[dict[str, Any]]:
    """Sample i's explanations: with -t positive only the ranks where it has a class of its own."""
    return [e for e in arrays["explanations"] if e["valid"] is None or e["valid"][i]]


def _to_numpy(
    result: BatchResult, metrics: list[dict[str, torch.Tensor] | None] | None = None, score: str = "softmax"
) -> dict[str, Any]:
    """Everything the writers need from a batch, moved to the CPU once."""
    probs = class_scores(result.logits, score)
    top = probs.topk(min(5, probs.shape[1]), dim=1)
    explanations = []
    for n, e in enumerate(result.explanations):
        maps = e.maps.float()
        if e.is_gradient and maps.shape[1] == 1:  # a 1-channel model's input gradient: grey
            maps = maps.expand(-1, 3, -1, -1)
        explanations.append(
            {
                "method": e.method,
                "layer": e.layer,
                "targets": e.targets.cpu().numpy(),
                "scores": probs.gather(1, e.targets[:, None]).squeeze(1).cpu().numpy(),
                "maps": maps.cpu().numpy(),
                "raw": None if e.raw is None else e.raw.cpu().numpy(),
                "valid": None if e.valid is None else e.valid.cpu().numpy(),
                "flat": e.flat.cpu().numpy(),
                "metrics": None
                if metrics is None or metrics[n] is None
                else {k: v.cpu().numpy() for k, v in metrics[n].items()},
                "channels": None if e.channels is None else e.channels.cpu().numpy(),
                "categorical": e.categorical,
            }
        )
    return {
        "top_index": top.indices.cpu().numpy(),
        "top_score": top.values.cpu().numpy(),
        "explanations": explanations,
    }


def _metrics_json(metrics: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    """One image's metrics: floats, the pointing game and increase as booleans, null
    where an image has no boxes."""
    out: dict[str, Any] = {}
    for name, values in metrics.items():
        value = float(values[i])
        if np.isnan(value):
            out[name] = None
        elif name in ("pointing_game", "increase_in_confidence"):
            out[name] = bool(value)
        else:
            out[name] = value
    return out
