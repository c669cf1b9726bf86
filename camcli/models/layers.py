"""Target layers: one traced dry forward, the automatic layer, and the linear head behind it."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from camcli.errors import UsageError
from camcli.models.spec import InputSpec

POOLING_MODULES = (  # never a target layer: they pool features, they are not features
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.LPPool2d,
    nn.FractionalMaxPool2d,
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


@dataclass(frozen=True)
class ForwardTrace:
    """What one dry forward on a probe input saw, shared by layer resolution and `camcli layers`."""

    calls: list[tuple[str, Tensor, int]]  # (module name, tensor output, its _version after the call), in order
    linears: list[tuple[str, Tensor]]  # the nn.Linear calls among them
    logits: Tensor
    kept: Tensor | None  # a copy of the `keep` module's output, in case later in-place ops change it


def trace_forward(model: nn.Module, spec: InputSpec, device: torch.device, keep: str | None = None) -> ForwardTrace:
    """One forward of a fixed random probe with a hook on every module, removed in `finally`."""
    calls: list[tuple[str, Tensor, int]] = []
    linears: list[tuple[str, Tensor]] = []
    kept: list[Tensor] = []

    def hook(name: str):
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                calls.append((name, output, output._version))
                if name == keep:
                    kept[:] = [output.clone()]
                if isinstance(module, nn.Linear):
                    linears.append((name, output))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    was_training = model.training
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(1, 3, spec.size, spec.size, generator=generator).to(device)
    try:
        model.eval()
        with torch.no_grad():
            logits = model(probe)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise UsageError("the model must return a (batch, classes) tensor of logits")
    return ForwardTrace(calls, linears, logits, kept[0] if kept else None)


def resolve_layer(
    model: nn.Module, layer: str, spec: InputSpec, device: torch.device, trace: ForwardTrace | None = None
) -> LayerInfo:
    """Resolve `--layer` (``auto`` or a dotted module name) with one dry forward.

    ``auto`` picks the last module, in execution order, whose output is a
    (B, C, H, W) map with H, W > 1 and which is not itself a pooling module: the
    feature map that global pooling (or the classifier) consumes. If the model
    rectifies that tensor in place before pooling (DenseNet's functional ReLU), the
    tensor is read as pooled (`as_consumed`). A `trace` from `trace_forward` saves the
    forward (it must keep `layer`'s output when a layer is named).
    """
    modules = dict(model.named_modules())
    if layer != "auto" and layer not in modules:
        close = difflib.get_close_matches(layer, [n for n in modules if n], n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise UsageError(f"no layer named {layer!r} in the model{hint} (`camcli layers` lists them)")

    if trace is None:
        trace = trace_forward(model, spec, device, keep=None if layer == "auto" else layer)
    records, linears, logits = trace.calls, trace.linears, trace.logits
    named_output = [] if trace.kept is None else [trace.kept]

    def is_feature_map(name: str, out: Tensor) -> bool:
        return (
            out.ndim == 4 and out.shape[2] > 1 and out.shape[3] > 1 and not isinstance(modules[name], POOLING_MODULES)
        )

    found = [r for r in records if is_feature_map(r[0], r[1])]
    if layer == "auto" or (found and found[-1][0] == layer):
        # the map the model pools: read it as pooled, also when named explicitly
        if not found:
            raise UsageError("found no (B, C, H, W) feature map to explain; name one with --layer")
        name, activation, version = found[-1]
        as_consumed = activation._version != version
    else:  # any other module: its output as it left the module
        calls = [r for r in records if r[0] == layer]
        if not calls or calls[-1][1].ndim != 4:
            shape = tuple(calls[-1][1].shape) if calls else "nothing (not called)"
            raise UsageError(f"layer {layer!r} outputs {shape}, not a (B, C, H, W) feature map")
        name, activation, as_consumed = layer, named_output[0], False
    head = _linear_head(activation, logits, linears, modules)
    shape = activation.shape
    return LayerInfo(
        name=name,
        as_consumed=as_consumed,
        channels=int(shape[1]),
        spatial=(int(shape[2]), int(shape[3])),
        num_classes=int(logits.shape[1]),
        head=head,
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
        pooled = activation.float().mean(dim=(2, 3))
        predicted = torch.nn.functional.linear(pooled, linear.weight.float(), _float(linear.bias))
        tolerance = 1e-4 * max(1.0, float(logits.abs().max()))
        if torch.allclose(predicted, logits.float(), atol=tolerance, rtol=1e-4):
            return name
    return None


def _float(bias: Tensor | None) -> Tensor | None:
    return None if bias is None else bias.float()


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
    read = grid_of or (lambda _name, output: nchw_grid(output))
    pairs = []
    for name, output, _ in trace.calls:
        if isinstance(modules.get(name), POOLING_MODULES):
            continue
        grid = read(name, output)
        if grid is not None:
            pairs.append((name, grid))
    return pairs


def find_fine_partner(grids: list[tuple[str, tuple[int, int]]], auto: str) -> tuple[str | None, str | None]:
    """The last module, in execution order before `auto`, whose output grid is exactly twice
    `auto`'s: a stage output, not a tensor inside the block that halves the grid.

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
    wanted = (2 * height, 2 * width)
    grid_of = {name: grid for name, grid in grids}
    auto_parents = {auto.rsplit(".", i)[0] for i in range(1, auto.count(".") + 1)} | {auto}

    def enclosing(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts))]

    candidates = [
        name
        for name, grid in grids[:end]
        if grid == wanted
        and all(grid_of.get(parent, wanted) == wanted for parent in enclosing(name) if parent not in auto_parents)
    ]
    if candidates:
        return candidates[-1], None
    earlier = {grid for name, grid in grids[:end]}
    if earlier and earlier <= {(height, width)}:
        return None, (
            f"every block outputs the same {height}x{width} grid (a plain vision transformer or an "
            "isotropic network): there is no finer stage, so fine = auto"
        )
    return None, f"no stage outputs a {wanted[0]}x{wanted[1]} grid before {auto!r}, so fine = auto"


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
    partner, reason = find_fine_partner(grid_sequence(trace, dict(model.named_modules()), grid_of), auto)
    return FineLayers(auto, partner, reason)


def resolve_layers(model: nn.Module, layer: str, spec: InputSpec, device: torch.device) -> list[LayerInfo]:
    """`--layer` as given: ``auto``, ``fine`` (see `resolve_fine`), a dotted name, or a
    comma list of them to fuse; duplicates are dropped, order kept."""
    names: list[str] = []
    for name in (part.strip() for part in layer.split(",")):
        if name == "fine":
            names += resolve_fine(model, spec, device).names
        elif name:
            names.append(name)
    names = list(dict.fromkeys(names or ["auto"]))
    infos = [resolve_layer(model, name, spec, device) for name in names]
    unique = {info.name: info for info in infos}  # "auto" and its resolved name are one layer
    return list(unique.values())
