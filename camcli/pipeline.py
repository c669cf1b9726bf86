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
from camcli.boxes import BoxIndex
from camcli.engine import BatchResult, Explainer, TargetSpec
from camcli.errors import ImageError
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
from camcli.render import colorize, comparison_grid, gradient_image, heatmap_at_size, overlay, tile_grid

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


def preprocess(image: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> normalised (3, S, S): the whole image resized (no crop), so
    the heatmap covers the whole picture; antialiased like torchvision's transforms."""
    x = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    x = F.interpolate(
        x, size=(spec.size, spec.size), mode=spec.interpolation, antialias=True, align_corners=False
    ).clamp_(0.0, 1.0)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
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
                scored = [e for e in result.explanations if not e.is_tiles]  # layer channels are no heatmap
                values = iter(
                    evaluate_batch(
                        self.explainer.inference_model(batch),
                        batch,
                        scored,
                        sizes,
                        per_image,
                        self.options.metrics,
                        result.logits,
                    )
                )
                metrics = [None if e.is_tiles else next(values) for e in result.explanations]
        arrays = _to_numpy(result, metrics) if result is not None else None
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
        outputs += [e.get("heatmap") for e in record.get("explanations", []) if e.get("heatmap")]
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
        if arrays is None:
            return record
        assert entry.image is not None
        record["height"], record["width"] = (int(v) for v in entry.image.shape[:2])
        record["predictions"] = [
            {"index": int(c), "label": loaded.label(int(c)), "score": float(s)}
            for c, s in zip(arrays["top_index"][i], arrays["top_score"][i], strict=True)
        ]
        name = Path(entry.item.key).name
        topk = self.target.topk > 1
        for e in arrays["explanations"]:
            index = int(e["targets"][i])
            stem = f"{name}.{e['method']}" + (f".c{index}" if topk else "")
            record["explanations"].append(
                {
                    "method": e["method"],
                    "layer": e["layer"],
                    "target": {"index": index, "label": loaded.label(index), "score": float(e["scores"][i])},
                    "overlay": f"{stem}.{self.options.overlay_format}",
                    "heatmap": f"{stem}.npy" if self.options.save_heatmap else None,
                    "warning": "flat map" if e["flat"][i] else None,
                }
            )
            if e["metrics"] is not None:
                record["explanations"][-1]["metrics"] = _metrics_json(e["metrics"], i)
            if e["channels"] is not None:
                record["explanations"][-1]["channels"] = [int(c) for c in e["channels"][i]]
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
                for e, meta in zip(arrays["explanations"], record["explanations"], strict=True):
                    if e["channels"] is not None:  # layer channels (N, h, w): one tile each
                        raw = e["maps"][i]
                        picture = tile_grid(colorize(raw, options.colormap))
                    else:
                        raw = heatmap_at_size(e["maps"][i], width, height)
                        if raw.ndim == 3:  # input gradient (H, W, 3): deprocessed image
                            picture = gradient_image(raw)
                        else:
                            picture = overlay(entry.image, raw, options.colormap, options.alpha)
                    panels.append((picture, meta))
                    if options.grid_only:
                        continue
                    atomic_write(folder / meta["overlay"], encode_image(picture, options.overlay_format))
                    if meta["heatmap"]:
                        atomic_write(folder / meta["heatmap"], npy_bytes(raw.astype(np.float32)))
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


def _to_numpy(result: BatchResult, metrics: list[dict[str, torch.Tensor] | None] | None = None) -> dict[str, Any]:
    """Everything the writers need from a batch, moved to the CPU once."""
    probs = result.logits.float().softmax(1)
    top = probs.topk(min(5, probs.shape[1]), dim=1)
    explanations = []
    for n, e in enumerate(result.explanations):
        explanations.append(
            {
                "method": e.method,
                "layer": e.layer,
                "targets": e.targets.cpu().numpy(),
                "scores": probs.gather(1, e.targets[:, None]).squeeze(1).cpu().numpy(),
                "maps": e.maps.float().cpu().numpy(),
                "flat": e.flat.cpu().numpy(),
                "metrics": None
                if metrics is None or metrics[n] is None
                else {k: v.cpu().numpy() for k, v in metrics[n].items()},
                "channels": None if e.channels is None else e.channels.cpu().numpy(),
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
