"""Batch norm folded into the convolution before it, inside a recorded (autograd) pass.

In the part of a forward that autograd records, each eval-mode batch norm costs a pass over
its input in the forward and a multiply in the backward; folded into the convolution that
feeds it (weight * scale, bias (b - mean) * scale + beta) it costs nothing, and the maps are
equal up to float rounding. Guided backprop, whose whole forward is recorded: Lite0 10 %,
resnet50 5 % faster (benchmarks/RESULTS.md).

It is safe only where nothing but the batch norm reads the convolution's own output, and
that is a property of the model's code, not of its modules. So it is learned, then checked:
the first recorded pass of a model runs unfolded and watches every torch call (the
`TorchFunctionMode` sees them all); a convolution whose output went only to an eval batch
norm (and to metadata reads such as `.dim()`) is a pair, where neither module has a hook
(a hook would see the folded tensor). Later passes fold the pairs and still watch: if a
folded output reaches any other call, the pass raises `FoldMismatch`, the engine turns
folding off for the model and runs the pass again unfolded. A wrong map is never returned.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as module_globals

# reads that see only shape, type and placement: the same for the folded tensor
_METADATA = {
    Tensor.dim,
    Tensor.size,
    Tensor.shape.__get__,  # type: ignore[attr-defined]
    Tensor.ndim.__get__,  # type: ignore[attr-defined]
    Tensor.dtype.__get__,  # type: ignore[attr-defined]
    Tensor.device.__get__,  # type: ignore[attr-defined]
    Tensor.layout.__get__,  # type: ignore[attr-defined]
    Tensor.is_contiguous,
}


def batch_norm_affine(
    running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """Eval batch norm as y = x * scale + shift, per channel: (scale, shift)."""
    scale = (running_var + eps).rsqrt()
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def folded_conv(weight: Tensor, bias: Tensor | None, norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """A convolution's (weight, bias) with the eval batch norm after it folded in: equal up to
    float rounding; the weight keeps its memory format (another would make oneDNN reorder it)."""
    assert norm.running_mean is not None and norm.running_var is not None
    with torch.no_grad():
        scale, shift = batch_norm_affine(norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps)
        if bias is not None:
            shift = shift + bias * scale
        scale = scale.to(weight.dtype).reshape(-1, *([1] * (weight.ndim - 1)))
        return torch.mul(weight, scale, out=torch.empty_like(weight)), shift.to(weight.dtype)


class _Alias(torch.autograd.Function):
    """The batch norm's output when its convolution already normalised: the conv output's
    storage as a new tensor that autograd sees as a plain result, not a view (an in-place add
    on a view, as ResNet's residual does, makes autograd copy the whole tensor back)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


class FoldMismatch(RuntimeError):
    """A folded convolution's output reached a call other than its batch norm."""


@dataclass(frozen=True)
class _Pair:
    conv: nn.Module
    norm: nn.BatchNorm2d


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    return bool(module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks)


def _autocast() -> bool:
    return any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda", "mps"))


def _batch_norm_tensors(args: tuple, kwargs: dict) -> tuple[Any, ...]:
    """(input, running_mean, running_var, weight, bias, training, eps) of an F.batch_norm call."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    defaults = (None, None, None, None, None, False, 0.1, 1e-5)
    values = dict(zip(names, defaults, strict=True)) | dict(zip(names, args, strict=False)) | kwargs
    return tuple(values[n] for n in ("input", "running_mean", "running_var", "weight", "bias", "training", "eps"))


class BatchNormFolds:
    """Which conv -> batch-norm pairs of one model fold, learned from its first recorded pass."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.pairs: dict[int, _Pair] | None = None  # id(conv weight) -> pair; None: not learned yet
        self.disabled = False
        self.folded_calls = 0  # how many convolutions ran folded (for tests and benchmarks)
        self.pixels_per_weight = 1.0  # see `pays`; 0 folds every pair (tests of the mechanism)

    def pays(self, x: Tensor, weight: Tensor, conv: nn.Module) -> bool:
        """Folding saves two passes over the conv's output per pass and costs one over its
        weight (folded afresh each pass, so a weight changed between calls is never stale):
        worth it where each output channel has more pixels than weights (Lite0's and ResNet's
        early stages), not in a 7x7 stage with 4,608 weights per channel."""
        stride = conv.stride if isinstance(conv, nn.Conv2d) else (1, 1)
        pixels = x.shape[0] * x.shape[-2] * x.shape[-1] / (stride[0] * stride[1])
        return pixels >= self.pixels_per_weight * weight[0].numel()

    def learn(self, reads: dict[int, list[Any]], weights: dict[int, Tensor]) -> None:
        """Pairs from one watched pass: `reads[id(conv output)]` = the calls that read it
        (the batch norm's tensors for an F.batch_norm), `weights[id(conv output)]` its weight."""
        convs = {id(m.weight): m for m in self.model.modules() if isinstance(m, nn.Conv2d)}
        norms = {
            id(m.running_mean): m
            for m in self.model.modules()
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None
        }
        found: dict[int, _Pair | None] = {}  # a weight whose every output has the same sole reader
        for out_id, calls in reads.items():
            key = id(weights[out_id])
            norm = norms.get(id(calls[0][1])) if len(calls) == 1 and isinstance(calls[0], tuple) else None
            sole = norm is not None and norm.running_var is calls[0][2] and norm.weight is calls[0][3]
            pair = _Pair(convs[key], norm) if sole and key in convs and norm is not None else None
            found[key] = pair if found.get(key, pair) == pair else None
        self.pairs = {key: pair for key, pair in found.items() if pair is not None}


class FoldingMode:
    """The part of `_LeanGraph` that watches (first pass) or folds (later passes); the mode
    hands every call to `handle` and runs the call itself where it returns `NotImplemented`."""

    def __init__(self, folds: BatchNormFolds) -> None:
        self.folds = folds
        self.watching = folds.pairs is None
        self.reads: dict[int, list[Any]] = {}
        self.weights: dict[int, Tensor] = {}
        self.alive: list[Tensor] = []  # conv outputs kept alive while watched, so ids stay unique
        self.folded: dict[int, tuple[_Pair, weakref.ref]] = {}
        self.cache: dict[int, tuple[Tensor, Tensor]] = {}
        # autocast (--precision bf16/fp16) keeps its own, tested path: the norm would run in
        # fp32 there, the folded convolution in the reduced type
        # a model that taught no pair (a ViT, a plain network) pays no per-call check
        self.active = not folds.disabled and folds.pairs != {} and not _global_hooks() and not _autocast()

    def handle(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if not self.active:
            return NotImplemented
        if self.watching:
            return self._watch(func, args, kwargs)
        return self._fold(func, args, kwargs)

    def close(self, learn: bool = True) -> None:
        """End of the pass: a watched pass that completed teaches the pairs."""
        if learn and self.active and self.watching:
            self.folds.learn(self.reads, self.weights)
        self.alive.clear()
        self.folded.clear()

    # -- the first pass: watch who reads each conv output -----------------------------------

    def _watch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if func not in _METADATA:
            for value in (*args, *kwargs.values()):
                if isinstance(value, Tensor) and id(value) in self.reads:
                    norm = _batch_norm_tensors(args, kwargs) if func is F.batch_norm and value is args[0] else None
                    ok = norm is not None and not norm[5] and norm[1] is not None and value.ndim == 4
                    self.reads[id(value)].append(norm if ok else func)
        if func is F.conv2d and len(args) >= 2:
            out = func(*args, **kwargs)
            self.reads[id(out)] = []
            self.weights[id(out)] = args[1]
            self.alive.append(out)
            return out
        return NotImplemented

    # -- later passes: fold the pairs, and check that nothing else reads a folded output ----

    def _fold(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if func not in _METADATA:
            for value in (*args, *kwargs.values()):
                if isinstance(value, Tensor) and id(value) in self.folded:
                    pair, ref = self.folded[id(value)]
                    if ref() is value and func is F.batch_norm and value is args[0]:
                        norm = _batch_norm_tensors(args, kwargs)
                        same = norm[1] is pair.norm.running_mean and norm[2] is pair.norm.running_var
                        if same and norm[3] is pair.norm.weight and norm[4] is pair.norm.bias and not norm[5]:
                            # already normalised by the folded convolution: the same values
                            # as another object, so a later read of the conv output is caught
                            return _Alias.apply(value)
                    if ref() is value:
                        raise FoldMismatch(f"a folded convolution's output reached {getattr(func, '__name__', func)}")
        assert self.folds.pairs is not None
        if func is F.conv2d and len(args) >= 2 and id(args[1]) in self.folds.pairs:
            pair = self.folds.pairs[id(args[1])]
            if _hooked(pair.conv) or _hooked(pair.norm) or not self.folds.pays(args[0], args[1], pair.conv):
                return NotImplemented
            weight, bias = self._folded_weights(pair, args, kwargs)
            rest = dict(kwargs)
            rest.pop("bias", None)
            out = func(args[0], weight, bias, *args[3:], **rest)
            self.folds.folded_calls += 1
            self.folded[id(out)] = (pair, weakref.ref(out))
            self.alive.append(out)
            return out
        return NotImplemented

    def _folded_weights(self, pair: _Pair, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
        key = id(args[1])
        if key not in self.cache:
            self.cache[key] = folded_conv(args[1], args[2] if len(args) > 2 else kwargs.get("bias"), pair.norm)
        return self.cache[key]
