"""The shared engine: hooks, targets and one pass per batch for every requested method.

A batch is explained with one forward (and, if any method needs it, one partial
backward per target rank) for all CAM-family methods together: parameters are
frozen for the call and the hooked activation is made a leaf that requires grad,
so autograd records nothing before it and `torch.autograd.grad` computes no weight
gradients; from the layer on, the recorded ops take their cheapest exact form
(`_LeanGraph`: eval batch norm as a multiply-add, or from the second batch on folded into
the convolution that alone feeds it (`camcli.bnfold`), attention in-projections as one matmul).
With several layers (`--layer a,b`) all are captured in that forward and
one `torch.autograd.grad` call returns the gradients of all of them; each method's
normalised maps are fused (`fuse`): averaged, or multiplied as RefineCAM does.
Input-gradient methods (guided backprop, saliency, SmoothGrad's noisy copies) take one
more forward and a backward to the input; perturbation methods (occlusion) extra
forwards without autograd; attention methods (LeGrad, rollouts) one forward that
captures every block's attention (`camcli.attention`) and, when they need gradients,
backwards to those attentions only. Every hook and every
flag the engine changes is put back in `finally`, whatever a method raises.

Guided backprop beside CAM methods shares their forward: the rectifiers take the plain
rule for the CAM gradients and switch to the guided rule for the input gradient.
`--contrast` changes the score whose gradient is taken to y_c - y_c'; `--smooth aug`
runs the CAM forward on flipped and intensity-scaled copies and averages the maps put
back; `--smooth eigen` takes the first principal component of w_c A_c instead of its sum.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from camcli.attention import Transformer, capture_attention, find_transformer
from camcli.bnfold import BatchNormFolds, FoldingMode, FoldMismatch, batch_norm_affine
from camcli.choices import FUSIONS, SMOOTHINGS  # re-exported: --fuse and --smooth choices
from camcli.chunking import ChunkSizer
from camcli.errors import MethodNotApplicable, OptionError, UsageError
from camcli.methods import (
    AttentionContext,
    AttentionMethod,
    CamContext,
    CamMethod,
    CombinedMethod,
    GradientContext,
    InputGradientMethod,
    LayerImageMethod,
    Method,
    ModelContext,
    PerturbationMethod,
    get_method,
)
from camcli.methods.base import GRADIENT, HEATMAP, LABELS, TILES
from camcli.methods.eigengradcam import principal_projection
from camcli.models import LayerInfo
from camcli.models.layouts import NCHW_DEFAULT, Layout
from camcli.models.outputs import OutputKey, logits_model
from camcli.models.spec import class_by_name
from camcli.precision import autocast, autocast_dtype

# Activation modules whose backward guided backprop does not define.
_NON_RECTIFIER_MODULES = (
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Mish,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Softplus,
)
_RELU_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}
_NON_RECTIFIER_FUNCTIONS = {
    F.silu,
    F.gelu,
    F.hardswish,
    F.mish,
    F.elu,
    F.selu,
    F.celu,
    F.leaky_relu,
    F.prelu,
    F.softplus,
}


@dataclass(frozen=True)
class TargetSpec:
    """Which class each sample is explained for: its top-1, a fixed index, or its top-k."""

    index: int | None = None  # None: the sample's own prediction(s)
    topk: int = 1
    per_sample: tuple[int | None, ...] | None = None  # a class per sample (None: as above), e.g. a box's
    threshold: float | None = None  # -t positive: every class whose sigmoid reaches it, per sample
    # each sample's own classes, one per rank (as many for all): a re-run computes only the
    # classes an image's earlier result lacks, which differ from image to image
    classes: tuple[tuple[int, ...], ...] | None = None

    def resolve(self, logits: Tensor) -> list[Tensor]:
        """One (B,) tensor of class indices per rank, each sample with its own target.

        With a `threshold` (multi-label), rank r holds each sample's r-th positive class
        by logit; there are as many ranks as the most positives any sample has (at least
        one), and a sample with fewer repeats its first target there: `valid` says which
        (sample, rank) pairs are real, and only those are written."""
        if self.classes is not None:
            if len(self.classes) != logits.shape[0] or len({len(c) for c in self.classes}) != 1:
                raise UsageError(
                    f"classes {self.classes} for a batch of {logits.shape[0]} images: one tuple each, alike"
                )
            given = torch.tensor(self.classes, device=logits.device)
            return list(given.unbind(1))
        if self.threshold is not None:
            counts = self._positives(logits)
            ranks = max(1, int(counts.max()))
            ranked = logits.topk(ranks, dim=1).indices
            fill = torch.arange(ranks, device=logits.device)[None] < counts[:, None]
            return list(torch.where(fill, ranked, ranked[:, :1]).unbind(1))
        if self.per_sample is not None:
            if len(self.per_sample) != logits.shape[0]:
                raise UsageError(f"{len(self.per_sample)} per-sample targets for a batch of {logits.shape[0]} images")
            (default,) = TargetSpec(self.index).resolve(logits)
            given = torch.tensor([-1 if c is None else c for c in self.per_sample], device=logits.device)
            return [torch.where(given >= 0, given, default)]
        if self.index is not None:
            return [torch.full((logits.shape[0],), self.index, device=logits.device)]
        ranked = logits.topk(self.topk, dim=1).indices
        return list(ranked.unbind(1))

    def valid(self, logits: Tensor, ranks: int) -> list[Tensor] | None:
        """Per rank, (B,) True where the sample has a target of its own there (None: all do)."""
        if self.threshold is None:
            return None
        counts = self._positives(logits)
        return [counts > rank for rank in range(ranks)]

    def _positives(self, logits: Tensor) -> Tensor:
        assert self.threshold is not None
        return (logits.float().sigmoid() >= self.threshold).sum(1)


# pytorch-grad-cam's aug_smooth: ttach's HorizontalFlip x Multiply(0.9, 1, 1.1) of the model input
_AUGMENTATIONS = tuple((flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1))
_IDENTITY = _AUGMENTATIONS.index((False, 1.0))


@dataclass(frozen=True)
class Contrast:
    """`--contrast`: explain "why the target rather than c'" from the gradient of y_c - y_c'."""

    index: int | None = None  # None ("second"): each sample's best class other than its target

    def resolve(self, logits: Tensor, targets: Tensor) -> Tensor:
        """(B,) the class each target is set against."""
        if self.index is None:
            return logits.detach().scatter(1, targets[:, None], -math.inf).argmax(1)
        if bool((targets == self.index).any()):
            raise UsageError(f"--contrast {self.index} is the target itself; contrast another class or 'second'")
        return torch.full_like(targets, self.index)


@dataclass
class Explanation:
    """One method's result for a batch and one target rank."""

    method: str
    rank: int
    layer: str | None  # None for methods that read no layer; "a,b" for fused layers
    targets: Tensor  # (B,) class index per sample
    maps: Tensor  # heatmaps: (B, h, w) in [0, 1]; gradients: (B, 3, H, W), raw; tiles: (B, N, h, w)
    flat: Tensor  # (B,) True where the map had no variation (written as zeros)
    channels: Tensor | None = None  # tiles: (B, N) channel index of each tile
    raw: Tensor | None = None  # CAM family, one layer: the map before ReLU and min-max, (B, h, w) float32
    valid: Tensor | None = None  # (B,) False where a sample has no target at this rank (-t positive)
    layout: str | None = None  # layer methods: how the layer was read, e.g. "tokens 1+196 -> 14x14"
    details: dict[str, Tensor] | None = None  # (B,) numbers per sample for the JSON, e.g. completeness
    contrasts: Tensor | None = None  # --contrast: (B,) the class each target was set against

    kind: str = HEATMAP  # the method's `kind` (camcli.methods.base.KINDS), set by the engine

    def check_kind(self) -> None:
        """The maps have the shape the method's kind promises: a mismatch is a bug that
        would draw a wrong picture (a gradient as heat, a label map normalised), so refuse."""
        shape = {HEATMAP: 3, LABELS: 3, GRADIENT: 4, TILES: 4}[self.kind]
        if self.maps.ndim != shape or (self.kind == TILES) != (self.channels is not None):
            raise RuntimeError(f"{self.method}: a {self.kind} result of shape {tuple(self.maps.shape)}")


@dataclass
class BatchResult:
    logits: Tensor  # (B, num_classes)
    explanations: list[Explanation]


def stack_to_device(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """Stack a batch of decoded images and move it to `device`. On CUDA the stack is made
    in pinned (page-locked) host memory and copied with non_blocking=True, so the copy runs
    by DMA while the host goes on (the next kernels on the stream wait for it, as for any
    copy); elsewhere it is `torch.stack(...).to(device)`, no copy at all on the CPU."""
    if device.type != "cuda":
        return torch.stack(list(tensors)).to(device)
    first = tensors[0]
    pinned = torch.empty((len(tensors), *first.shape), dtype=first.dtype, pin_memory=True)
    torch.stack(list(tensors), out=pinned)
    return pinned.to(device, non_blocking=True)


def normalise(maps: Tensor) -> tuple[Tensor, Tensor]:
    """Per-map min-max to [0, 1]; maps without variation (or not finite) become zeros."""
    values = maps.flatten(1).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    lo = values.amin(1, keepdim=True)
    hi = values.amax(1, keepdim=True)
    span = hi - lo
    flat = (span <= 1e-6 * torch.maximum(hi.abs(), lo.abs())).squeeze(1)
    scaled = torch.where(flat[:, None], torch.zeros_like(values), (values - lo) / span)
    return scaled.view_as(maps), flat


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the call; every flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode


@contextmanager
def memory_format(model: nn.Module, layout: torch.memory_format) -> Iterator[None]:
    """The model's 4-D parameters and buffers in `layout` for the call; the very tensors it
    had (storage, strides, values) are put back afterwards, also after an exception."""
    saved: list[tuple[Tensor, Tensor]] = []
    try:
        if layout is not torch.contiguous_format:
            for tensor in [*model.parameters(), *model.buffers()]:
                if tensor.ndim == 4 and not tensor.is_contiguous(memory_format=layout):
                    saved.append((tensor, tensor.data))
                    tensor.data = tensor.data.contiguous(memory_format=layout)
        yield
    finally:
        for tensor, data in saved:
            tensor.data = data


@contextmanager
def capture(
    module: nn.Module, as_consumed: bool, track_grad: bool, layout: Layout = NCHW_DEFAULT
) -> Iterator[dict[str, Tensor]]:
    """Hook `module` and keep its output under ``"activation"`` as it left the module.

    With `track_grad` the output is cut from the graph and made a leaf that requires
    grad: nothing before it is recorded. If it already requires grad (an earlier
    captured layer is a leaf upstream), it stays in the graph, so gradients reach
    both. The model continues with a copy, so in-place ops downstream (ResNet's
    ``+=``, DenseNet's ``relu_``) never touch the leaf. With
    `as_consumed` the copy is kept instead: it ends up holding the tensor as pooled.
    The stored tensor keeps the layer's own layout (NCHW, NHWC or tokens); `read_map`
    reads it, and its gradient, as (B, C, h, w).
    """
    store: dict[str, Tensor] = {}
    ndim = 3 if layout.kind == "tokens" else 4

    def hook(_: nn.Module, __: Any, output: Any) -> Tensor:
        if not isinstance(output, Tensor) or output.ndim != ndim:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise UsageError(f"the target layer output {shape}, not the {layout.describe()} map it had on the probe")
        source = output.detach().requires_grad_(True) if track_grad and not output.requires_grad else output
        passed = source.clone()
        store["activation"] = passed if as_consumed else source
        return passed

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


class _Reached(Exception):
    """Raised by the hook once the layer's output is captured: the forward stops there."""


@contextmanager
def _stop_at(module: nn.Module) -> Iterator[dict[str, Tensor]]:
    store: dict[str, Tensor] = {}

    def hook(_: nn.Module, __: object, output: object) -> None:
        if not isinstance(output, Tensor) or output.ndim not in (3, 4):
            raise UsageError("the layer must output one NCHW, NHWC or token tensor")
        store["activation"] = output
        raise _Reached

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def read_map(tensor: Tensor, info: LayerInfo, inputs: Tensor) -> Tensor:
    """A captured activation or its gradient as (B, C, h, w), by the layer's detected layout."""
    try:
        return info.layout.to_map(tensor, (int(inputs.shape[-2]), int(inputs.shape[-1])))
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"layer {info.name!r}: cannot read its output as {info.layout.describe()} ({exc})") from None


def layer_output(model: nn.Module, module: nn.Module, inputs: Tensor) -> Tensor:
    """`module`'s output for `inputs`, running the model only up to it."""
    with _stop_at(module) as store:
        try:
            model(inputs)
        except _Reached:
            pass
    if "activation" not in store:
        raise UsageError("the layer is not called by the model's forward")
    return store["activation"]


@contextmanager
def _outputs(modules: Sequence[nn.Module]) -> Iterator[list[Tensor]]:
    """Keep each module's output (in call order of `modules`) so its gradient can be taken;
    the model continues with a copy, so in-place ops downstream (ResNet's ReLU after a batch
    norm) never change the kept tensor, whose gradient is the one of the module's output."""
    kept: dict[int, Tensor] = {}

    def hook(index: int) -> Callable[..., Tensor]:
        def keep(_: nn.Module, __: Any, output: Tensor) -> Tensor:
            kept[index] = output
            return output.clone()

        return keep

    handles = [module.register_forward_hook(hook(i)) for i, module in enumerate(modules)]
    found: list[Tensor] = []
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in range(len(modules)) if i not in kept]
    if missing:
        raise UsageError(f"{len(missing)} of the {len(modules)} layers the method needs were not called in the forward")
    found.extend(kept[i] for i in range(len(modules)))


class _Rectifier(torch.autograd.Function):
    """clamp(x, lo, hi) whose backward is a method's rule (e.g. guided backprop's)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lo: float, hi: float, rule: Callable[..., Tensor]) -> Tensor:
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi, ctx.rule = lo, hi, rule
        return x.clamp(min=lo, max=None if math.isinf(hi) else hi)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:
        (x,) = ctx.saved_tensors
        return ctx.rule(grad_out, x, ctx.lo, ctx.hi), None, None, None


def _plain_rectifier_backward(grad_out: Tensor, x: Tensor, lo: float, hi: float) -> Tensor:
    """autograd's own gradient of clamp(x, lo, hi): grad_out where lo < x < hi."""
    if math.isinf(hi):
        return torch.ops.aten.threshold_backward(grad_out, x, lo)
    return torch.ops.aten.hardtanh_backward(grad_out, x, lo, hi)


class _SwitchedRule:
    """A rectifier rule read at backward time, so one forward serves a plain backward
    (the CAM gradients) and then a guided one (the input gradient)."""

    def __init__(self, rule: Callable[..., Tensor]) -> None:
        self.rule = rule

    def __call__(self, grad_out: Tensor, x: Tensor, lo: float, hi: float) -> Tensor:
        return self.rule(grad_out, x, lo, hi)


class _LeanGraph(TorchFunctionMode):
    """Ops that autograd records, each in its cheapest exact form (equal up to float rounding).

    Eval-mode batch norm becomes x * scale + shift, whose backward is one multiply, where
    aten's batch-norm backward costs 2.5x its forward on the CPU. A linear layer fed a
    non-contiguous input of 3+ dims gets a contiguous copy: with frozen weights aten does
    not fold such an input into one matrix product but runs a broadcast bmm, 2.5x slower
    in the forward and again in the backward. nn.MultiheadAttention (batch first) hands
    its functional form the transposed input, whose in-projection is such a linear: its
    query, key and value are made contiguous before (one copy where they are one tensor)."""

    def __init__(self, folds: BatchNormFolds | None = None) -> None:
        super().__init__()
        self.folding = None if folds is None else FoldingMode(folds)  # conv + batch norm as one conv

    def __torch_function__(self, func: Any, types: Any, args: Sequence = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.folding is not None:
            out = self.folding.handle(func, tuple(args), kwargs)
            if out is not NotImplemented:
                return out
        return self.lean(func, args, kwargs)

    def __exit__(self, *exc: Any) -> None:
        if self.folding is not None:
            self.folding.close(learn=exc[0] is None)  # a pass that raised teaches nothing
        super().__exit__(*exc)

    def lean(self, func: Any, args: Sequence, kwargs: Any) -> Any:
        """The call in its cheapest exact form."""
        if func is F.batch_norm:
            return _batch_norm_as_affine(*args, **kwargs)
        if func is F.linear and args and isinstance(args[0], Tensor) and args[0].ndim > 2:
            return func(args[0].contiguous(), *args[1:], **kwargs)
        if func is F.multi_head_attention_forward and len(args) >= 3:
            copies: dict[int, Tensor] = {}
            qkv = [copies.setdefault(id(t), t.contiguous()) for t in args[:3]]
            return func(*qkv, *args[3:], **kwargs)
        return func(*args, **kwargs)


@contextmanager
def lean_graph_from(modules: Sequence[nn.Module], folds: BatchNormFolds | None = None) -> Iterator[None]:
    """`_LeanGraph` from the output of the first of `modules` that runs (the leaf where the
    graph starts) to the end of the block. The ops before run untouched: a mode active
    there would, among others, turn off nn.MultiheadAttention's fused inference path."""
    mode = _LeanGraph(folds)
    entered = False

    def enter(*_: Any) -> None:
        nonlocal entered
        if not entered:
            mode.__enter__()
            entered = True

    handles = [module.register_forward_hook(enter) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if entered:
            mode.__exit__(None, None, None)


class _RectifierMode(_LeanGraph):
    """Routes every ReLU/ReLU6 call (module or functional, in-place or not) through
    `_Rectifier`; refuses activations the rule is not defined for. Its graph starts at
    the input, so the whole forward is lean (`_LeanGraph`)."""

    def __init__(self, rule: Callable[..., Tensor], method: str, folds: BatchNormFolds | None = None) -> None:
        super().__init__(folds)
        self.rule = rule
        self.method = method

    def lean(self, func: Any, args: Sequence, kwargs: Any) -> Any:
        if func in _RELU_FUNCTIONS:
            return _Rectifier.apply(args[0], 0.0, math.inf, self.rule)
        if func is F.relu6:
            return _Rectifier.apply(args[0], 0.0, 6.0, self.rule)
        if func is F.hardtanh:  # nn.ReLU6 is a Hardtanh(0, 6)
            lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
            hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
            if lo == 0.0:
                return _Rectifier.apply(args[0], 0.0, float(hi), self.rule)
            raise _not_rectifier(self.method, f"hardtanh({lo}, {hi})")
        if func in _NON_RECTIFIER_FUNCTIONS:
            raise _not_rectifier(self.method, func.__name__)
        return super().lean(func, args, kwargs)


def _batch_norm_as_affine(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Eval-mode batch norm as x * scale + shift (equal up to float rounding): its backward
    is one multiply, where aten's batch-norm backward costs 2.5x its forward on the CPU."""
    if training or running_mean is None or running_var is None or x.ndim != 4:
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    scale, shift = batch_norm_affine(running_mean, running_var, weight, bias, eps)
    return torch.addcmul(shift[:, None, None], x, scale[:, None, None])


def _not_rectifier(method: str, activation: str) -> MethodNotApplicable:
    return MethodNotApplicable(
        f"{method} is defined for ReLU/ReLU6 networks; this model uses {activation} (use gradcam or scorecam instead)"
    )


class Explainer:
    """Explains batches of one model at one layer (or several, fused) with a set of methods."""

    def __init__(
        self,
        model: nn.Module,
        layer: LayerInfo | Sequence[LayerInfo],
        methods: Sequence[Method],
        *,
        chunk_size: int | None = None,
        channels_last: bool = True,
        output_key: OutputKey = None,
        optional: Collection[str] = (),
        fuse: str = "mean",
        contrast: Contrast | None = None,
        smooth: str | None = None,
        precision: str = "fp32",
    ) -> None:
        """`optional` names methods (those `-m all` added) that are skipped, with the reason in
        `skipped`, where they do not apply; any other method that does not apply raises.
        `chunk_size` None: the hook-free forwards' chunks are tuned on the run (`camcli.chunking`)."""
        if fuse not in FUSIONS:
            raise UsageError(f"unknown fusion {fuse!r}; use one of {', '.join(FUSIONS)}")
        self.model = model
        self.fuse = fuse
        self.net = logits_model(model, output_key)  # calls return logits (camcli.models.outputs)
        self.contrast = contrast
        if smooth is not None and smooth not in SMOOTHINGS:
            raise UsageError(f"unknown smoothing {smooth!r}; use one of {', '.join(SMOOTHINGS)}")
        self.smooth = smooth
        first = next(model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.precision = precision
        self._autocast_dtype = autocast_dtype(precision, self.device)
        self._inference_model: nn.Module | None = None
        self.layers = [layer] if isinstance(layer, LayerInfo) else list(layer)
        if not self.layers:
            raise UsageError("no layer given")
        self.layer = self.layers[0]
        self.layer_name = ",".join(info.name for info in self.layers)
        self.layout = ", ".join(info.layout.describe() for info in self.layers)
        self.chunk_sizer = ChunkSizer(chunk_size, self.device)
        self.folds = BatchNormFolds(model)  # the recorded passes' conv + batch norm (camcli.bnfold)
        self.chunk_size = self.chunk_sizer.limit  # chunks of forwards with hooks or backwards: fixed
        # channels_last changes only the layout of the 4-D weights and inputs, never a value:
        # oneDNN's convolutions run without reorders, 0.55x (Lite0) to 0.85x (resnet50) the
        # forward time of the default layout on a 2-core CPU (benchmarks/RESULTS.md).
        # The model's own tensors are only borrowed in that layout (`session`), never left so.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._in_session = False
        modules = dict(model.named_modules())
        self.modules = [modules[info.name] for info in self.layers]
        self.module = self.modules[0]
        self._heads = [modules[info.head] if info.head is not None else None for info in self.layers]
        self._head = self._heads[0]
        self.skipped: list[tuple[str, str]] = []  # (method, why): optional methods that do not apply
        if self._layer_image_many(methods):
            raise UsageError(f"{self._layer_image_many(methods)} shows one layer; name one with --layer")
        kept = []
        for method in methods:
            reason = self._not_applicable(method)
            if reason is None:
                kept.append(method)
            elif method.name in optional:
                self.skipped.append((method.name, reason))
            else:
                raise MethodNotApplicable(reason)
        if not kept:
            raise MethodNotApplicable("; ".join(f"{name}: {why}" for name, why in self.skipped))
        self.methods = kept
        wanted = {m.name: m for m in self.methods}
        for method in self.methods:
            if isinstance(method, CombinedMethod):
                for name in method.requires:
                    wanted.setdefault(name, get_method(name))
        self._cam = [m for m in wanted.values() if isinstance(m, CamMethod)]
        self._gradient = [m for m in wanted.values() if isinstance(m, InputGradientMethod)]
        self._perturbation = [m for m in wanted.values() if isinstance(m, PerturbationMethod)]
        self._layer_image = [m for m in wanted.values() if isinstance(m, LayerImageMethod)]
        self._attention = [m for m in wanted.values() if isinstance(m, AttentionMethod)]
        self._transformer = _transformer_for(model, self._attention)
        self._output_key = output_key
        self._check_modifiers()

    def _check_modifiers(self) -> None:
        """--contrast and --smooth apply to CAM-family methods only, and each only where it is defined."""
        for option, given in (("--contrast", self.contrast is not None), ("--smooth", self.smooth is not None)):
            others = [m.name for m in self.methods if not isinstance(m, CamMethod)]
            if given and others:
                raise UsageError(f"{option} applies to CAM-family methods, not to {', '.join(others)}")
        for method in self._cam:
            if self.contrast is not None and not (method.needs_gradient or method.needs_linear_head):
                raise UsageError(f"--contrast needs a gradient or a linear head; {method.name} uses neither")
            if self.contrast is not None and type(method).score is not CamMethod.score:
                raise UsageError(f"{method.name} chooses its own contrast classes; leave out --contrast")
            if self.smooth == "eigen" and type(method).cam_map is not CamMethod.cam_map:
                raise UsageError(f"--smooth eigen needs channel weights; {method.name} computes its map otherwise")

    def _layer_image_many(self, methods: Sequence[Method]) -> str | None:
        named = [m.name for m in methods if isinstance(m, LayerImageMethod)]
        return named[0] if named and len(self.layers) > 1 else None

    def _not_applicable(self, method: Method) -> str | None:
        """Why `method` cannot explain this model at these layers, or None if it can."""
        if isinstance(method, CombinedMethod):
            for name in method.requires:
                reason = self._not_applicable(get_method(name))
                if reason is not None:
                    return reason.replace(f"{name} ", f"{method.name} ", 1)
            return None
        if isinstance(method, CamMethod) and method.needs_linear_head:
            for info in self.layers:
                if info.head is None:
                    return (
                        f"{method.name} needs a global-average-pool + linear head fed by layer "
                        f"{info.name!r}, which this model does not have (use gradcam instead)"
                    )
        if isinstance(method, AttentionMethod):
            return _attention_unfit(self.model, method)
        if isinstance(method, InputGradientMethod) and method.rectifier_backward is not None:
            for name, module in self.model.named_modules():
                if isinstance(module, _NON_RECTIFIER_MODULES):
                    return str(_not_rectifier(method.name, f"{type(module).__name__} ({name})"))
        return None

    def with_methods(self, methods: Sequence[Method]) -> Explainer:
        """The same model and layers with other methods (a re-run's missing ones)."""
        other = Explainer(
            self.model,
            self.layers,
            methods,
            chunk_size=self.chunk_sizer.limit if self.chunk_sizer.fixed else None,
            channels_last=self.memory_format is torch.channels_last,
            output_key=self._output_key,
            fuse=self.fuse,
            contrast=self.contrast,
            smooth=self.smooth,
            precision=self.precision,
        )
        other._in_session = self._in_session
        other._inference_model = self._inference_model  # the folded copy, once built, is shared
        other.chunk_sizer = self.chunk_sizer  # and the chunk size found for it
        other.folds = self.folds  # and the conv + batch-norm pairs learned
        return other

    @contextmanager
    def session(self) -> Iterator[None]:
        """The model in the engine's memory format for many `explain` calls (a folder run):
        converted once on entry, its original tensors put back on exit."""
        if self._in_session:
            yield
            return
        with memory_format(self.model, self.memory_format):
            self._in_session = True
            try:
                yield
            finally:
                self._in_session = False

    def explain(self, inputs: Tensor, target: TargetSpec) -> BatchResult:
        """Explain a (B, 3, H, W) batch; each sample gets its own target(s)."""
        with self.session():
            return self._explain(inputs, target)

    def _explain(self, inputs: Tensor, target: TargetSpec) -> BatchResult:
        try:
            return self._explain_passes(inputs, target)
        except FoldMismatch:  # the model reads a conv output the first pass saw only its norm read
            self.folds.disabled = True
            return self._explain_passes(inputs, target)

    def _explain_passes(self, inputs: Tensor, target: TargetSpec) -> BatchResult:
        results: dict[tuple[str, int], Explanation] = {}
        inputs = inputs.contiguous(memory_format=self.memory_format)
        with frozen(self.model):
            logits, targets = None, None
            shared = self._shared_guided()
            if self._cam or self._layer_image:
                logits, targets = self._cam_pass(inputs, target, results, shared)
            for method in self._gradient:
                if method is not shared:
                    logits, targets = self._gradient_pass(inputs, target, targets, logits, method, results)
            if self._attention:
                logits, targets = self._attention_pass(inputs, target, targets, logits, results)
            if self._perturbation:
                logits, targets = self._perturbation_pass(inputs, target, targets, logits, results)
        assert logits is not None and targets is not None
        for method in self.methods:
            if isinstance(method, CombinedMethod):
                gradient_name, cam_name = method.requires
                for rank in range(len(targets)):
                    gradient = results[gradient_name, rank]
                    cam = results[cam_name, rank].maps.unsqueeze(1)
                    cam = F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False)
                    maps = method.combine(gradient.maps, cam.squeeze(1))
                    results[method.name, rank] = Explanation(
                        method.name, rank, self.layer_name, targets[rank], maps, _gradient_flat(maps)
                    )
        ordered = []
        for rank in range(len(targets)):
            for method in self.methods:
                explanation = results[method.name, rank]
                explanation.kind = method.kind
                explanation.check_kind()
                ordered.append(explanation)
        valid = target.valid(logits, len(targets))
        if valid is not None:
            for explanation in ordered:
                explanation.valid = valid[explanation.rank]
        return BatchResult(logits=logits, explanations=ordered)

    def _shared_guided(self) -> InputGradientMethod | None:
        """The rectifier-rule method (guided backprop) that can ride on the CAM forward:
        one plain input per sample, and the CAM inputs are the plain inputs (no --smooth aug)."""
        if not self._cam or self.smooth == "aug":
            return None
        if self._autocast_dtype is not None and any(m.needs_fp32 for m in self._gradient):
            return None  # --precision bf16/fp16: guided backprop keeps its own fp32 pass, the CAMs stay reduced
        for method in self._gradient:
            if method.rectifier_backward is not None and type(method).inputs_for is InputGradientMethod.inputs_for:
                return method
        return None

    def _cam_pass(
        self,
        inputs: Tensor,
        target: TargetSpec,
        results: dict[tuple[str, int], Explanation],
        guided: InputGradientMethod | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """One forward for every CAM-family method (and, with `guided`, guided backprop on the
        same forward: the input is the leaf and the rectifiers switch rule at backward time);
        with --smooth aug the forward takes the augmented copies of the batch."""
        track_grad = any(m.needs_gradient for m in self._cam)
        copies = len(_AUGMENTATIONS) if self.smooth == "aug" else 1
        batch = inputs.shape[0]
        model_inputs = _augment(inputs) if copies > 1 else inputs
        mode: Any = nullcontext()
        switch = _SwitchedRule(_plain_rectifier_backward)
        if guided is not None:  # one forward for both: the input is the leaf, rectifiers switchable
            model_inputs = inputs.detach().requires_grad_(True)
            mode = _RectifierMode(switch, guided.name, self.folds)
        with ExitStack() as stack:
            stores = [
                stack.enter_context(capture(module, info.as_consumed, track_grad, info.layout))
                for module, info in zip(self.modules, self.layers, strict=True)
            ]
            if track_grad and guided is None:  # the graph starts at the first layer reached
                stack.enter_context(lean_graph_from(self.modules, self.folds))
            exact = any(m.needs_fp32 for m in [*self._cam, *self._layer_image])
            with torch.set_grad_enabled(track_grad or guided is not None), mode:
                logits = self._call(self.net, model_inputs, exact)
        captured = [store["activation"] for store in stores]  # each in its layer's own layout
        activations = [read_map(a, info, model_inputs) for a, info in zip(captured, self.layers, strict=True)]
        clean = logits if copies == 1 else logits[_IDENTITY * batch : (_IDENTITY + 1) * batch]
        targets = target.resolve(clean)
        for method in self._layer_image:
            acts = activations[0].detach()
            acts = acts[:batch] if copies == 1 else acts[_IDENTITY * batch :][:batch]
            with torch.no_grad():
                channels = method.select(acts)
                tiles = acts.gather(1, channels[:, :, None, None].expand(-1, -1, *acts.shape[2:]))
                maps, flat = normalise(tiles.flatten(0, 1).float())
            for rank, rank_targets in enumerate(targets):
                results[method.name, rank] = Explanation(
                    method.name,
                    rank,
                    self.layer_name,
                    rank_targets,
                    maps.view_as(tiles),
                    flat.view(tiles.shape[:2]).all(1),
                    channels=channels,
                    layout=self.layout,
                )
        for rank, rank_targets in enumerate(targets):
            contrasts = None if self.contrast is None else self.contrast.resolve(clean, rank_targets)
            copy_targets = rank_targets.repeat(copies)
            copy_contrasts = None if contrasts is None else contrasts.repeat(copies)
            gradients: dict[str | None, list[Tensor]] = {}
            if track_grad:
                for method in self._cam:
                    own = method.score(logits, copy_targets) if method.needs_gradient else None
                    key = None if own is None else method.name
                    if key in gradients or not method.needs_gradient:
                        continue
                    score = own if own is not None else logits.gather(1, copy_targets[:, None]).squeeze(1)
                    if own is None and copy_contrasts is not None:
                        score = score - logits.gather(1, copy_contrasts[:, None]).squeeze(1)
                    found = torch.autograd.grad(score.sum(), captured, retain_graph=True, allow_unused=True)
                    for info, gradient in zip(self.layers, found, strict=True):
                        if gradient is None:
                            raise MethodNotApplicable(f"layer {info.name!r} does not influence the logits")
                    gradients[key] = [
                        read_map(g, info, model_inputs) for g, info in zip(found, self.layers, strict=True)
                    ]
            for method in self._cam:
                key = method.name if method.name in gradients else None
                layer_gradients: Sequence[Tensor | None] = gradients.get(key, [None] * len(activations))
                contexts = [
                    CamContext(
                        activations=acts.detach().float(),
                        gradients=None if gradient is None else gradient.float(),
                        targets=copy_targets,
                        logits=logits.detach().float(),
                        inputs=model_inputs.detach(),
                        head_weight=None if head is None else head.weight.detach(),
                        forward=self._forward,
                        chunk_size=self.chunk_size,
                        forward_layer=functools.partial(self._forward_replacing, module, model_inputs.detach()),
                        gradients_at=functools.partial(self._layer_gradients, module, info),
                        contrasts=copy_contrasts,
                        sizer=self.chunk_sizer,
                    )
                    for acts, gradient, head, module, info in zip(
                        activations, layer_gradients, self._heads, self.modules, self.layers, strict=True
                    )
                ]
                with torch.no_grad():
                    raw = [self._raw_map(method, ctx) for ctx in contexts]
                    per_layer = [normalise(r.relu()) for r in raw]
                    if copies > 1:
                        per_layer = [normalise(_deaugment(maps, batch)) for maps, _ in per_layer]
                    maps, flat = _fuse(per_layer, self.fuse)
                results[method.name, rank] = Explanation(
                    method.name,
                    rank,
                    self.layer_name,
                    rank_targets,
                    maps,
                    flat,
                    raw=_single_raw(raw) if copies == 1 else None,
                    layout=self.layout,
                    contrasts=contrasts,
                )
        if guided is not None:
            switch.rule = guided.rectifier_backward
            for rank, rank_targets in enumerate(targets):
                score = logits.gather(1, rank_targets[:, None]).sum()
                (gradient,) = torch.autograd.grad(score, model_inputs, retain_graph=rank < len(targets) - 1)
                self._store_gradient(
                    guided, rank, rank_targets, [gradient.nan_to_num(0.0)], inputs, clean.detach(), [], results
                )
        return clean.detach().float(), targets

    def _raw_map(self, method: CamMethod, ctx: CamContext) -> Tensor:
        """The method's map before relu; with --smooth eigen the first principal component of w_c A_c."""
        if self.smooth == "eigen":
            return principal_projection(method.weighted_activations(ctx))
        return method.cam_map(ctx)

    def _store_gradient(
        self,
        method: InputGradientMethod,
        rank: int,
        rank_targets: Tensor,
        parts: list[Tensor],
        inputs: Tensor,
        logits: Tensor,
        modules: list[nn.Module],
        results: dict[tuple[str, int], Explanation],
    ) -> None:
        """One rank's input gradients (and `modules`' output gradients) -> the method's result."""
        samples = method.inputs_for(inputs)
        ctx = GradientContext(
            gradients=parts[0].view_as(samples),
            samples=samples,
            inputs=inputs,
            logits=logits,
            targets=rank_targets,
            forward=self._forward,
            chunk_size=self.chunk_size,
            modules=modules,
            module_gradients=parts[1:],
        )
        with torch.no_grad():
            result = method.finish(ctx)
            maps, flat = (result, _gradient_flat(result)) if result.ndim == 4 else normalise(result.relu())
        details = method.details(ctx, result)
        results[method.name, rank] = Explanation(method.name, rank, None, rank_targets, maps, flat, details=details)

    def _call(self, model: nn.Module, inputs: Tensor, exact: bool = False) -> Tensor:
        """`model(inputs)` under the requested precision (autocast; a plain call for fp32 or
        when `exact`: a method that needs fp32 results)."""
        with autocast(self.device, None if exact else self._autocast_dtype):
            return model(inputs)

    @property
    def fp32_methods(self) -> list[str]:
        """Methods computed in fp32 although a reduced precision was asked for (`needs_fp32`,
        sharing the CAM pass with one that does, or an attention method); empty under fp32."""
        if self._autocast_dtype is None:
            return []
        cam_pass = [*self._cam, *self._layer_image]
        exact = [m.name for m in cam_pass] if any(m.needs_fp32 for m in cam_pass) else []
        exact += [m.name for m in [*self._gradient, *self._perturbation] if m.needs_fp32]
        exact += [m.name for m in self._attention]
        return [m.name for m in self.methods if m.name in exact or self._combined_exact(m, exact)]

    def _combined_exact(self, method: Method, exact: list[str]) -> bool:
        return isinstance(method, CombinedMethod) and all(name in exact for name in method.requires)

    def inference_model(self, like: Tensor) -> nn.Module:
        """The model for forwards that read no hook: a deep copy with batch norm folded into
        the convolutions (`camcli.fused`), built on first use and checked on a probe shaped
        like `like`, called through the output rule; never the user's object."""
        if self._inference_model is None:
            from camcli.fused import inference_copy

            generator = torch.Generator().manual_seed(0)
            probe = torch.randn((2, *like.shape[1:]), generator=generator).to(like.device)
            copy, _ = inference_copy(self.net, probe.contiguous(memory_format=self.memory_format))
            self._inference_model = copy.to(memory_format=self.memory_format)
        return self._inference_model

    def _forward(self, inputs: Tensor, exact: bool = False) -> Tensor:
        """Logits (fp32) of extra inputs (Score-CAM's masked copies, occlusion, ...), on the
        inference copy in the model's memory format. Never for a forward that reads a hook."""
        inputs = inputs.contiguous(memory_format=self.memory_format)
        return self._call(self.inference_model(inputs), inputs, exact).float()

    def _hooked_forward(self, inputs: Tensor) -> Tensor:
        """Logits (fp32) of extra inputs on the model itself: for forwards whose hooks sit on its modules."""
        return self._call(self.net, inputs.contiguous(memory_format=self.memory_format)).float()

    def _exact_forward(self, inputs: Tensor) -> Tensor:
        return self._forward(inputs, exact=True)

    def _forward_replacing(self, module: nn.Module, inputs: Tensor, activations: Tensor, samples: Tensor) -> Tensor:
        """Logits of inputs[samples] with `module`'s output replaced by `activations` (Ablation-CAM)."""

        def hook(_: nn.Module, __: Any, output: Tensor) -> Tensor:
            return activations.to(output.dtype).contiguous(memory_format=self.memory_format).clone()

        handle = module.register_forward_hook(hook)
        try:
            return self._hooked_forward(inputs[samples])
        finally:
            handle.remove()

    def _layer_gradients(
        self, module: nn.Module, info: LayerInfo, inputs: Tensor, targets: Tensor
    ) -> tuple[Tensor, Tensor]:
        """`module`'s activations and d(logit of targets)/d(activations) for extra inputs,
        each read as (N, C, h, w) by the layer's layout, as the CAM pass hands them."""
        with capture(module, info.as_consumed, track_grad=True, layout=info.layout) as store, torch.enable_grad():
            with lean_graph_from([module], self.folds):
                logits = self._hooked_forward(inputs)
            activations = store["activation"]
            score = logits.gather(1, targets[:, None]).sum()
            (gradient,) = torch.autograd.grad(score, activations)
        return read_map(activations.detach(), info, inputs), read_map(gradient, info, inputs)

    def _gradient_pass(
        self,
        inputs: Tensor,
        target: TargetSpec,
        targets: list[Tensor] | None,
        logits: Tensor | None,
        method: InputGradientMethod,
        results: dict[tuple[str, int], Explanation],
    ) -> tuple[Tensor, list[Tensor]]:
        samples = method.inputs_for(inputs)  # (S, B, 3, H, W)
        plain = samples.shape[0] == 1
        if targets is None and not plain:  # noisy copies: targets come from the clean input
            with torch.inference_mode():
                logits = self._call(self.net, inputs).float()
            targets = target.resolve(logits)
        flat_inputs = samples.flatten(0, 1)
        step = len(flat_inputs) if plain else self.chunk_size
        rule = method.rectifier_backward
        modules = method.output_modules(self.model)
        gradients: list[list[list[Tensor]]] = []  # per chunk, per rank: input gradient, then each module's
        for start in range(0, len(flat_inputs), step):
            leaf = flat_inputs[start : start + step].detach().contiguous(memory_format=self.memory_format)
            leaf.requires_grad_(True)
            samples_of = torch.arange(start, start + len(leaf), device=inputs.device) % inputs.shape[0]
            mode = nullcontext() if rule is None else _RectifierMode(rule, method.name, self.folds)
            with torch.enable_grad(), mode, _outputs(modules) as outputs:
                out = self._call(self.net, leaf, method.needs_fp32)
            if targets is None:  # plain pass without an earlier one: this forward is the clean one
                logits, targets = out.detach().float(), target.resolve(out)
            chunk = []
            for rank, rank_targets in enumerate(targets):
                score = out.gather(1, rank_targets[samples_of, None]).sum()
                found = torch.autograd.grad(
                    score, [leaf, *outputs], retain_graph=rank < len(targets) - 1, allow_unused=True
                )
                chunk.append(
                    [
                        torch.zeros_like(t) if g is None else g.nan_to_num(0.0)
                        for g, t in zip(found, [leaf, *outputs], strict=True)
                    ]
                )
            gradients.append(chunk)
        assert logits is not None
        for rank, rank_targets in enumerate(targets):
            parts = [torch.cat([chunk[rank][n] for chunk in gradients]) for n in range(1 + len(modules))]
            self._store_gradient(method, rank, rank_targets, parts, inputs, logits.detach(), modules, results)
        return logits.detach(), targets

    def _attention_pass(
        self,
        inputs: Tensor,
        target: TargetSpec,
        targets: list[Tensor] | None,
        logits: Tensor | None,
        results: dict[tuple[str, int], Explanation],
    ) -> tuple[Tensor, list[Tensor]]:
        """One forward capturing every block's attention; per target rank, the gradients the
        methods ask for: of the target logit (one call for all blocks) and of each block's own
        score (one small call per block, which runs only that block and the head backwards)."""
        transformer = self._transformer
        assert transformer is not None
        kinds = {m.gradient for m in self._attention} - {None}
        with capture_attention(transformer, track_grad=bool(kinds), keep_tokens="block" in kinds) as captured:
            with torch.set_grad_enabled(bool(kinds)):
                out = self.model(inputs)
        attentions = captured.checked(transformer)
        grid = transformer.grid((int(inputs.shape[-2]), int(inputs.shape[-1])), int(attentions[0].shape[-1]))
        if targets is None:
            logits, targets = out.detach(), target.resolve(out)
        assert logits is not None
        detached = [a.detach() for a in attentions]
        for rank, rank_targets in enumerate(targets):
            gradients: dict[str | None, list[Tensor] | None] = {None: None}
            if "logit" in kinds:
                score = out.gather(1, rank_targets[:, None]).sum()
                gradients["logit"] = _attention_grad(score, attentions)
            if "block" in kinds:
                assert transformer.block_logits is not None
                with torch.enable_grad():
                    gradients["block"] = [
                        _attention_grad(transformer.block_logits(tokens).gather(1, rank_targets[:, None]).sum(), [a])[0]
                        for tokens, a in zip(captured.tokens, attentions, strict=True)
                    ]
            for method in self._attention:
                ctx = AttentionContext(
                    attentions=detached,
                    gradients=gradients[method.gradient],
                    prefix=transformer.prefix,
                    grid=grid,
                    targets=rank_targets,
                    logits=logits,
                )
                with torch.no_grad():
                    maps, flat = normalise(method.attribute(ctx).relu())
                results[method.name, rank] = Explanation(method.name, rank, None, rank_targets, maps, flat)
        return logits.detach(), targets

    def _perturbation_pass(
        self,
        inputs: Tensor,
        target: TargetSpec,
        targets: list[Tensor] | None,
        logits: Tensor | None,
        results: dict[tuple[str, int], Explanation],
    ) -> tuple[Tensor, list[Tensor]]:
        if logits is None or targets is None:
            with torch.inference_mode():
                logits = self._call(self.net, inputs).float()
            targets = target.resolve(logits)
        exact_logits = None
        for method in self._perturbation:
            forward, clean = self._forward, logits
            if method.needs_fp32 and self._autocast_dtype is not None:  # clean and perturbed scores both fp32
                if exact_logits is None:
                    with torch.inference_mode():
                        exact_logits = self._exact_forward(inputs)
                forward, clean = self._exact_forward, exact_logits
            ctx = ModelContext(
                inputs=inputs,
                logits=clean,
                targets=torch.stack(targets),
                forward=forward,
                chunk_size=self.chunk_size,
                layer_forward=self._layer_forward,
                sizer=self.chunk_sizer,
            )
            attributions = method.attribute(ctx)
            layer = self.layer.name if method.reads_layer else None
            for rank, rank_targets in enumerate(targets):
                if method.categorical:  # class indices per pixel: kept as they are
                    maps, flat = attributions[rank], torch.zeros(len(inputs), dtype=torch.bool, device=inputs.device)
                else:
                    maps, flat = normalise(attributions[rank].relu())
                results[method.name, rank] = Explanation(method.name, rank, layer, rank_targets, maps, flat)
        return logits, targets

    def _layer_forward(self, inputs: Tensor) -> Tensor:
        """The first target layer's output for extra inputs; the forward stops there."""
        return layer_output(self.model, self.module, inputs.contiguous(memory_format=self.memory_format))


def _transformer_for(model: nn.Module, methods: Sequence[AttentionMethod]) -> Transformer | None:
    """The model as a vision transformer the attention methods (each checked by `_attention_unfit`) read."""
    return find_transformer(model, methods[0].name) if methods else None


def _attention_unfit(model: nn.Module, method: AttentionMethod) -> str | None:
    """Why `method` cannot read this model's attention (not a supported vision transformer,
    no class token to follow, no way to score a block), or None if it can."""
    try:
        transformer = find_transformer(model, method.name)
    except MethodNotApplicable as exc:
        return str(exc)
    if method.needs_class_token and not transformer.class_token:
        return f"{method.name} follows the class token's attention; this {transformer.family} has none (use legrad)"
    if method.gradient == "block" and transformer.block_logits is None:
        return f"{method.name} cannot score the blocks of this model: {transformer.no_block_logits}"
    return None


def _attention_grad(score: Tensor, attentions: list[Tensor]) -> list[Tensor]:
    """d score / d each attention (the graph is kept for the next rank or block)."""
    gradients = torch.autograd.grad(score, attentions, retain_graph=True, allow_unused=True)
    if any(g is None for g in gradients):
        raise MethodNotApplicable("the target's score does not depend on the attention of every block")
    return list(gradients)


def _fuse(normalised: list[tuple[Tensor, Tensor]], how: str = "mean") -> tuple[Tensor, Tensor]:
    """One layer: its map. Several: the normalised maps, upsampled bilinearly to the finest
    layer's resolution, then averaged (``mean``) or multiplied (``product``: RefineCAM's rule,
    arXiv 2605.14641, a pixel stays hot only where every layer agrees, so the coarse layer
    says where and the fine one how sharp), normalised again so every map spans [0, 1].
    A product with a flat (all-zero) layer is flat."""
    if len(normalised) == 1:
        return normalised[0]
    size = max((maps.shape[-2:] for maps, _ in normalised), key=lambda s: s[0] * s[1])
    upsampled = torch.stack(
        [F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] for maps, _ in normalised]
    )
    return normalise(upsampled.prod(0) if how == "product" else upsampled.mean(0))


def _single_raw(raw: list[Tensor]) -> Tensor | None:
    """The map before ReLU and min-max (comparable across images); fused layers have none."""
    return raw[0].detach().float() if len(raw) == 1 else None


def _augment(inputs: Tensor) -> Tensor:
    """(A * B, 3, H, W): the batch under each of `_AUGMENTATIONS`, augmentation-major."""
    return torch.cat([(inputs.flip(-1) if flip else inputs) * factor for flip, factor in _AUGMENTATIONS])


def _deaugment(maps: Tensor, batch: int) -> Tensor:
    """(A * B, h, w) maps of the augmented copies -> (B, h, w): each put back (flipped
    maps flipped again; bilinear upsampling commutes with the flip) and averaged."""
    per_copy = maps.view(len(_AUGMENTATIONS), batch, *maps.shape[1:])
    restored = [m.flip(-1) if flip else m for m, (flip, _) in zip(per_copy, _AUGMENTATIONS, strict=True)]
    return torch.stack(restored).mean(0)


def _gradient_flat(gradient: Tensor) -> Tensor:
    return gradient.flatten(1).abs().amax(1) == 0


def parse_target(
    target: str | None,
    topk: int | None,
    categories: Sequence[str] | None,
    num_classes: int,
    threshold: float = 0.5,
) -> TargetSpec:
    """`--target` (top1, positive, an index or a class name) and `--topk` as a TargetSpec;
    ``positive`` explains every class whose sigmoid reaches `threshold` (multi-label)."""
    if target is not None and topk is not None:
        raise OptionError("{target} and {topk} exclude each other", "target", "topk")
    if target is not None and target.lower() == "positive":
        if not 0.0 < threshold < 1.0:
            raise OptionError(
                f"{{threshold}} must be between 0 and 1 (a sigmoid probability), not {threshold}", "threshold"
            )
        return TargetSpec(threshold=threshold)
    if topk is not None:
        if not 1 <= topk <= num_classes:
            raise OptionError(f"{{topk}} must be between 1 and {num_classes}, not {topk}", "topk")
        return TargetSpec(topk=topk)
    if target is None or target.lower() == "top1":
        return TargetSpec()
    if target.lstrip("-").isdigit():
        index = int(target)
        if not 0 <= index < num_classes:
            raise OptionError(f"{{target}} {index} is out of range: the model has {num_classes} classes", "target")
        return TargetSpec(index=index)
    return TargetSpec(index=class_by_name(target, list(categories or [])))


def parse_contrast(text: str | None, categories: Sequence[str] | None, num_classes: int) -> Contrast | None:
    """`--contrast`: second (each sample's runner-up), a class index or a class name."""
    if text is None:
        return None
    if text.strip().lower() == "second":
        return Contrast()
    try:
        return Contrast(parse_target(text, None, categories, num_classes).index)
    except UsageError as exc:
        raise UsageError(f"--contrast: {exc}".replace("--target ", "")) from None


def resolve_device(name: str) -> torch.device:
    """`--device`: auto (cuda, then mps, then cpu) or an explicit device that must exist."""
    name = name.lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise UsageError(f"device {name} is not available (this machine has {count} CUDA devices)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device mps is not available on this machine")
    elif device.type != "cpu":
        raise UsageError(f"device {name!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    return device
