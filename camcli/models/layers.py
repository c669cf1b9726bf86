"""Target layers: one traced dry forward, the automatic layer, and the linear head behind it."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from camcli.errors import UsageError
from camcli.models.outputs import OutputKey, raw_output, select_logits
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
    binary: bool = False  # one logit z, read as the classes [-z, z] (camcli.models.outputs)


@dataclass(frozen=True)
class ForwardTrace:
    """What one dry forward on a probe input saw, shared by layer resolution and `camcli layers`."""

    calls: list[tuple[str, Tensor, int]]  # (module name, tensor output, its _version after the call), in order
    linears: list[tuple[str, Tensor]]  # the nn.Linear calls among them
    logits: Tensor
    kept: Tensor | None  # a copy of the `keep` module's output, in case later in-place ops change it
    binary: bool = False  # the model returns one logit (read as two classes)


def trace_forward(
    model: nn.Module, spec: InputSpec, device: torch.device, keep: str | None = None, output_key: OutputKey = None
) -> ForwardTrace:
    """One forward of a fixed random probe with a hook on every module, removed in `finally`;
    the output is read as logits by `select_logits` (`output_key` as `--output-key`)."""
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
    modes = [(module, module.training) for module in model.modules()]
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(1, spec.channels, spec.size, spec.size, generator=generator).to(device)
    try:
        model.eval()
        with torch.no_grad():
            output = model(probe)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:  # each module's own flag: model.train(x) would set them all alike
            module.training = mode
    logits = select_logits(output, output_key)
    raw = raw_output(output, output_key)
    binary = raw.ndim == 1 or raw.shape[-1] == 1
    return ForwardTrace(calls, linears, logits, kept[0] if kept else None, binary)


def channels_last(module: nn.Module, out: Tensor) -> bool:
    """A 4-D output of a Linear or LayerNorm acting on its last dimension: (B, H, W, C),
    as inside ConvNeXt blocks. Reading it as (B, C, H, W) would draw stripes."""
    if isinstance(module, nn.Linear):
        features = module.out_features
    elif isinstance(module, nn.LayerNorm):
        features = module.normalized_shape[-1]
    else:
        return False
    return out.shape[-1] == features and out.shape[1] != features


def _refuse_before_tokens(name: str, records: list[tuple[str, Tensor, int]], modules: dict[str, nn.Module]) -> None:
    """Until camcli reads token layers: a 4-D tensor followed by token sequences (B, N, C)
    (a ViT's patch embedding, a Swin position bias) is not what the head decides on, and
    may not even be a per-image map; refused with the reason, never drawn."""
    start = max(i for i, r in enumerate(records) if r[0] == name)
    later = records[start:]
    tokens = [r[0] for r in later if r[1].ndim == 3 and isinstance(modules[r[0]], (nn.Linear, nn.LayerNorm))]
    if tokens:
        raise UsageError(
            f"the model computes token sequences (B, N, C) after the (B, C, H, W) map {name!r} "
            f"(e.g. {tokens[-1]!r}), a transformer: camcli cannot read token layers yet, and the "
            "map before them would not show what the head decides on"
        )


def resolve_layer(
    model: nn.Module,
    layer: str,
    spec: InputSpec,
    device: torch.device,
    trace: ForwardTrace | None = None,
    output_key: OutputKey = None,
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
        trace = trace_forward(model, spec, device, keep=None if layer == "auto" else layer, output_key=output_key)
    records, linears, logits = trace.calls, trace.linears, trace.logits
    named_output = [] if trace.kept is None else [trace.kept]

    def is_feature_map(name: str, out: Tensor) -> bool:
        return (
            out.ndim == 4
            and out.shape[2] > 1
            and out.shape[3] > 1
            and not isinstance(modules[name], POOLING_MODULES)
            and not channels_last(modules[name], out)
        )

    found = [r for r in records if is_feature_map(r[0], r[1])]
    if layer == "auto" or (found and found[-1][0] == layer):
        # the map the model pools: read it as pooled, also when named explicitly
        if not found:
            raise UsageError("found no (B, C, H, W) feature map to explain; name one with --layer")
        name, activation, version = found[-1]
        as_consumed = activation._version != version
        _refuse_before_tokens(name, records, modules)
    else:  # any other module: its output as it left the module
        calls = [r for r in records if r[0] == layer]
        if not calls or calls[-1][1].ndim != 4:
            shape = tuple(calls[-1][1].shape) if calls else "nothing (not called)"
            raise UsageError(f"layer {layer!r} outputs {shape}, not a (B, C, H, W) feature map")
        if channels_last(modules[layer], calls[-1][1]):
            raise UsageError(
                f"layer {layer!r} ({type(modules[layer]).__name__}) outputs {tuple(calls[-1][1].shape)} channels "
                "last (B, H, W, C); camcli reads (B, C, H, W) maps: name the block around it instead"
            )
        _refuse_before_tokens(layer, records, modules)
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
        binary=trace.binary,
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


def input_channels(model: nn.Module) -> int | None:
    """The channel count the model's first convolution takes (None: no convolution found).

    The first `Conv2d` in definition order is the stem in every torchvision, timm and
    transformers model; `--channels` overrides it for models built otherwise.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    return None
