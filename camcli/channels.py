"""What each channel of a layer responds to across a folder: Zeiler & Fergus, "Visualizing
and Understanding Convolutional Networks", ECCV 2014, section 4 and fig. 2.

One streaming pass runs the images in batches up to the layer (nothing after it) and keeps,
for every chosen channel c, the `top` strongest units seen so far: a_c(n) = max_{y,x} A_c(n)
per image n (the strongest unit of the channel in that image, as in the paper's figure,
where the nine patches of a feature come from nine images), merged into a (C, top) table of
values, image indices and locations held in torch on the device. Memory is bounded by
channels x top whatever the number of images; ties keep the earlier image.

Then, per channel, each kept unit gets
- its receptive field, computed from the model: the input pixels with a non-zero gradient to
  the unit when every convolution and linear map has all-positive weights (1 / fan-in, so no
  path cancels and nothing overflows), every rectifier is the identity and every max pool
  an average pool of the same window: exactly the pixels on some path to the unit
  (`receptive_fields`; padding and borders included, no formula to get wrong);
- its projection to pixel space: the input gradient of that single activation under
  guided backprop (Springenberg et al. 2015) or the deconvnet rule (section 2.1), through
  the engine's rectifier machinery, one batched backward per channel. The deconvnet's
  reconstruction depends on the image only through the max-pooling switches: a network
  without max pooling before the layer gets the same pattern for every image (only
  shifted), which is reported as a warning.

Outputs in --out: `<model>.<layer>.c<k>.png` (row 1 the patches, row 2 the projections),
`<model>.<layer>.c<k>.json`, and `<model>.<layer>.channels.png`, a contact sheet of every
channel. The pass checkpoints its table to `<model>.<layer>.channels-state.json`, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from camcli import __version__
from camcli.engine import _RectifierMode, frozen, layer_output
from camcli.errors import ImageError, UsageError
from camcli.io import DEFAULT_MAX_PIXELS, InputItem, atomic_write, decode_image, encode_image, json_bytes, read_json
from camcli.methods import InputGradientMethod, get_method
from camcli.models import LayerInfo, LoadedModel
from camcli.render import comparison_grid, gradient_image, resize
from camcli.run.local import stop_on_sigint
from camcli.run.stages import preprocess

PROJECTIONS = ("guided-backprop", "deconvnet")
STATE_VERSION = 1


@dataclass(frozen=True)
class ChannelsOptions:
    out_dir: Path
    channels: tuple[int, ...]
    top: int = 9
    projection: str = "guided-backprop"
    batch_size: int = 8
    workers: int = 2
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    checkpoint_every: int = 25  # batches between checkpoints of the table (and at the end, and on Ctrl-C)
    panel_size: int = 96  # cell height of the per-channel grids


@dataclass
class ChannelsSummary:
    images: int = 0  # images whose activations entered the table (this run and earlier ones)
    failed: int = 0
    skipped: bool = False  # every channel finished by an earlier run with the same request
    interrupted: bool = False
    written: list[Path] = field(default_factory=list)


def parse_channels(spec: str, count: int) -> tuple[int, ...]:
    """`--channels`: ``all``, or a comma list of indices and ranges (``0-15,32``)."""
    if spec.strip().lower() == "all":
        return tuple(range(count))
    chosen: list[int] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise UsageError(f"--channels expects 'all' or indices and ranges like 0-15,32, not {spec!r}")
        first, last = int(lo), int(hi) if dash else int(lo)
        if first > last:
            raise UsageError(f"--channels range {part} is empty")
        chosen.extend(range(first, last + 1))
    if not chosen:
        raise UsageError("--channels names no channel")
    if max(chosen) >= count:
        raise UsageError(f"--channels {max(chosen)} is out of range: the layer has {count} channels (0-{count - 1})")
    return tuple(dict.fromkeys(chosen))


class TopUnits:
    """Per channel the `k` strongest (value, image, location) seen so far, as (C, k) tensors."""

    def __init__(self, channels: int, k: int, device: torch.device) -> None:
        self.k = k
        self.values = torch.full((channels, k), -math.inf, device=device)
        self.images = torch.full((channels, k), -1, dtype=torch.long, device=device)
        self.locations = torch.full((channels, k), -1, dtype=torch.long, device=device)

    def update(self, activations: Tensor, images: Tensor) -> None:
        """Merge a batch: `activations` (B, C, h, w) of the chosen channels, `images` (B,) indices."""
        best, where = activations.flatten(2).float().max(2)  # (B, C): each image's strongest unit
        values = torch.cat([self.values, best.T], 1)
        order = values.sort(dim=1, descending=True, stable=True).indices[:, : self.k]  # earlier entries win ties
        batch_images = images[None].expand(best.shape[1], -1)
        self.values = values.gather(1, order)
        self.images = torch.cat([self.images, batch_images], 1).gather(1, order)
        self.locations = torch.cat([self.locations, where.T], 1).gather(1, order)

    def state(self) -> dict[str, Any]:
        return {"values": self.values.tolist(), "images": self.images.tolist(), "locations": self.locations.tolist()}

    def load(self, state: dict[str, Any]) -> None:
        device = self.values.device
        self.values = torch.tensor(state["values"], dtype=torch.float32, device=device)
        self.images = torch.tensor(state["images"], dtype=torch.long, device=device)
        self.locations = torch.tensor(state["locations"], dtype=torch.long, device=device)


# --- receptive fields -----------------------------------------------------------------------


class _StructuralMode(TorchFunctionMode):
    """The model's own graph with positive weights, identity rectifiers and average pools
    in place of max pools: a unit's input gradient is then > 0 exactly on its receptive
    field. Records whether a max pool was met (the deconvnet's switches)."""

    def __init__(self) -> None:
        super().__init__()
        self.max_pools = 0

    def __torch_function__(self, func: Any, types: Any, args: Sequence = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in (F.conv1d, F.conv2d, F.conv3d):
            x, weight = args[0], args[1]
            fan_in = weight[0].numel()
            rest = list(args[3:])
            return func(x, torch.full_like(weight, 1.0 / fan_in), None, *rest, **{k: v for k, v in kwargs.items()})
        if func is F.linear:
            weight = args[1]
            return func(args[0], torch.full_like(weight, 1.0 / weight.shape[1]), None)
        if func in (F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, F.relu6, F.hardtanh):
            return args[0]
        if func is F.batch_norm:
            return args[0]
        if func is F.max_pool2d:
            self.max_pools += 1
            names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
            given = dict(zip(names, args[1:], strict=False)) | {k: v for k, v in kwargs.items() if k in names}
            if given.get("dilation", 1) not in (1, (1, 1)):
                raise UsageError("receptive fields of dilated max pooling are not supported")
            return F.avg_pool2d(
                args[0],
                given["kernel_size"],
                given.get("stride"),
                given.get("padding", 0),
                ceil_mode=given.get("ceil_mode", False),
                count_include_pad=False,
            )
        if func is F.adaptive_max_pool2d:
            self.max_pools += 1
            return F.adaptive_avg_pool2d(args[0], args[1] if len(args) > 1 else kwargs["output_size"])
        return func(*args, **kwargs)


def receptive_fields(
    model: nn.Module, module: nn.Module, units: Tensor, size: int, chunk: int = 8
) -> tuple[Tensor, int]:
    """(N, 4) boxes x0, y0, x1, y1 (end exclusive, model-input pixels) of `units` (N, 3) =
    (channel, y, x) of `module`'s output; and how many max pools the forward met."""
    device = units.device
    boxes = []
    mode = _StructuralMode()
    with frozen(model):
        for part in units.split(chunk):
            leaf = torch.ones(len(part), 3, size, size, device=device, requires_grad=True)
            with torch.enable_grad(), mode:
                acts = layer_output(model, module, leaf)
            picked = acts[torch.arange(len(part), device=device), part[:, 0], part[:, 1], part[:, 2]]
            (gradient,) = torch.autograd.grad(picked.sum(), leaf, allow_unused=True)
            if gradient is None:
                raise UsageError("the layer does not depend on the input")
            reach = gradient.abs().sum(1) > 0  # (n, H, W)
            rows, cols = reach.any(2), reach.any(1)
            for r, c in zip(rows, cols, strict=True):
                ys, xs = r.nonzero().squeeze(1), c.nonzero().squeeze(1)
                if len(ys) == 0:
                    raise UsageError("a unit of the layer does not depend on the input")
                boxes.append(torch.stack([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]))
    return torch.stack(boxes), mode.max_pools


# --- projections ----------------------------------------------------------------------------


def project_units(model: nn.Module, module: nn.Module, inputs: Tensor, units: Tensor, method: str) -> Tensor:
    """(N, 3, H, W) input gradient of the single activation units[n] = (c, y, x) of image
    inputs[n], every rectifier passing gradients back by `method`'s rule; one backward."""
    rule_of = get_method(method)
    if not isinstance(rule_of, InputGradientMethod) or rule_of.rectifier_backward is None:
        raise UsageError(f"--projection must be one of {', '.join(PROJECTIONS)}, not {method!r}")
    leaf = inputs.detach().clone().requires_grad_(True)
    with frozen(model), torch.enable_grad(), _RectifierMode(rule_of.rectifier_backward, method):
        acts = layer_output(model, module, leaf)
        picked = acts[torch.arange(len(units), device=units.device), units[:, 0], units[:, 1], units[:, 2]]
        (gradient,) = torch.autograd.grad(picked.sum(), leaf)
    return gradient.nan_to_num(0.0)


# --- the run --------------------------------------------------------------------------------


class ChannelsRun:
    """One `camcli channels` over a list of inputs."""

    def __init__(
        self,
        loaded: LoadedModel,
        layer: LayerInfo,
        device: torch.device,
        options: ChannelsOptions,
    ) -> None:
        self.loaded = loaded
        self.layer = layer
        self.device = device
        self.options = options
        self.model = loaded.model
        self.module = dict(self.model.named_modules())[layer.name]
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in loaded.name)
        self.prefix = f"{stem}.{layer.name}"
        if options.projection not in PROJECTIONS:
            raise UsageError(f"--projection must be one of {', '.join(PROJECTIONS)}, not {options.projection!r}")
        self.request = {
            "model": loaded.name,
            "weights": loaded.weights,
            "layer": layer.name,
            "channels": list(options.channels),
            "top": options.top,
            "projection": options.projection,
            "input": loaded.input.to_json(),
        }

    # -- paths ---------------------------------------------------------------------------

    def _state_path(self) -> Path:
        return self.options.out_dir / f"{self.prefix}.channels-state.json"

    def channel_paths(self, channel: int) -> tuple[Path, Path]:
        base = self.options.out_dir / f"{self.prefix}.c{channel}"
        return base.with_name(base.name + ".png"), base.with_name(base.name + ".json")

    def sheet_path(self) -> Path:
        return self.options.out_dir / f"{self.prefix}.channels.png"

    # -- stages --------------------------------------------------------------------------

    def run(self, items: Sequence[InputItem], report_error: Callable[[str], None]) -> ChannelsSummary:
        summary = ChannelsSummary()
        fingerprint = hashlib.sha256("\n".join(f"{i.path}\t{i.key}" for i in items).encode()).hexdigest()
        table = TopUnits(len(self.options.channels), self.options.top, self.device)
        state = None if self.options.overwrite else read_json(self._state_path())
        start, failed = 0, []
        if state is not None and state.get("request") == self.request and state.get("inputs") == fingerprint:
            table.load(state["table"])
            start, failed, summary.images = state["done"], state["failed"], state["images"]
        if start == len(items) and self._outputs_done():
            summary.failed, summary.skipped = len(failed), True
            return summary
        if self.device.type == "cpu":  # as the explain engine: same values, faster oneDNN convolutions
            self.model.to(memory_format=torch.channels_last)
        with stop_on_sigint() as stop:
            if start < len(items):
                start = self._stream(items, fingerprint, start, table, summary, failed, report_error, stop.is_set)
                self._save_state(fingerprint, start, table, summary, failed)
            summary.failed = len(failed)
            if start < len(items):
                summary.interrupted = True
                return summary
            self._finish(items, table, summary, report_error, stop.is_set)
        return summary

    def _outputs_done(self) -> bool:
        """Every channel's grid and JSON (of this request) and the contact sheet are there."""
        for channel in self.options.channels:
            png_path, json_path = self.channel_paths(channel)
            record = read_json(json_path)
            if record is None or record.get("request") != self.request or not png_path.is_file():
                return False
        return self.sheet_path().is_file()

    def _stream(
        self,
        items: Sequence[InputItem],
        fingerprint: str,
        start: int,
        table: TopUnits,
        summary: ChannelsSummary,
        failed: list[str],
        report_error: Callable[[str], None],
        stopped: Callable[[], bool],
    ) -> int:
        """The streaming pass from item `start`; returns how many items are done."""
        size = self.options.batch_size
        chosen = torch.tensor(self.options.channels, device=self.device)
        memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        done = start
        with ThreadPoolExecutor(self.options.workers, thread_name_prefix="camcli-decode") as decoder:
            for n, (first, decoded) in enumerate(self._batches(items, start, size, decoder)):
                good = []
                for index, tensor, error, _ in decoded:
                    if error is not None:
                        failed.append(str(items[index].path))
                        report_error(f"{items[index].path}: {error}")
                    else:
                        good.append((index, tensor))
                if good:
                    batch = torch.stack([t for _, t in good]).to(self.device).contiguous(memory_format=memory_format)
                    with frozen(self.model), torch.inference_mode():
                        acts = layer_output(self.model, self.module, batch).index_select(1, chosen)
                    finite = acts.flatten(1).isfinite().all(1).tolist()
                    keep = [i for i, ok in enumerate(finite) if ok]
                    for (index, _), ok in zip(good, finite, strict=True):
                        if not ok:
                            failed.append(str(items[index].path))
                            report_error(f"{items[index].path}: the layer's activations are not finite (NaN or inf)")
                    if keep:
                        ids = torch.tensor([good[i][0] for i in keep], device=self.device)
                        table.update(acts[keep] if len(keep) < len(good) else acts, ids)
                        summary.images += len(keep)
                done = first + len(decoded)
                if (n + 1) % self.options.checkpoint_every == 0:
                    self._save_state(fingerprint, done, table, summary, failed)
                if stopped():
                    decoder.shutdown(wait=False, cancel_futures=True)
                    break
        return done

    def _batches(
        self, items: Sequence[InputItem], start: int, size: int, decoder: ThreadPoolExecutor
    ) -> Iterator[tuple[int, list[tuple[int, Tensor | None, str | None, tuple[int, int]]]]]:
        """(first index, decoded batch), decoding one batch ahead of the model."""
        firsts = list(range(start, len(items), size))
        pending = None
        for first in [*firsts, None]:
            submitted = None
            if first is not None:
                stop = min(first + size, len(items))
                submitted = (first, [decoder.submit(self._decode, i, items[i]) for i in range(first, stop)])
            if pending is not None:
                yield pending[0], [f.result() for f in pending[1]]
            pending = submitted

    def _decode(self, index: int, item: InputItem) -> tuple[int, Tensor | None, str | None, tuple[int, int]]:
        """(index, model input, error, (width, height) of the image as decoded)."""
        try:
            image = decode_image(item.path, self.options.max_pixels)
            return index, preprocess(image, self.loaded.input), None, (image.shape[1], image.shape[0])
        except ImageError as exc:
            return index, None, str(exc), (0, 0)
        except Exception as exc:  # noqa: BLE001 - a broken file must not stop the run
            return index, None, f"cannot decode: {type(exc).__name__}: {exc}", (0, 0)

    def _save_state(
        self, fingerprint: str, done: int, table: TopUnits, summary: ChannelsSummary, failed: list[str]
    ) -> None:
        state = {
            "version": STATE_VERSION,
            "request": self.request,
            "inputs": fingerprint,
            "done": done,
            "images": summary.images,
            "failed": failed,
            "table": table.state(),
        }
        atomic_write(self._state_path(), json_bytes(state))

    def _finish(
        self,
        items: Sequence[InputItem],
        table: TopUnits,
        summary: ChannelsSummary,
        report_error: Callable[[str], None],
        stopped: Callable[[], bool],
    ) -> None:
        """Receptive fields, projections, grids and JSON for every channel not yet written."""
        spec = self.loaded.input
        height = spec.size
        valid = table.images >= 0  # (C, k): fewer images than --top leave empty slots
        h, w = self._layer_shape()
        units = torch.stack(
            [
                torch.tensor(self.options.channels, device=self.device)[:, None].expand_as(table.locations),
                table.locations.clamp(min=0) // w,
                table.locations.clamp(min=0) % w,
            ],
            -1,
        )  # (C, k, 3)
        flat_units = units[valid]
        boxes = torch.zeros(*units.shape[:2], 4, dtype=torch.long, device=self.device)
        max_pools = 0
        if len(flat_units):
            found, max_pools = receptive_fields(self.model, self.module, flat_units, height)
            boxes[valid] = found
        full = (boxes[..., 2:] - boxes[..., :2]).amax((0, 1)) if len(flat_units) else torch.tensor([1, 1])
        full_w, full_h = int(full[0]), int(full[1])
        warning = None
        if self.options.projection == "deconvnet" and max_pools == 0:
            warning = (
                "deconvnet without max pooling before the layer: the projection does not depend on the image "
                "(no switches), only on the unit's position; guided-backprop is the image-specific one"
            )
            report_error(f"warning: {warning}")
        sheet_cells = []
        for row, channel in enumerate(self.options.channels):
            png_path, json_path = self.channel_paths(channel)
            kept = int(valid[row].sum())
            if stopped():
                summary.interrupted = True
                return
            ids = table.images[row, :kept].tolist()
            decoded = [self._decode(i, items[i]) for i in ids]
            broken = [items[i].path for i, t, _, _ in decoded if t is None]
            if broken:  # changed on disk since the pass
                report_error(f"{broken[0]}: cannot be read again for channel {channel}")
                summary.failed += 1
                continue
            patches, projections = [], []
            if kept:
                inputs = torch.stack([t for _, t, _, _ in decoded]).to(self.device)  # type: ignore[misc]
                gradients = project_units(self.model, self.module, inputs, units[row, :kept], self.options.projection)
                pictures = _deprocess(inputs, spec.mean, spec.std)
                patches, projections = _crops(pictures, gradients, boxes[row, :kept], full_h, full_w)
            scale = [size for _, _, _, size in decoded]
            top = []
            for rank in range(kept):
                x0, y0, x1, y1 = (int(v) for v in boxes[row, rank])
                width, height_px = scale[rank]
                sx, sy = width / spec.size, height_px / spec.size
                top.append(
                    {
                        "rank": rank + 1,
                        "image": str(items[ids[rank]].path),
                        "value": float(table.values[row, rank]),
                        "location": {"y": int(units[row, rank, 1]), "x": int(units[row, rank, 2])},
                        "box": [x0, y0, x1, y1],
                        "box_in_image": [round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy)],
                    }
                )
            record = {
                "camcli": __version__,
                "model": self.loaded.name,
                "weights": self.loaded.weights,
                "layer": self.layer.name,
                "layer_shape": [h, w],
                "channel": channel,
                "projection": self.options.projection,
                "images_seen": summary.images,
                "grid": png_path.name,
                "top": top,
                "warning": warning,
                "request": self.request,
            }
            grid = self._channel_grid(channel, top, patches, projections, items, ids)
            atomic_write(png_path, encode_image(grid))
            atomic_write(json_path, json_bytes(record))
            summary.written += [png_path, json_path]
            sheet_cells.append((_mosaic(projections, self.options.top), _mosaic(patches, self.options.top), top))
        atomic_write(self.sheet_path(), encode_image(_contact_sheet(self.options.channels, sheet_cells)))
        summary.written.append(self.sheet_path())

    def _layer_shape(self) -> tuple[int, int]:
        return self.layer.spatial

    def _channel_grid(
        self,
        channel: int,
        top: list[dict[str, Any]],
        patches: list[np.ndarray],
        projections: list[np.ndarray],
        items: Sequence[InputItem],
        ids: list[int],
    ) -> np.ndarray:
        """Row 1: the receptive-field patches; row 2: their projections (the paper's fig. 2 pairs)."""
        if not top:
            blank = np.full((8, 8, 3), 255, dtype=np.uint8)
            return comparison_grid([[(blank, f"channel {channel}", "no image")]], self.options.panel_size)
        first = [
            (
                p,
                f"#{t['rank']} {Path(t['image']).name}",
                f"{t['value']:.3g} at y{t['location']['y']},x{t['location']['x']}",
            )
            for p, t in zip(patches, top, strict=True)
        ]
        second = [(g, f"c{channel} {self.options.projection}", "") for g in projections]
        return comparison_grid([first, second], self.options.panel_size)


def _deprocess(inputs: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N, 3, S, S) normalised -> (N, S, S, 3) RGB uint8: the pixels the model saw."""
    m = torch.tensor(mean, device=inputs.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=inputs.device).view(1, 3, 1, 1)
    rgb = (inputs * s + m).clamp(0, 1).mul(255).round().to(torch.uint8)
    return rgb.permute(0, 2, 3, 1).cpu().numpy()


def _crops(
    pictures: np.ndarray, gradients: Tensor, boxes: Tensor, full_h: int, full_w: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each unit's receptive-field patch and projection, on a grey canvas of the full field's
    size (a field cut by the border keeps its place: flush with the side that was cut)."""
    grads = gradients.permute(0, 2, 3, 1).float().cpu().numpy()
    size = pictures.shape[1]
    patches, projections = [], []
    for picture, grad, box in zip(pictures, grads, boxes.tolist(), strict=True):
        x0, y0, x1, y1 = box
        top = full_h - (y1 - y0) if y0 == 0 and y1 < size else 0
        left = full_w - (x1 - x0) if x0 == 0 and x1 < size else 0
        patch = np.full((full_h, full_w, 3), 128, dtype=np.uint8)
        patch[top : top + y1 - y0, left : left + x1 - x0] = picture[y0:y1, x0:x1]
        projection = np.full((full_h, full_w, 3), 128, dtype=np.uint8)
        projection[top : top + y1 - y0, left : left + x1 - x0] = gradient_image(grad[y0:y1, x0:x1])
        patches.append(patch)
        projections.append(projection)
    return patches, projections


def _mosaic(pictures: list[np.ndarray], top: int, cell: int = 40) -> np.ndarray:
    """ceil(sqrt(top)) x ceil(sqrt(top)) cells, row by row (the paper's 3 x 3 blocks)."""
    side = math.ceil(math.sqrt(top))
    mosaic = np.full((side * cell, side * cell, 3), 255, dtype=np.uint8)
    for i, picture in enumerate(pictures):
        r, c = divmod(i, side)
        mosaic[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = resize(picture, cell, cell)
    return mosaic


def _contact_sheet(channels: Sequence[int], cells: list[Any]) -> np.ndarray:
    """Every channel of this run: its projections' block beside its patches' block, 4 channels a row."""
    shown = [(c, cell) for c, cell in zip(channels, cells, strict=True) if cell is not None]
    if not shown:
        blank = np.full((8, 8, 3), 255, dtype=np.uint8)
        return comparison_grid([[(blank, "no channel computed", "in this run")]], 96)
    panels = []
    for channel, (projections, patches, top) in shown:
        gap = np.full((projections.shape[0], 4, 3), 255, dtype=np.uint8)
        best = f"max {top[0]['value']:.3g}" if top else "no image"
        panels.append((np.concatenate([projections, gap, patches], 1), f"channel {channel}", best))
    per_row = 4
    rows = [panels[i : i + per_row] for i in range(0, len(panels), per_row)]
    return comparison_grid(rows, panels[0][0].shape[0])
