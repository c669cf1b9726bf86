"""An inference copy of the model for the forwards that need only logits.

Score-CAM's masked inputs, occlusion, the metrics' deletion/insertion curves and other
perturbation forwards never read a hook. They run on a deep copy of the user's model
(never the object itself) in which every eval-mode BatchNorm2d that consumes a
convolution's output alone is folded into that convolution: W' = W * g / sqrt(v + eps),
b' = (b - m) * g / sqrt(v + eps) + beta. That is exact up to float rounding; the copy's
logits are compared with the model's on a probe, and any disagreement beyond 1e-4 (a
fold that was not safe) falls back to the unfolded copy, so the answer never changes.
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

_TOLERANCE = 1e-4


class _UseCounter(TorchFunctionMode):
    """Counts how many torch calls take each tensor: a conv output read by anything but
    its BatchNorm (a residual, a shape read) is not folded."""

    def __init__(self) -> None:
        super().__init__()
        self.uses: Counter[int] = Counter()
        self.inside_norm = 0  # the norm's own reads of its input (dim checks, the op) count once

    def __torch_function__(self, func: Any, types: Any, args: Sequence = (), kwargs: Any = None) -> Any:
        if not self.inside_norm:
            for leaf in tree_leaves((args, kwargs or {})):
                if isinstance(leaf, Tensor):
                    self.uses[id(leaf)] += 1
        return func(*args, **(kwargs or {}))


def _foldable_pairs(model: nn.Module, probe: Tensor) -> list[tuple[str, str]]:
    """(conv, batch norm) module names where the norm is the conv output's only reader."""
    modules = dict(model.named_modules())
    conv_out: dict[int, str] = {}
    bn_in: dict[str, int] = {}
    keep: list[Tensor] = []  # keeps outputs alive so their ids stay unique
    counter = _UseCounter()

    def on_conv(name: str):
        def hook(_: nn.Module, __: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                conv_out[id(output)] = name
                counter.uses[id(output)] = 0  # a freed tensor may have had this id before
                keep.append(output)

        return hook

    def enter_norm(name: str):
        def hook(_: nn.Module, inputs: Any) -> None:
            if inputs and isinstance(inputs[0], Tensor):
                bn_in[name] = id(inputs[0])
                keep.append(inputs[0])
                counter.uses[id(inputs[0])] += 1
            counter.inside_norm += 1

        return hook

    def leave_norm(*_: Any) -> None:
        counter.inside_norm -= 1

    handles = []
    for name, module in modules.items():
        if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None:
            handles.append(module.register_forward_pre_hook(enter_norm(name)))
            handles.append(module.register_forward_hook(leave_norm))
        elif isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(on_conv(name)))
    try:
        with torch.no_grad(), counter:
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    pairs = []
    for bn_name, tensor_id in bn_in.items():
        conv_name = conv_out.get(tensor_id)
        if (
            conv_name is not None
            and counter.uses[tensor_id] == 1
            and modules[conv_name].out_channels == modules[bn_name].num_features
        ):
            pairs.append((conv_name, bn_name))
    return pairs


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    assert bn.running_mean is not None and bn.running_var is not None
    scale = (bn.running_var + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.ndim - 1))))
    conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def inference_copy(model: nn.Module, probe: Tensor) -> tuple[nn.Module, int]:
    """A deep copy of `model` in eval mode with conv + BatchNorm pairs folded, and how many
    pairs were folded (0 when none could be, or the folded copy disagreed on `probe`)."""
    fused = copy.deepcopy(model).eval()
    for param in fused.parameters():
        param.requires_grad_(False)
    plain = copy.deepcopy(fused)
    pairs = _foldable_pairs(fused, probe)
    for conv_name, bn_name in pairs:
        _fold(fused.get_submodule(conv_name), fused.get_submodule(bn_name))
        _set_module(fused, bn_name, nn.Identity())
    if not pairs:
        return fused, 0
    with torch.no_grad():
        want = plain(probe).float()
        got = fused(probe).float()
    if not torch.allclose(got, want, atol=_TOLERANCE * max(1.0, float(want.abs().max())), rtol=_TOLERANCE):
        return plain, 0
    return fused, len(pairs)
