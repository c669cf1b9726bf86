"""The shared engine: hooks, targets and one pass per batch for every requested method.

A batch is explained with one forward (and, if any method needs it, one partial
backward per target rank) for all CAM-family methods together: parameters are
frozen for the call and the hooked activation is made a leaf that requires grad,
so autograd records nothing before it and `torch.autograd.grad` computes no weight
gradients. With several layers (`--layer a,b`) all are captured in that forward and
one `torch.autograd.grad` call returns the gradients of all of them; each method's
normalised maps are averaged. Input-gradient methods (guided backprop, saliency,
SmoothGrad's noisy copies) take one more forward and a backward to the input;
perturbation methods (occlusion) extra forwards without autograd. Every hook and every
flag the engine changes is put back in `finally`, whatever a method raises.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from camcli.errors import MethodNotApplicable, UsageError
from camcli.methods import (
    CamContext,
    CamMethod,
    CombinedMethod,
    InputGradientMethod,
    LayerImageMethod,
    Method,
    ModelContext,
    PerturbationMethod,
    get_method,
)
from camcli.models import LayerInfo
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

    def resolve(self, logits: Tensor) -> list[Tensor]:
        """One (B,) tensor of class indices per rank, each sample with its own target."""
        if self.per_sample is not None:
            if len(self.per_sample) != logits.shape[0]:
                raise ValueError(f"{len(self.per_sample)} per-sample targets for a batch of {logits.shape[0]}")
            (default,) = TargetSpec(self.index).resolve(logits)
            given = torch.tensor([-1 if c is None else c for c in self.per_sample], device=logits.device)
            return [torch.where(given >= 0, given, default)]
        if self.index is not None:
            return [torch.full((logits.shape[0],), self.index, device=logits.device)]
        ranked = logits.topk(self.topk, dim=1).indices
        return list(ranked.unbind(1))


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

    @property
    def is_gradient(self) -> bool:
        return self.maps.ndim == 4 and self.channels is None

    @property
    def is_tiles(self) -> bool:
        return self.channels is not None


@dataclass
class BatchResult:
    logits: Tensor  # (B, num_classes)
    explanations: list[Explanation]


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
def capture(module: nn.Module, as_consumed: bool, track_grad: bool) -> Iterator[dict[str, Tensor]]:
    """Hook `module` and keep its output under ``"activation"``.

    With `track_grad` the output is cut from the graph and made a leaf that requires
    grad: nothing before it is recorded. If it already requires grad (an earlier
    captured layer is a leaf upstream), it stays in the graph, so gradients reach
    both. The model continues with a copy, so in-place ops downstream (ResNet's
    ``+=``, DenseNet's ``relu_``) never touch the leaf. With
    `as_consumed` the copy is kept instead: it ends up holding the tensor as pooled.
    """
    store: dict[str, Tensor] = {}

    def hook(_: nn.Module, __: Any, output: Any) -> Tensor:
        if not isinstance(output, Tensor) or output.ndim != 4:
            raise UsageError("the target layer must output one (B, C, H, W) tensor")
        source = output.detach().requires_grad_(True) if track_grad and not output.requires_grad else output
        passed = source.clone()
        store["activation"] = passed if as_consumed else source
        return passed

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


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


class _RectifierMode(TorchFunctionMode):
    """Routes every ReLU/ReLU6 call (module or functional, in-place or not) through
    `_Rectifier`; refuses activations the rule is not defined for."""

    def __init__(self, rule: Callable[..., Tensor], method: str) -> None:
        super().__init__()
        self.rule = rule
        self.method = method

    def __torch_function__(self, func: Any, types: Any, args: Sequence = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
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
        if func is F.batch_norm:
            return _batch_norm_as_affine(*args, **kwargs)
        return func(*args, **kwargs)


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
    scale = (running_var + eps).rsqrt()
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
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
        chunk_size: int = 32,
        channels_last: bool = True,
        precision: str = "fp32",
    ) -> None:
        self.model = model
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
        self.methods = list(methods)
        self.chunk_size = chunk_size
        # channels_last changes only the layout of the 4-D weights and inputs, never a value:
        # oneDNN's convolutions run without reorders, 0.55x (Lite0) to 0.85x (resnet50) the
        # forward time of the default layout on a 2-core CPU (benchmarks/RESULTS.md).
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            model.to(memory_format=torch.channels_last)
        modules = dict(model.named_modules())
        self.modules = [modules[info.name] for info in self.layers]
        self.module = self.modules[0]
        self._heads = [modules[info.head] if info.head is not None else None for info in self.layers]
        self._head = self._heads[0]
        wanted = {m.name: m for m in self.methods}
        for method in self.methods:
            if isinstance(method, CombinedMethod):
                for name in method.requires:
                    wanted.setdefault(name, get_method(name))
        self._cam = [m for m in wanted.values() if isinstance(m, CamMethod)]
        self._gradient = [m for m in wanted.values() if isinstance(m, InputGradientMethod)]
        self._perturbation = [m for m in wanted.values() if isinstance(m, PerturbationMethod)]
        self._layer_image = [m for m in wanted.values() if isinstance(m, LayerImageMethod)]
        self._check_applicable()

    def _check_applicable(self) -> None:
        for method in self._cam:
            for info in self.layers:
                if method.needs_linear_head and info.head is None:
                    raise MethodNotApplicable(
                        f"{method.name} needs a global-average-pool + linear head fed by layer "
                        f"{info.name!r}, which this model does not have (use gradcam instead)"
                    )
        if self._layer_image and len(self.layers) > 1:
            raise UsageError(f"{self._layer_image[0].name} shows one layer; name one with --layer")
        guided = [m for m in self._gradient if m.rectifier_backward is not None]
        if guided:
            for name, module in self.model.named_modules():
                if isinstance(module, _NON_RECTIFIER_MODULES):
                    raise _not_rectifier(guided[0].name, f"{type(module).__name__} ({name})")

    def explain(self, inputs: Tensor, target: TargetSpec) -> BatchResult:
        """Explain a (B, 3, H, W) batch; each sample gets its own target(s)."""
        results: dict[tuple[str, int], Explanation] = {}
        inputs = inputs.contiguous(memory_format=self.memory_format)
        with frozen(self.model):
            logits, targets = None, None
            if self._cam or self._layer_image:
                logits, targets = self._cam_pass(inputs, target, results)
            for method in self._gradient:
                logits, targets = self._gradient_pass(inputs, target, targets, logits, method, results)
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
        ordered = [results[m.name, rank] for rank in range(len(targets)) for m in self.methods]
        return BatchResult(logits=logits, explanations=ordered)

    def _cam_pass(
        self, inputs: Tensor, target: TargetSpec, results: dict[tuple[str, int], Explanation]
    ) -> tuple[Tensor, list[Tensor]]:
        track_grad = any(m.needs_gradient for m in self._cam)
        with ExitStack() as stack:
            stores = [
                stack.enter_context(capture(module, info.as_consumed, track_grad))
                for module, info in zip(self.modules, self.layers, strict=True)
            ]
            exact = any(m.needs_fp32 for m in [*self._cam, *self._layer_image])
            with torch.set_grad_enabled(track_grad):
                logits = self._call(self.model, inputs, exact)
        activations = [store["activation"] for store in stores]
        targets = target.resolve(logits)
        for method in self._layer_image:
            acts = activations[0].detach()
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
                    channels,
                )
        for rank, rank_targets in enumerate(targets):
            gradients: Sequence[Tensor | None] = [None] * len(activations)
            if track_grad:
                score = logits.gather(1, rank_targets[:, None]).sum()
                gradients = torch.autograd.grad(
                    score, activations, retain_graph=rank < len(targets) - 1, allow_unused=True
                )
                for info, gradient in zip(self.layers, gradients, strict=True):
                    if gradient is None:
                        raise MethodNotApplicable(f"layer {info.name!r} does not influence the logits")
            contexts = [
                CamContext(
                    activations=acts.detach().float(),
                    gradients=None if gradient is None else gradient.float(),
                    targets=rank_targets,
                    logits=logits.detach().float(),
                    inputs=inputs,
                    head_weight=None if head is None else head.weight.detach(),
                    forward=self._forward,
                    chunk_size=self.chunk_size,
                )
                for acts, gradient, head in zip(activations, gradients, self._heads, strict=True)
            ]
            for method in self._cam:
                with torch.no_grad():
                    maps, flat = _fuse([normalise(method.cam_map(ctx).relu()) for ctx in contexts])
                results[method.name, rank] = Explanation(method.name, rank, self.layer_name, rank_targets, maps, flat)
        return logits.detach().float(), targets

    def _call(self, model: nn.Module, inputs: Tensor, exact: bool = False) -> Tensor:
        """`model(inputs)` under the requested precision (autocast; a plain call for fp32 or
        when `exact`: a method that needs fp32 results)."""
        with autocast(self.device, None if exact else self._autocast_dtype):
            return model(inputs)

    @property
    def fp32_methods(self) -> list[str]:
        """Methods computed in fp32 although a reduced precision was asked for (`needs_fp32`,
        or sharing the CAM pass with one that does); empty under fp32."""
        if self._autocast_dtype is None:
            return []
        cam_pass = [*self._cam, *self._layer_image]
        exact = [m.name for m in cam_pass] if any(m.needs_fp32 for m in cam_pass) else []
        exact += [m.name for m in [*self._gradient, *self._perturbation] if m.needs_fp32]
        return [m.name for m in self.methods if m.name in exact or self._combined_exact(m, exact)]

    def _combined_exact(self, method: Method, exact: list[str]) -> bool:
        return isinstance(method, CombinedMethod) and all(name in exact for name in method.requires)

    def inference_model(self, like: Tensor) -> nn.Module:
        """The model for forwards that read no hook: a deep copy with batch norm folded into
        the convolutions (`camcli.fused`), built on first use and checked on a probe shaped
        like `like`; never the user's object."""
        if self._inference_model is None:
            from camcli.fused import inference_copy

            generator = torch.Generator().manual_seed(0)
            probe = torch.randn((2, *like.shape[1:]), generator=generator).to(like.device)
            copy, _ = inference_copy(self.model, probe.contiguous(memory_format=self.memory_format))
            self._inference_model = copy.to(memory_format=self.memory_format)
        return self._inference_model

    def _forward(self, inputs: Tensor, exact: bool = False) -> Tensor:
        """Logits (fp32) of extra inputs (Score-CAM's masked copies, occlusion, ...), on the
        inference copy in the model's memory format."""
        inputs = inputs.contiguous(memory_format=self.memory_format)
        return self._call(self.inference_model(inputs), inputs, exact).float()

    def _exact_forward(self, inputs: Tensor) -> Tensor:
        return self._forward(inputs, exact=True)

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
                logits = self._call(self.model, inputs).float()
            targets = target.resolve(logits)
        flat_inputs = samples.flatten(0, 1)
        step = len(flat_inputs) if plain else self.chunk_size
        rule = method.rectifier_backward
        gradients: list[list[Tensor]] = []
        for start in range(0, len(flat_inputs), step):
            leaf = flat_inputs[start : start + step].detach().contiguous(memory_format=self.memory_format)
            leaf.requires_grad_(True)
            samples_of = torch.arange(start, start + len(leaf), device=inputs.device) % inputs.shape[0]
            mode = nullcontext() if rule is None else _RectifierMode(rule, method.name)
            with torch.enable_grad(), mode:
                out = self._call(self.model, leaf, method.needs_fp32)
            if targets is None:  # plain pass without an earlier one: this forward is the clean one
                logits, targets = out.detach().float(), target.resolve(out)
            chunk = []
            for rank, rank_targets in enumerate(targets):
                score = out.gather(1, rank_targets[samples_of, None]).sum()
                (gradient,) = torch.autograd.grad(score, leaf, retain_graph=rank < len(targets) - 1)
                chunk.append(gradient.nan_to_num(0.0))
            gradients.append(chunk)
        for rank, rank_targets in enumerate(targets):
            stacked = torch.cat([chunk[rank] for chunk in gradients]).view_as(samples)
            with torch.no_grad():
                result = method.reduce(stacked)
                maps, flat = (result, _gradient_flat(result)) if result.ndim == 4 else normalise(result.relu())
            results[method.name, rank] = Explanation(method.name, rank, None, rank_targets, maps, flat)
        assert logits is not None
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
                logits = self._call(self.model, inputs).float()
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
            )
            attributions = method.attribute(ctx)
            for rank, rank_targets in enumerate(targets):
                maps, flat = normalise(attributions[rank].relu())
                results[method.name, rank] = Explanation(method.name, rank, None, rank_targets, maps, flat)
        return logits, targets


def _fuse(normalised: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """One layer: its map. Several: the mean of their normalised maps at the finest
    layer's resolution (bilinear), normalised again so every map spans [0, 1]."""
    if len(normalised) == 1:
        return normalised[0]
    size = max((maps.shape[-2:] for maps, _ in normalised), key=lambda s: s[0] * s[1])
    upsampled = [
        F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] for maps, _ in normalised
    ]
    return normalise(torch.stack(upsampled).mean(0))


def _gradient_flat(gradient: Tensor) -> Tensor:
    return gradient.flatten(1).abs().amax(1) == 0


def parse_target(
    target: str | None, topk: int | None, categories: Sequence[str] | None, num_classes: int
) -> TargetSpec:
    """`--target` (top1, an index or a class name) and `--topk` as a TargetSpec."""
    if target is not None and topk is not None:
        raise UsageError("--target and --topk exclude each other")
    if topk is not None:
        if not 1 <= topk <= num_classes:
            raise UsageError(f"--topk must be between 1 and {num_classes}, not {topk}")
        return TargetSpec(topk=topk)
    if target is None or target.lower() == "top1":
        return TargetSpec()
    if target.lstrip("-").isdigit():
        index = int(target)
        if not 0 <= index < num_classes:
            raise UsageError(f"--target {index} is out of range: the model has {num_classes} classes")
        return TargetSpec(index=index)
    names = list(categories or [])
    for matches in (
        [i for i, n in enumerate(names) if n == target],
        [i for i, n in enumerate(names) if n.lower() == target.lower()],
    ):
        if len(matches) == 1:
            return TargetSpec(index=matches[0])
        if len(matches) > 1:
            listed = ", ".join(f"{i} ({names[i]})" for i in matches)
            raise UsageError(f"class name {target!r} is ambiguous: {listed}; give the index")
    similar = [n for n in names if target.lower() in n.lower()]
    similar = similar or difflib.get_close_matches(target, names, n=5, cutoff=0.6)
    hint = f"; candidates: {', '.join(similar[:8])}" if similar else ""
    raise UsageError(f"unknown class name {target!r}{hint}")


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
