"""An inference copy of the model for the forwards that need only logits.

Score-CAM's masked inputs, occlusion, the metrics' deletion/insertion curves and other
perturbation forwards never read a hook. They run on a deep copy of the user's model
(never the object itself) in which every eval-mode BatchNorm2d that consumes a
convolution's output alone is folded into that convolution: W' = W * g / sqrt(v + eps),
b' = (b - m) * g / sqrt(v + eps) + beta. That is exact up to float rounding; the copy's
logits are compared with the model's on a probe, and any disagreement beyond 1e-4 (a
fold that was not safe) falls back to the unfolded copy, so the answer never changes.

The copy's TF-"SAME" convolutions (`camcli.lite0.Conv2dSame`) whose padding does not depend
on the input size (stride 1, an even (k - 1) * dilation: symmetric) become plain convolutions
with that padding: the zeros are the same, but the conv reads them in place instead of from
an `F.pad` copy of its whole input. Activations that alone read a conv's output run in
place. Both leave every value as it was; the probe check covers them too.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from camcli.bnfold import folded_conv

_TOLERANCE = 1e-4


class _UseCounter(TorchFunctionMode):
    """Counts how many torch calls take each tensor: a conv output read by anything but
    its BatchNorm or activation (a residual, a shape read) is not folded nor overwritten."""

    def __init__(self) -> None:
        super().__init__()
        self.uses: Counter[int] = Counter()
        self.inside_reader = 0  # the reader's own reads of its input (dim checks, the op) count once

    def __torch_function__(self, func: Any, types: Any, args: Sequence = (), kwargs: Any = None) -> Any:
        if not self.inside_reader:
            for leaf in tree_leaves((args, kwargs or {})):
                if isinstance(leaf, Tensor):
                    self.uses[id(leaf)] += 1
        return func(*args, **(kwargs or {}))


_ACTIVATIONS = (nn.ReLU, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.LeakyReLU)  # ReLU6 is a Hardtanh


def _is_eval_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.BatchNorm2d) and module.running_mean is not None


def _is_reader(module: nn.Module) -> bool:
    return _is_eval_norm(module) or (isinstance(module, _ACTIVATIONS) and not module.inplace)


def _sole_readers(model: nn.Module, probe: Tensor) -> dict[str, list[str | None]]:
    """For each call of each eval batch norm and (not in-place) activation: the conv or norm
    whose output it took when it is that output's only reader, else None (one entry per call).
    One forward of `probe`."""
    modules = dict(model.named_modules())
    produced: dict[int, str] = {}
    calls: dict[str, list[int]] = {}
    keep: list[Tensor] = []  # keeps outputs alive so their ids stay unique
    counter = _UseCounter()

    def on_output(name: str):
        def hook(_: nn.Module, __: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                produced[id(output)] = name
                counter.uses[id(output)] = 0  # a freed tensor may have had this id before
                keep.append(output)

        return hook

    def enter_reader(name: str):
        def hook(_: nn.Module, inputs: Any) -> None:
            if not counter.inside_reader and inputs and isinstance(inputs[0], Tensor):
                calls.setdefault(name, []).append(id(inputs[0]))
                keep.append(inputs[0])
                counter.uses[id(inputs[0])] += 1
            counter.inside_reader += 1

        return hook

    def leave_reader(*_: Any) -> None:
        counter.inside_reader -= 1

    handles = []
    for name, module in modules.items():
        if _is_reader(module):
            handles.append(module.register_forward_pre_hook(enter_reader(name)))
            handles.append(module.register_forward_hook(leave_reader))
        if isinstance(module, nn.Conv2d) or _is_eval_norm(module):
            handles.append(module.register_forward_hook(on_output(name)))
    try:
        with torch.no_grad(), counter:
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    return {
        name: [produced.get(tensor_id) if counter.uses[tensor_id] == 1 else None for tensor_id in ids]
        for name, ids in calls.items()
    }


def _foldable_pairs(modules: dict[str, nn.Module], readers: dict[str, list[str | None]]) -> list[tuple[str, str]]:
    """(conv, batch norm) module names where the norm, called once, is the conv output's only reader."""
    pairs = []
    for name, sources in readers.items():
        source = sources[0] if len(sources) == 1 else None
        if (
            _is_eval_norm(modules[name])
            and isinstance(modules.get(source), nn.Conv2d)
            and modules[source].out_channels == modules[name].num_features
        ):
            pairs.append((source, name))
    return pairs


def _in_place_activations(modules: dict[str, nn.Module], readers: dict[str, list[str | None]]) -> list[str]:
    """Activations whose every call reads a fresh conv or norm output that nothing else
    reads (after folding: conv -> Identity -> activation): in place, they give the same
    values without writing a second tensor of that size (ReLU6 was a quarter of Lite0's
    folded forward)."""
    return [
        name
        for name, sources in readers.items()
        if isinstance(modules[name], _ACTIVATIONS) and all(source is not None for source in sources)
    ]


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    weight, bias = folded_conv(conv.weight, conv.bias, bn)
    conv.weight = nn.Parameter(weight, requires_grad=False)
    conv.bias = nn.Parameter(bias, requires_grad=False)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _static_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The symmetric padding a TF-"SAME" conv always applies, or None where it depends on
    the input's size (stride > 1) or is lopsided (an even kernel)."""
    if conv.stride != (1, 1):
        return None
    totals = [(k - 1) * d for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
    if any(total % 2 for total in totals):
        return None
    return totals[0] // 2, totals[1] // 2


def _static_same_convs(model: nn.Module) -> int:
    """Replace each size-independent TF-"SAME" conv by an nn.Conv2d with the same padding
    built in (same parameters); how many were replaced."""
    from camcli.lite0 import Conv2dSame

    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) is not Conv2dSame or (padding := _static_padding(module)) is None:
            continue
        conv = nn.Conv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        conv.weight = module.weight
        conv.bias = module.bias
        _set_module(model, name, conv.eval())
        replaced += 1
    return replaced


def inference_copy(model: nn.Module, probe: Tensor) -> tuple[nn.Module, int]:
    """A deep copy of `model` in eval mode with conv + BatchNorm pairs folded, and how many
    pairs were folded (0 when none could be, or the folded copy disagreed on `probe`)."""
    fused = copy.deepcopy(model).eval()
    for param in fused.parameters():
        param.requires_grad_(False)
    plain = copy.deepcopy(fused)
    modules = dict(fused.named_modules())
    readers = _sole_readers(fused, probe)
    pairs = _foldable_pairs(modules, readers)
    in_place = _in_place_activations(modules, readers)
    for conv_name, bn_name in pairs:
        _fold(fused.get_submodule(conv_name), fused.get_submodule(bn_name))
        _set_module(fused, bn_name, nn.Identity())
    for name in in_place:
        modules[name].inplace = True
    static = _static_same_convs(fused)
    if not pairs and not static and not in_place:
        return fused, 0
    with torch.no_grad():
        want = plain(probe).float()
        got = fused(probe).float()
    if not torch.allclose(got, want, atol=_TOLERANCE * max(1.0, float(want.abs().max())), rtol=_TOLERANCE):
        return plain, 0
    return fused, len(pairs)
