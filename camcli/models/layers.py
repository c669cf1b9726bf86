"""Target layers: one traced dry forward, the automatic layer, and the linear head behind it."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from camcli.errors import UsageError
from camcli.models.layouts import AMBIGUOUS, NCHW_DEFAULT, Layout, detect, model_hints
from camcli.models.outputs import OutputKey, raw_output, select_logits
from camcli.models.spec import InputSpec

POOLING_MODULES = (  # never a target layer: they pool features, they are not features
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.LPPool2d,
    nn.FractionalMaxPool2d,
    nn.AdaptiveAvgPool1d,  # Hugging Face Swin's pooler over tokens
    nn.AdaptiveMaxPool1d,
    nn.AvgPool1d,
    nn.MaxPool1d,
)


@dataclass(frozen=True)
class LayerInfo:
    """The resolved target layer and what a dry forward learned about the model."""

    name: str
    as_consumed: bool  # read the tensor after in-place ops downstream (what is pooled)
    channels: int
    spatial: tuple[int, int]
    num_classes: int
    head: str | None  # the linear module mapping GAP(layer) to the logits, if any
    binary: bool = False  # one logit z, read as the classes [-z, z] (camcli.models.outputs)
    layout: Layout = field(default=NCHW_DEFAULT)  # how its output is read as (B, C, h, w)


@dataclass(frozen=True)
class ForwardTrace:
    """What one dry forward (and backward) on a probe input saw, shared by layer resolution
    and `camcli layers`."""

    calls: list[tuple[str, Tensor, int]]  # (module name, tensor output, its _version after the call), in order
    linears: list[tuple[str, Tensor]]  # the nn.Linear calls among them
    logits: Tensor
    kept: Tensor | None  # a copy of the `keep` module's output, in case later in-place ops change it
    binary: bool = False  # the model returns one logit (read as two classes)
    layouts: list[Layout | str] = field(default_factory=list)  # per call: its layout, or why it is no map
    reaches: list[bool] = field(default_factory=list)  # per call: the top logit's gradient reaches its grid


# Never auto: attention internals, embeddings and stems (the first layers, not what the head reads).
_SKIPPED_CLASS = re.compile(r"^(?!.*block).*((attention|attn)\d*(v\d)?$|embed|stem)", re.IGNORECASE)
_SKIPPED_NAME = {"attn", "attention", "self_attention", "self_attn", "cross_attn", "patch_embed", "stem"}
_SKIPPED_NAME |= {"embeddings", "conv_proj", "pos_embed", "pos_drop", "patch_drop"}


def skipped_by_auto(name: str, modules: dict[str, nn.Module]) -> bool:
    """True for a module inside (or being) an attention, an embedding or a stem."""
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        path = ".".join(parts[:depth])
        if parts[depth - 1] in _SKIPPED_NAME or _SKIPPED_CLASS.search(type(modules[path]).__name__):
            return True
    return False


def trace_forward(
    model: nn.Module, spec: InputSpec, device: torch.device, keep: str | None = None, output_key: OutputKey = None
) -> ForwardTrace:
    """One forward of a fixed random probe with a hook on every module, and one backward from
    the head: each output's layout, and whether the gradient reaches its grid (after a class
    token ViT's last attention only the class token gets any). Hooks come off in `finally`.
    The output is read as logits by `select_logits` (`output_key` as `--output-key`)."""
    calls: list[tuple[str, Tensor, int]] = []
    linears: list[tuple[str, Tensor]] = []
    kept: list[Tensor] = []
    features: list[tuple[Tensor, Tensor]] = []  # (input, output) of each Linear: a head's input

    def hook(name: str):
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                calls.append((name, output, output._version))
                if name == keep:
                    kept[:] = [output.detach().clone()]
                if isinstance(module, nn.Linear):
                    linears.append((name, output))
                    if inputs and isinstance(inputs[0], Tensor):
                        features.append((inputs[0], output))

        return record

    modules = dict(model.named_modules())
    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items() if n]
    modes = [(module, module.training) for module in model.modules()]
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(1, spec.channels, spec.size, spec.size, generator=generator).to(device)
    try:
        model.eval()
        with torch.enable_grad():
            output = model(probe)
    except Exception as exc:  # the model's own refusal (a fixed input size, a channel count): one line
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise UsageError(
            f"the model cannot run a {spec.channels}x{spec.size}x{spec.size} input "
            f"({type(exc).__name__}: {reason}); --input-size must be a size this model can run"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:  # each module's own flag: model.train(x) would set them all alike
            module.training = mode
    logits = select_logits(output, output_key)
    raw = raw_output(output, output_key)
    binary = raw.ndim == 1 or raw.shape[-1] == 1
    hints = model_hints(model)
    size = (spec.size, spec.size)
    layouts = [detect(tuple(out.shape), size, 1, hints, modules[name]) for name, out, _ in calls]
    if hints.prefix is None:  # the model does not say: the prefix every unambiguous token layer has
        seen = {layout.prefix for layout in layouts if isinstance(layout, Layout) and layout.kind == "tokens"}
        if len(seen) == 1:
            evidence = replace(hints, prefix=seen.pop())
            layouts = [
                detect(tuple(out.shape), size, 1, evidence, modules[name]) if isinstance(layout, str) else layout
                for (name, out, _), layout in zip(calls, layouts, strict=True)
            ]
    layouts = _inherit_layouts(calls, layouts)
    source = next((i for i, o in reversed(features) if o is logits), logits)
    if hasattr(model, "unroll") and hasattr(model, "reroll"):  # timm Hiera: tokens unrolled but in the last stage
        grids = [layout.grid for layout in layouts if isinstance(layout, Layout) and layout.kind == "tokens"]
        layouts = [
            f"{tuple(out.shape)}: Hiera's tokens are in unrolled order before its last stage, no raster grid"
            if isinstance(layout, Layout) and layout.kind == "tokens" and grids and layout.grid != grids[-1]
            else layout
            for (_, out, _), layout in zip(calls, layouts, strict=True)
        ]
    reaches = _gradient_reaches(source, calls, layouts)
    detached = [(name, out.detach(), version) for name, out, version in calls]
    return ForwardTrace(
        detached,
        [(n, o.detach()) for n, o in linears],
        logits.detach(),
        kept[0] if kept else None,
        binary,
        layouts,
        reaches,
    )


def _inherit_layouts(calls: list[tuple[str, Tensor, int]], layouts: list[Layout | str]) -> list[Layout | str]:
    """A 4-D output that reads as NCHW and NHWC alike (a ReLU after a convolution on a tiny
    grid) takes the layout of the latest earlier output of the very same shape that its
    module settled (the convolution feeding it): element-wise layers keep their input's
    layout. With no such output it stays refused."""
    settled: dict[tuple[int, ...], Layout] = {}
    result: list[Layout | str] = []
    for (_, out, _), layout in zip(calls, layouts, strict=True):
        shape = tuple(out.shape)
        if isinstance(layout, Layout):
            settled[shape] = layout
        elif AMBIGUOUS in layout and shape in settled:
            layout = settled[shape]
        result.append(layout)
    return result


def _gradient_reaches(source: Tensor, calls: list[tuple[str, Tensor, int]], layouts: list[Layout | str]) -> list[bool]:
    """Per call: does the gradient of `source` (the head's input features, or the logits) in a
    random direction reach the grid part of its output (not only a prefix)? The head's input,
    not the logits: a random-weight torchvision ViT's head is all zeros, its gradient none."""
    reaches = [False] * len(calls)
    wanted = [
        i
        for i, ((_, out, _), layout) in enumerate(zip(calls, layouts, strict=True))
        if isinstance(layout, Layout) and out.requires_grad and out.is_floating_point()
    ]
    if not wanted or not source.requires_grad:
        return reaches
    direction = torch.randn(source.shape, generator=torch.Generator().manual_seed(1)).to(source)
    score = (source * direction).sum()
    gradients = torch.autograd.grad(score, [calls[i][1] for i in wanted], allow_unused=True)
    for i, gradient in zip(wanted, gradients, strict=True):
        layout = layouts[i]
        assert isinstance(layout, Layout)
        if gradient is not None:
            reaches[i] = bool(layout.to_map(gradient).abs().amax() > 0)
    return reaches


def resolve_layer(
    model: nn.Module,
    layer: str,
    spec: InputSpec,
    device: torch.device,
    trace: ForwardTrace | None = None,
    output_key: OutputKey = None,
) -> LayerInfo:
    """Resolve `--layer` (``auto`` or a dotted module name) with one dry forward and backward.

    ``auto`` picks the last module, in execution order, whose output is a spatial map of
    the input (NCHW, NHWC or tokens, `camcli.models.layouts`) that the top logit's
    gradient reaches, and which is no pooling, attention internal, embedding or stem:
    the map global pooling (or a class token's last attention) reads. If the model
    rectifies that tensor in place before pooling (DenseNet's functional ReLU), the
    tensor is read as pooled (`as_consumed`). A named layer whose output is no spatial
    map is refused with the reason. A `trace` from `trace_forward` saves the forward
    (it must keep `layer`'s output when a layer is named).
    """
    modules = dict(model.named_modules())
    if layer != "auto" and layer not in modules:
        close = difflib.get_close_matches(layer, [n for n in modules if n], n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise UsageError(f"no layer named {layer!r} in the model{hint} (`camcli layers` lists them)")

    if trace is None:
        trace = trace_forward(model, spec, device, keep=None if layer == "auto" else layer, output_key=output_key)
    records, linears, logits = trace.calls, trace.linears, trace.logits
    named_output = [] if trace.kept is None else [trace.kept]

    found = [
        (record, layout)
        for record, layout, reaches in zip(records, trace.layouts, trace.reaches, strict=True)
        if isinstance(layout, Layout)
        and reaches
        and not isinstance(modules[record[0]], POOLING_MODULES)
        and not skipped_by_auto(record[0], modules)
    ]
    if layer == "auto" or (found and found[-1][0][0] == layer):
        # the map the model pools: read it as pooled, also when named explicitly
        if not found:
            raise UsageError(
                "found no spatial map of the input that the logits depend on (NCHW, NHWC or tokens); "
                "name one with --layer (`camcli layers` shows each layer's layout)"
            )
        (name, activation, version), layout = found[-1]
        as_consumed = activation._version != version
    else:  # any other module: its output as it left the module
        calls = [i for i, r in enumerate(records) if r[0] == layer]
        if not calls:
            raise UsageError(f"layer {layer!r} is not called by the model's forward")
        read = trace.layouts[calls[-1]]
        if not isinstance(read, Layout):
            raise UsageError(f"layer {layer!r} outputs {read}")
        name, activation, as_consumed, layout = layer, named_output[0], False, read
    as_map = layout.to_map(activation)
    head = _linear_head(as_map, logits, linears, modules)
    return LayerInfo(
        name=name,
        as_consumed=as_consumed,
        channels=int(as_map.shape[1]),
        spatial=(int(as_map.shape[2]), int(as_map.shape[3])),
        num_classes=int(logits.shape[1]),
        head=head,
        binary=trace.binary,
        layout=layout,
    )


def _linear_head(
    activation: Tensor, logits: Tensor, linears: list[tuple[str, Tensor]], modules: dict[str, nn.Module]
) -> str | None:
    """Name of the Linear layer W with logits == W . GAP(activation) + b, if one exists.

    Checked numerically on the probe input, so any model with a global-average-pool
    + linear head qualifies for CAM, whatever its code looks like.
    """
    for name, output in reversed(linears):
        linear = modules[name]
        if output.shape != logits.shape or linear.in_features != activation.shape[1]:
            continue
        if not linear.weight.abs().amax() > 0:  # all zeros (a fresh torchvision ViT): fits any map
            continue
        pooled = activation.float().mean(dim=(2, 3))
        predicted = torch.nn.functional.linear(pooled, linear.weight.float(), _float(linear.bias))
        tolerance = 1e-4 * max(1.0, float(logits.abs().max()))
        if torch.allclose(predicted, logits.float(), atol=tolerance, rtol=1e-4):
            return name
    return None


def _float(bias: Tensor | None) -> Tensor | None:
    return None if bias is None else bias.float()


def input_channels(model: nn.Module) -> int | None:
    """The channel count the model's first convolution takes (None: no convolution found).

    The first `Conv2d` in definition order is the stem in every torchvision, timm and
    transformers model; `--channels` overrides it for models built otherwise.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    return None


# -- the `fine` preset: the auto layer and the last stage of twice its resolution ----------------


@dataclass(frozen=True)
class FineLayers:
    """What `--layer fine` resolves to: the auto layer and, when the model has one, the last
    stage whose grid is twice the auto layer's (`partner` None, with the reason, otherwise)."""

    auto: str
    partner: str | None
    reason: str | None = None  # why there is no partner (a plain ViT, no finer stage)

    @property
    def names(self) -> list[str]:
        return [self.auto] if self.partner is None else [self.partner, self.auto]


def nchw_grid(output: Tensor) -> tuple[int, int] | None:
    """The spatial grid of a (B, C, H, W) feature map, None for anything else."""
    if output.ndim == 4 and output.shape[2] > 1 and output.shape[3] > 1:
        return int(output.shape[2]), int(output.shape[3])
    return None


def grid_sequence(
    trace: ForwardTrace,
    modules: dict[str, nn.Module],
    grid_of: Callable[[str, Tensor], tuple[int, int] | None] | None = None,
) -> list[tuple[str, tuple[int, int]]]:
    """(module name, output grid) in execution order, for every module whose output is a
    spatial feature map; `grid_of(name, output)` reads the grid (default: NCHW), so an
    adapter for NHWC stages or token sequences can supply its own reading."""
    layouts = trace.layouts or [None] * len(trace.calls)

    def by_layout(layout: Layout | str | None, name: str, output: Tensor) -> tuple[int, int] | None:
        if grid_of is not None:
            return grid_of(name, output)
        if isinstance(layout, Layout):  # the layer read by its detected layout (NHWC stages, tokens)
            return layout.grid if layout.grid[0] > 1 and layout.grid[1] > 1 else None
        return None if trace.layouts else nchw_grid(output)

    pairs = []
    for (name, output, _), layout in zip(trace.calls, layouts, strict=True):
        if isinstance(modules.get(name), POOLING_MODULES):
            continue
        grid = by_layout(layout, name, output)
        if grid is not None:
            pairs.append((name, grid))
    return pairs


def find_fine_partner(
    grids: list[tuple[str, tuple[int, int]]], auto: str, containers: frozenset[str] = frozenset()
) -> tuple[str | None, str | None]:
    """The last module, in execution order before `auto`, whose output grid is twice `auto`'s:
    a stage output, not a tensor inside the block that halves the grid.

    Twice per axis means 2n - 1, 2n or 2n + 1 for an auto grid of n: a stride-2 stage maps an
    odd side to its half rounded up ("SAME" and padded 3x3 convolutions: 15 -> 8, Lite0 at
    240 px) or down (2x2 patch merging, unpadded pooling), so at most input sizes the finer
    stage is not exactly 2n.

    A module counts only if no enclosing module (a dotted-name prefix that is not also an
    enclosing module of `auto`) outputs another grid: inside ResNet's ``layer4.0`` or Lite0's
    ``_blocks.11`` the expand convolution still runs at 2x, but the block as a whole halves
    the grid, so those tensors are mid-block. Among the rest the last call wins, which is the
    outermost module of a stage (its hook fires after its children's). Works on any
    (name, grid) pairs, whatever layout the grid was read from. Returns (name, None) or
    (None, the reason there is none).
    """
    seen = [(i, name, grid) for i, (name, grid) in enumerate(grids) if name == auto]
    if not seen:
        return None, f"the auto layer {auto!r} has no spatial grid"
    end, _, (height, width) = seen[-1]

    def twice(grid: tuple[int, int]) -> bool:
        return abs(grid[0] - 2 * height) <= 1 and abs(grid[1] - 2 * width) <= 1

    grid_of = {name: grid for name, grid in grids}
    auto_parents = {auto.rsplit(".", i)[0] for i in range(1, auto.count(".") + 1)} | {auto}

    def enclosing(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts))]

    candidates = [
        name
        for name, grid in grids[:end]
        if twice(grid)
        and all(
            grid_of.get(parent, grid) == grid
            for parent in enclosing(name)
            if parent not in auto_parents and not (parent in containers and name.rsplit(".", 1)[0] == parent)
        )
    ]
    if candidates:  # the outermost module of the last stage: the shallowest name, then the last call
        depth = min(name.count(".") for name in candidates)
        return [name for name in candidates if name.count(".") == depth][-1], None
    earlier = {grid for name, grid in grids[:end]}
    if earlier and earlier <= {(height, width)}:
        return None, (
            f"every block outputs the same {height}x{width} grid (a plain vision transformer or an "
            "isotropic network): there is no finer stage, so fine = auto"
        )
    return None, (
        f"no stage outputs a {2 * height}x{2 * width} grid (give or take one cell per side) before {auto!r}, "
        "so fine = auto"
    )


def resolve_fine(
    model: nn.Module,
    spec: InputSpec,
    device: torch.device,
    trace: ForwardTrace | None = None,
    grid_of: Callable[[str, Tensor], tuple[int, int] | None] | None = None,
) -> FineLayers:
    """`--layer fine`: the auto layer and the last stage of twice its resolution, from one traced forward."""
    trace = trace or trace_forward(model, spec, device)
    auto = resolve_layer(model, "auto", spec, device, trace=trace).name
    modules = dict(model.named_modules())
    # a stage that is a direct child of a Sequential of stages (torchvision Swin's `features`) is
    # a stage, not a tensor inside the block that halves the grid
    containers = frozenset(name for name, m in modules.items() if isinstance(m, (nn.Sequential, nn.ModuleList)))
    partner, reason = find_fine_partner(grid_sequence(trace, modules, grid_of), auto, containers)
    return FineLayers(auto, partner, reason)


def resolve_layers(
    model: nn.Module, layer: str, spec: InputSpec, device: torch.device, output_key: OutputKey = None
) -> list[LayerInfo]:
    """`--layer` as given: ``auto``, ``fine`` (see `resolve_fine`), a dotted name, or a
    comma list of them to fuse; duplicates are dropped, order kept."""
    names: list[str] = []
    for name in (part.strip() for part in layer.split(",")):
        if name == "fine":
            names += resolve_fine(model, spec, device, trace_forward(model, spec, device, output_key=output_key)).names
        elif name:
            names.append(name)
    names = list(dict.fromkeys(names or ["auto"]))
    infos = [resolve_layer(model, name, spec, device, output_key=output_key) for name in names]
    unique = {info.name: info for info in infos}  # "auto" and its resolved name are one layer
    return list(unique.values())
