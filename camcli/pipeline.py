"""Folder runs: prefetch (decode + resize in threads) -> engine (one pass per batch) ->
writers (render + atomic writes in a background thread, the JSON last).

The model thread never waits on disk: decoding of batch n+1 runs while batch n is on
the model, and rendering/writing of batch n runs while batch n+1 is. Maps are moved to
the CPU and converted to numpy once per batch.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from camcli import __version__
from camcli.boxes import BoxIndex, box_iou, map_boxes
from camcli.engine import BatchResult, Explainer, TargetSpec
from camcli.errors import ImageError, OutputError, UsageError
from camcli.io import (
    DEFAULT_MAX_PIXELS,
    InputItem,
    atomic_write,
    decode_image,
    encode_image,
    json_bytes,
    npy_bytes,
    remove_stale_temps,
)
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
from camcli.resume import Prior, output_files, prior_result

if TYPE_CHECKING:
    from camcli.metrics import MetricOptions

SCHEMA_VERSION = 1

# A batch read from a stream (paths on stdin) starts once it is full or this long after
# its first path arrived, so a slow producer's first image is explained at once.
STREAM_WAIT_S = 0.25


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
    stream_wait: float = STREAM_WAIT_S  # a streamed batch waits at most this for more paths


@dataclass
class RunSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    interrupted: bool = False  # Ctrl-C: stopped after the batch on the model, writes finished
    disk_full: str | None = None  # the first write that found the disk full: the run stopped there
    errors: list[str] = field(default_factory=list)

    @property
    def seen(self) -> int:
        return self.done + self.skipped + self.failed


@dataclass
class _Decoded:
    item: InputItem
    image: np.ndarray | None = None  # RGB uint8, original size
    tensor: torch.Tensor | None = None  # (3, S, S) normalised model input
    error: str | None = None
    prior: Prior | None = None  # what an earlier run left (kept explanations, files to remove)


# ITU-R BT.601 luma, the weights of Pillow's convert("L") and OpenCV's RGB2GRAY
LUMINANCE = (0.299, 0.587, 0.114)


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


class ExplainRun:
    """One `camcli explain` over a list (or a stream) of inputs."""

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
        self.request = request  # what a re-run must match to keep an image's earlier results
        self._writes_pending = threading.BoundedSemaphore(4 * options.batch_size)
        self._explainers = {tuple(m.name for m in explainer.methods): explainer}

    def run(
        self,
        items: Iterable[InputItem],
        emit: Callable[[dict[str, Any]], None],
        report_error: Callable[[str], None],
        advance: Callable[[int], None],
    ) -> RunSummary:
        """Explain `items` (a list, or an iterator such as paths read from stdin: work
        starts with the first); `emit` gets each image's record in input order.

        A first Ctrl-C stops the run after the batch on the model: writes already queued
        finish, nothing is left half-written, and the summary says ``interrupted``. A full
        disk stops it too (``disk_full``): the files of that image are not left, and the same
        command resumes once there is room.
        """
        summary = RunSummary()
        writes: list[tuple[_Decoded, Future[None]]] = []
        with (
            _stop_on_sigint() as stop,
            ThreadPoolExecutor(self.options.workers, thread_name_prefix="camcli-decode") as decoder,
            ThreadPoolExecutor(1, thread_name_prefix="camcli-write") as writer,
            self.explainer.session(),
        ):
            for batch in self._batches(items, decoder, stop):
                if stop.is_set() or summary.disk_full:
                    summary.interrupted = stop.is_set()
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

    def _batches(
        self, items: Iterable[InputItem], decoder: ThreadPoolExecutor, stop: threading.Event
    ) -> Iterator[list[Any]]:
        """Batches of decoded inputs (or earlier records), decoding one batch ahead when the
        next inputs are at hand; a stream never waits for paths while a batch is ready."""
        chunks = _Chunks(items, self.options.batch_size, self.options.stream_wait, stop)
        pending: list[Any] | None = None
        exhausted = False
        while not exhausted or pending is not None:
            chunk = None if exhausted else chunks.take(block=pending is None)
            exhausted = exhausted or chunk is _END
            submitted = None
            if isinstance(chunk, list):
                remove_stale_temps(self.options.out_dir, (item.key for item in chunk))
                submitted = [self._plan(item, decoder) for item in chunk]
            if pending is not None:
                yield [entry.result() if isinstance(entry, Future) else entry for entry in pending]
            pending = submitted

    def _plan(self, item: InputItem, decoder: ThreadPoolExecutor) -> dict[str, Any] | Future[_Decoded]:
        """An earlier run's record if it has every requested method, else the decode job."""
        prior = None
        if not self.options.grid_only:
            prior = prior_result(self.options.out_dir, item, self.request)
            if self.options.overwrite:
                prior = Prior(prior.record, False, prior.missing)
            elif prior.finished:
                assert prior.record is not None
                return prior.record
        return decoder.submit(self._decode, item, prior)

    def _decode(self, item: InputItem, prior: Prior | None = None) -> _Decoded:
        try:
            image = decode_image(item.path, self.options.max_pixels)
            return _Decoded(item, image, preprocess(image, self.loaded.input), prior=prior)
        except ImageError as exc:
            return _Decoded(item, error=str(exc), prior=prior)
        except Exception as exc:  # noqa: BLE001 - a broken file must not stop the run
            return _Decoded(item, error=f"cannot decode: {type(exc).__name__}: {exc}", prior=prior)

    def _todo(self, entry: _Decoded) -> tuple[str, ...]:
        """The methods to run for an image: those an earlier, reusable result lacks, or all."""
        prior = entry.prior
        if prior is not None and prior.reusable:
            return prior.missing
        return tuple(m.name for m in self.explainer.methods)

    def _explainer_for(self, names: tuple[str, ...]) -> Explainer:
        if names not in self._explainers:
            wanted = [m for m in self.explainer.methods if m.name in names]
            self._explainers[names] = self.explainer.with_methods(wanted)
        return self._explainers[names]

    def _explain(
        self, decoded: list[_Decoded], summary: RunSummary, report_error: Callable[[str], None]
    ) -> Iterator[tuple[_Decoded, dict[str, Any], Callable[[], None]]]:
        groups: dict[tuple[str, ...], list[_Decoded]] = {}
        for d in decoded:
            if d.error is None:
                groups.setdefault(self._todo(d), []).append(d)
        found: dict[int, tuple[dict[str, Any], int]] = {}  # id(entry) -> (its group's arrays, position)
        for names, good in groups.items():
            arrays = self._explain_group(self._explainer_for(names), good)
            for position, d in enumerate(good):
                found[id(d)] = (arrays, position)
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
            arrays, position = found[id(entry)]
            record = self._record(entry, arrays, position)
            yield entry, record, self._job(entry, record, arrays, position)

    def _explain_group(self, explainer: Explainer, good: list[_Decoded]) -> dict[str, Any]:
        """One engine pass (and the metrics) over images that need the same methods."""
        batch = torch.stack([d.tensor for d in good]).to(self.device)  # type: ignore[misc]
        boxes = self.options.boxes
        target = self.target
        if boxes is not None:  # a box's class is its image's target
            target = TargetSpec(self.target.index, per_sample=boxes.targets([d.item for d in good]))
        result = explainer.explain(batch, target)
        metrics = None
        if self.options.metrics is not None:
            from camcli.metrics import evaluate_batch

            sizes = [d.image.shape[:2] for d in good]  # type: ignore[union-attr]
            found = [boxes.lookup(d.item) for d in good] if boxes is not None else None
            per_image = [b.boxes if b is not None else None for b in found] if found is not None else None
            unscored = [e.is_tiles or e.categorical for e in result.explanations]  # no heatmap to score
            scored = [e for e, skip in zip(result.explanations, unscored, strict=True) if not skip]
            values = iter(
                evaluate_batch(explainer.net, batch, scored, sizes, per_image, self.options.metrics, result.logits)
            )
            metrics = [None if skip else next(values) for skip in unscored]
        return _to_numpy(result, metrics, self.options.score)

    # -- records and files ----------------------------------------------------------------

    def _json_path(self, item: InputItem) -> Path:
        return self.options.out_dir / f"{item.key}.json"

    def is_finished(self, item: InputItem) -> bool:
        """Whether an earlier run already explained `item` the same way (it would be skipped)."""
        if self.options.overwrite or self.options.grid_only:
            return False
        return prior_result(self.options.out_dir, item, self.request).finished

    def _record(self, entry: _Decoded, arrays: dict[str, Any] | None, i: int) -> dict[str, Any]:
        options = self.options
        truth = options.boxes.lookup(entry.item) if options.boxes is not None else None
        record = image_record(
            self.loaded,
            self.device,
            self.request,
            str(entry.item.path),
            Path(entry.item.key).name,
            arrays,
            i,
            shape=None if entry.image is None else entry.image.shape[:2],
            error=entry.error,
            topk=self.target.topk > 1 or self.target.threshold is not None,
            overlay_format=options.overlay_format,
            save_heatmap=options.save_heatmap,
            grid=options.grid,
            score=options.score,
            binary=self.explainer.layer.binary,
            save_raw=options.save_raw,
            box_threshold=options.box_threshold,
            truth=truth.boxes if truth is not None else None,
        )
        if arrays is None:
            return record
        prior = entry.prior
        if prior is not None and prior.reusable and prior.record is not None:  # add to the earlier results
            kept = prior.record["request"].get("methods", [])
            record["explanations"] = prior.record.get("explanations", []) + record["explanations"]
            record["request"] = dict(self.request, methods=[*kept, *(m for m in prior.missing if m not in kept)])
        return record

    def _job(
        self, entry: _Decoded, record: dict[str, Any], arrays: dict[str, Any] | None, i: int
    ) -> Callable[[], None]:
        """Render and write one image's files; the JSON goes last, so it marks 'done'."""
        json_path = self._json_path(entry.item)
        options = self.options

        replaced = None if options.grid_only or entry.prior is None else entry.prior.record

        kept = entry.prior.record if entry.prior is not None and entry.prior.reusable else None

        def write() -> None:
            folder = json_path.parent
            # files of an earlier result that this one no longer names go first: a crash
            # later leaves the old JSON naming a missing file (redone), never an orphan
            for name in sorted(set(output_files(replaced)) - set(output_files(record))):
                (folder / name).unlink(missing_ok=True)
            try:
                write_files(folder)
            except BaseException:  # a full disk: no file of this image that no JSON names
                if not options.grid_only:
                    for name in set(output_files(record)) - set(output_files(kept)):
                        (folder / name).unlink(missing_ok=True)
                raise

        def write_files(folder: Path) -> None:
            if arrays is not None:
                assert entry.image is not None
                height, width = entry.image.shape[:2]
                panels = []
                kept = _kept(arrays, i)  # -t positive: this image's own classes
                new = record["explanations"][len(record["explanations"]) - len(kept) :]
                for e, meta in zip(kept, new, strict=True):
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
            if isinstance(error, OutputError) and error.disk_full:
                if summary.disk_full is not None:
                    continue  # said once: every later write finds the same full disk
                summary.disk_full = message = f"{entry.item.path}: {error}"
            elif isinstance(error, OutputError):
                message = f"{entry.item.path}: {error}"
            else:
                message = f"{entry.item.path}: cannot write outputs: {error}"
            summary.errors.append(message)
            report_error(message)
        return remaining


_END = object()  # `_Chunks.take`: the inputs are exhausted


class _Chunks:
    """Batches of inputs as they become available. A list is cut into batches; any other
    iterable (paths on stdin) is read by a thread, and a batch is handed out once full or
    `wait` seconds after its first input arrived."""

    def __init__(self, items: Iterable[InputItem], size: int, wait: float, stop: threading.Event) -> None:
        self.size, self.wait, self.stop = size, wait, stop
        self._list = list(items) if isinstance(items, Sequence) else None
        self._at = 0
        self._queue: queue.Queue[Any] = queue.Queue()
        if self._list is None:
            threading.Thread(target=self._pump, args=(items,), daemon=True, name="camcli-inputs").start()

    def _pump(self, items: Iterable[InputItem]) -> None:
        try:
            for item in items:
                self._queue.put(item)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the run's thread
            self._queue.put(exc)
        self._queue.put(_END)

    def take(self, block: bool) -> list[InputItem] | object | None:
        """The next batch, `_END`, or None when `block` is False and nothing has arrived."""
        if self._list is not None:
            chunk = self._list[self._at : self._at + self.size]
            self._at += self.size
            return chunk or _END
        first = self._get(None if block else 0.0)
        if first is None or first is _END:
            return first
        chunk = [first]
        deadline = time.monotonic() + self.wait
        while len(chunk) < self.size:
            item = self._get(max(0.0, deadline - time.monotonic()))
            if item is None:
                break
            if item is _END:
                self._queue.put(_END)  # seen again by the next take
                break
            chunk.append(item)
        return chunk

    def _get(self, timeout: float | None) -> Any:
        """One queued entry; None after `timeout` (None: until one comes or Ctrl-C)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = 0.1 if end is None else min(0.1, end - time.monotonic())
            try:
                entry = self._queue.get(timeout=max(remaining, 0.0)) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                if self.stop.is_set() or (end is not None and time.monotonic() >= end):
                    return _END if self.stop.is_set() else None
                continue
            if isinstance(entry, BaseException):
                raise entry
            return entry


def _torchvision_version() -> str:
    """torchvision's version without importing it (the default model does not need it)."""
    try:
        return metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        return "not installed"


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
                "layout": e.layout,
                "grid": None if e.layout is None else [int(v) for v in e.maps.shape[-2:]],
                "details": None if e.details is None else {k: v.float().cpu().numpy() for k, v in e.details.items()},
                "contrasts": None if e.contrasts is None else e.contrasts.cpu().numpy(),
                "contrast_scores": None
                if e.contrasts is None
                else probs.gather(1, e.contrasts[:, None]).squeeze(1).cpu().numpy(),
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


def image_record(
    loaded: LoadedModel,
    device: torch.device | str,
    request: dict[str, Any],
    image: str,
    name: str,
    arrays: dict[str, Any] | None,
    i: int,
    *,
    shape: tuple[int, ...] | None = None,
    error: str | None = None,
    topk: bool = False,
    overlay_format: str = "png",
    save_heatmap: bool = False,
    grid: bool = False,
    score: str = "softmax",
    binary: bool = False,
    save_raw: bool = False,
    box_threshold: float | None = None,
    truth: list[list[int]] | None = None,
) -> dict[str, Any]:
    """The per-image JSON record (camcli/schema): image `i` of a batch's `arrays` (None for
    a failed image), its files named after `name` as the writers name them. The CLI writes
    it; the API's `ImageResult.to_json` returns it. `topk`: one file per class (-k, -t
    positive); `binary`: a one-logit model (which sign was explained); `truth`: the
    image's labelled boxes, for the localisation IoU of `box_threshold`'s boxes."""
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "image": image,
        "width": None,
        "height": None,
        "model": loaded.name,
        "weights": loaded.weights,
        "input": loaded.input.to_json(),
        "device": str(device),
        "versions": {"camcli": __version__, "torch": torch.__version__, "torchvision": _torchvision_version()},
        "predictions": [],
        "explanations": [],
        "error": error,
        "request": request,
    }
    if loaded.random_weights:  # said in the JSON as on stderr: nothing was loaded
        record["random_weights"] = True
    if score != "softmax":
        record["score"] = score
    if arrays is None:
        return record
    assert shape is not None
    record["height"], record["width"] = (int(v) for v in shape[:2])
    record["predictions"] = [
        {"index": int(c), "label": loaded.label(int(c)), "score": float(s)}
        for c, s in zip(arrays["top_index"][i], arrays["top_score"][i], strict=True)
    ]
    for e in _kept(arrays, i):
        index = int(e["targets"][i])
        stem = f"{name}.{e['method']}" + (f".c{index}" if topk else "")
        target = {"index": index, "label": loaded.label(index), "score": float(e["scores"][i])}
        if binary:  # which sign of the model's one logit was explained
            target["gradient_of"] = "logit" if index == 1 else "-logit"
        meta: dict[str, Any] = {
            "method": e["method"],
            "layer": e["layer"],
            "target": target,
            "overlay": f"{stem}.{overlay_format}",
            "heatmap": f"{stem}.npy" if save_heatmap else None,
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
        if save_raw and e["raw"] is not None:
            raw = e["raw"][i]
            meta |= {"raw_heatmap": f"{stem}.raw.npy", "raw_min": float(raw.min()), "raw_max": float(raw.max())}
        if e["contrasts"] is not None:
            other = int(e["contrasts"][i])
            meta["contrast"] = {"index": other, "label": loaded.label(other), "score": float(e["contrast_scores"][i])}
        if e["details"] is not None:
            meta["details"] = {k: float(v[i]) for k, v in e["details"].items()}
        if e["layout"] is not None:  # a layer method: the grid it was computed on and how it was read
            meta["grid"], meta["layout"] = e["grid"], e["layout"]
        if box_threshold is not None and e["channels"] is None and not e["categorical"] and e["maps"][i].ndim == 2:
            heat = heatmap_at_size(e["maps"][i], record["width"], record["height"])
            meta["boxes"] = map_boxes(heat, box_threshold)
            if truth is not None:  # the largest box against the best-matching labelled one
                found = meta["boxes"][:1]
                iou = max((box_iou(found[0], b) for b in truth), default=0.0) if found else 0.0
                meta.setdefault("metrics", {})["localisation_iou"] = iou if truth else None
        record["explanations"].append(meta)
    if grid:
        record["grid"] = f"{name}.grid.png"
    return record
