"""What a method is: a small class that computes only its own part of an explanation.

The engine (`camcli.engine`) owns hooks, targets, gradients, upsampling and
normalisation. A CAM-family method returns channel weights for the captured
activations (or, through `cam_map`, a map of its own); an input-gradient method
states how a rectifier passes gradients backwards and how input gradients become
its result; a perturbation method scores modified inputs; a layer-image method
picks channels of the layer to show; a combined method multiplies the results of
the methods it needs; an attention method reads a vision transformer's attention
probabilities (and their gradients) instead of a layer. Options a method takes are declared where it is defined, as
`Setting`s (name, type, default, help, validation): the CLI offers each as
`--set METHOD.NAME=VALUE` (some also under an older option name, `--samples`) and
`camcli methods METHOD` lists them; each is a constructor keyword of the method.

This module imports no torch at run time, so `camcli --help` and `camcli methods` stay fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from camcli.errors import UsageError

if TYPE_CHECKING:
    from torch import Tensor

    from camcli.chunking import ChunkSizer
    from camcli.models.spec import InputSpec


@dataclass(frozen=True)
class Setting:
    """One option of a method: `--set METHOD.NAME=VALUE`, a keyword of its constructor.

    `parse` turns the command line's text into a value (default: by `type`); `check`
    returns why a value is refused, or None; `to_input` converts a parsed value once the
    model's input normalisation is known (a colour in 0-255 -> normalised input units).
    `alias` is an older option name (`--samples`) that sets it too.
    """

    name: str
    type: type
    default: Any
    help: str
    minimum: float | None = None
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None
    parse: Callable[[str], Any] | None = None
    to_input: Callable[[Any, InputSpec], Any] | None = None
    alias: str | None = None

    def from_text(self, method: str, text: str) -> Any:
        """The value of `--set method.name=text`, or a usage error naming it."""
        try:
            if self.parse is not None:
                return self.validate(method, self.parse(text))
            if self.type is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text.lower() in ("true", "1", "yes")
            return self.validate(method, self.type(text))
        except ValueError as exc:
            detail = f": {exc}" if str(exc) else ""
            raise UsageError(f"{self.where(method)} expects {self.describe_type()}, not {text!r}{detail}") from None

    def validate(self, method: str, value: Any) -> Any:
        """`value` if it is allowed, else a usage error in one line."""
        where = self.where(method)
        if self.choices and isinstance(value, str) and value not in self.choices and self.parse is None:
            raise UsageError(f"{where} must be one of {', '.join(self.choices)}, not {value!r}")
        if self.minimum is not None and value is not None and not value >= self.minimum:
            raise UsageError(f"{where} must be at least {self.minimum:g}, not {value}")
        problem = None if self.check is None or value is None else self.check(value)
        if problem:
            raise UsageError(f"{where} {problem}")
        return value

    def where(self, method: str) -> str:
        """How an error names it: `smoothgrad.samples (--samples)`."""
        return f"{method}.{self.name}" + (f" ({self.alias})" if self.alias else "")

    def describe_type(self) -> str:
        if self.choices:
            return " | ".join(self.choices)
        return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(self.type, "a value")

    def to_json(self) -> dict[str, Any]:
        plain = self.default is None or isinstance(self.default, int | float | str)
        default = self.default if plain else str(self.default)
        return {
            "name": self.name,
            "type": self.type.__name__,
            "choices": list(self.choices),
            "default": default,
            "help": self.help,
            "alias": self.alias,
        }


def colour_or(*words: str) -> Callable[[str], str | tuple[float, float, float]]:
    """A `Setting.parse` for one of `words` or a colour R,G,B in 0-255."""

    def parse(text: str) -> str | tuple[float, float, float]:
        if text.lower() in words:
            return text.lower()
        try:
            parts = tuple(float(v) for v in text.split(","))
        except ValueError:
            parts = ()
        if len(parts) != 3 or not all(0 <= v <= 255 for v in parts):
            raise ValueError(f"use {', '.join(words)} or R,G,B in 0-255")
        return parts  # type: ignore[return-value]

    return parse


def colour_to_input(value: Any, spec: InputSpec) -> Any:
    """A `Setting.to_input`: an R,G,B colour in 0-255 (or `black`) as normalised model input;
    other words stay."""
    if value == "black":
        value = (0.0, 0.0, 0.0)
    if isinstance(value, str):
        return value
    return tuple((v / 255.0 - m) / s for v, m, s in zip(value, spec.mean, spec.std, strict=True))


def settings_of(cls: type[Method]) -> dict[str, Setting]:
    """A method class's settings by name."""
    return {s.name: s for s in cls.settings}


class _ChunkedForwards:
    """`chunks(items)`: the rows of `items`, one per extra input, in the chunks that one
    `forward` takes: sized by the run's `sizer` (tuned on the run, `camcli.chunking`), or by
    `chunk_size` where the context has no sizer."""

    inputs: Tensor
    chunk_size: int
    sizer: ChunkSizer | None

    def chunks(self, items: Tensor) -> Iterator[Tensor]:
        if self.sizer is None:
            return iter(items.split(self.chunk_size))
        return self.sizer.split(items, key=tuple(self.inputs.shape[1:]))


@dataclass(frozen=True)
class CamContext(_ChunkedForwards):
    """Everything a CAM-family method may read for one batch and one target rank."""

    activations: Tensor  # (B, C, h, w) captured at the target layer, detached
    gradients: Tensor | None  # (B, C, h, w) d(target logit)/d(activations), if needed
    targets: Tensor  # (B,) class index per sample
    logits: Tensor  # (B, num_classes), detached
    inputs: Tensor  # (B, 3, H, W) normalised model input
    head_weight: Tensor | None  # (num_classes, C) of a GAP + linear head, if present
    forward: Callable[[Tensor], Tensor]  # batched logits of extra inputs (no grad)
    chunk_size: int  # how many extra inputs one forward may take
    # logits of inputs[samples] with this layer's output replaced by `activations`, (N, C, h, w)
    forward_layer: Callable[[Tensor, Tensor], Tensor] | None = None  # (activations, samples) -> logits
    # this layer's activations and d(logit of targets)/d(activations) for extra inputs (N, 3, H, W)
    gradients_at: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None  # (inputs, targets)
    contrasts: Tensor | None = None  # (B,) with --contrast: the class each target is set against
    sizer: ChunkSizer | None = None  # sizes the chunks of `forward`'s extra inputs (`chunks`)


# What a method's result is, said once where the method is defined: the writer, the
# metrics and the API dispatch on it, never on a tensor's shape.
HEATMAP = "heatmap"  # (B, h, w) in [0, 1]: overlaid on the image, scored by the metrics
GRADIENT = "gradient"  # (B, 3, H, W) raw input gradient: drawn as an image of its own
TILES = "tiles"  # (B, N, h, w) channels of the layer, one tile each (with their indices)
LABELS = "labels"  # (B, h, w) class indices: a label map with a legend
KINDS = (HEATMAP, GRADIENT, TILES, LABELS)


class Method:
    """Common metadata; see the subclasses for what a method computes."""

    name: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str]  # authors, year, venue
    url: ClassVar[str]
    needs: ClassVar[str]  # what the model must offer, for `camcli methods`
    cost: ClassVar[str]  # relative cost, for `camcli methods`
    needs_gradient: ClassVar[bool] = False
    needs_linear_head: ClassVar[bool] = False
    in_all: ClassVar[bool] = True  # False: a baseline or tool that `-m all` leaves out unless named
    settings: ClassVar[Sequence[Setting]] = ()  # its options, each a constructor keyword
    # True: under --precision bf16/fp16 its result drifts from fp32 (Pearson < 0.99 measured on
    # the samples: pixel-level input gradients, small probability changes, near-tie channel picks),
    # so the engine computes it in fp32 whatever the precision asked for, and says so.
    needs_fp32: ClassVar[bool] = False
    kind: str = HEATMAP  # one of KINDS (an instance may set its own, as occlusion's winner map)


class CamMethod(Method):
    """A class activation map: relu(sum_c w_c * A_c), with w from `weights`."""

    def weights(self, ctx: CamContext) -> Tensor:
        """Return (B, C) channel weights, or (B, C, h, w) element-wise weights."""
        raise NotImplementedError

    def cam_map(self, ctx: CamContext) -> Tensor:
        """(B, h, w) map before the engine's relu: sum_c w_c * A_c by default; a method
        whose map is not a weighted channel sum (Eigen-CAM, the centre baseline) overrides
        this instead."""
        return self.weighted_activations(ctx).sum(1)

    def weighted_activations(self, ctx: CamContext) -> Tensor:
        """(B, C, h, w) w_c * A_c, whose channel sum is the map (`--smooth eigen` takes
        their first principal component instead)."""
        weights = self.weights(ctx)
        if weights.ndim == 2:
            weights = weights[:, :, None, None]
        return weights * ctx.activations

    def score(self, logits: Tensor, targets: Tensor) -> Tensor | None:
        """(B,) the score whose gradient the method takes, for a method with its own
        objective (Finer-CAM); None: the target's logit, or with --contrast the engine's
        logit difference."""
        return None


class InputGradientMethod(Method):
    """An input gradient in which every rectifier uses `rectifier_backward`.

    `rectifier_backward(grad_out, x, lo, hi)` is the gradient passed to the input x of
    clamp(x, lo, hi); None keeps autograd's own backward for every activation (a plain
    gradient, defined for any model). `inputs_for` may add noisy copies of the batch;
    `reduce` turns their gradients into the method's result.
    """

    needs_gradient = True
    rectifier_backward: ClassVar[Callable[[Tensor, Tensor, float, float], Tensor] | None] = None

    def inputs_for(self, inputs: Tensor) -> Tensor:
        """(S, B, 3, H, W): the S inputs per sample whose gradients `reduce` combines."""
        return inputs.unsqueeze(0)

    def reduce(self, gradients: Tensor) -> Tensor:
        """(S, B, 3, H, W) input gradients -> (B, 3, H, W) raw gradient (rendered as an
        image) or (B, H, W) map (relu, normalised and overlaid by the engine)."""
        return gradients.mean(0)

    def output_modules(self, model: Any) -> list[Any]:
        """Modules whose outputs' gradients the method also needs (FullGrad's biased layers)."""
        return []

    def finish(self, ctx: GradientContext) -> Tensor:
        """The method's result from everything the pass saw; `reduce` of the gradients by default."""
        return self.reduce(ctx.gradients)

    def details(self, ctx: GradientContext, result: Tensor) -> dict[str, Tensor] | None:
        """(B,) numbers per sample for the JSON (Integrated Gradients' completeness), or None."""
        return None


@dataclass(frozen=True)
class GradientContext:
    """What an input-gradient method may read for one batch and one target rank."""

    gradients: Tensor  # (S, B, 3, H, W) d(target logit)/d(input) at each of `samples`
    samples: Tensor  # (S, B, 3, H, W) the inputs `inputs_for` made
    inputs: Tensor  # (B, 3, H, W) normalised model input
    logits: Tensor  # (B, num_classes) of the clean input, detached
    targets: Tensor  # (B,) class index per sample
    forward: Callable[[Tensor], Tensor]  # batched logits of extra inputs (no grad)
    chunk_size: int
    modules: list[Any]  # `output_modules(model)`
    module_gradients: list[Tensor]  # (S*B, C, h, w) d(target logit)/d(output) of each, samples first


@dataclass(frozen=True)
class ModelContext(_ChunkedForwards):
    """What a perturbation method may read for one batch: the model as a function."""

    inputs: Tensor  # (B, 3, H, W) normalised model input
    logits: Tensor  # (B, num_classes), detached
    targets: Tensor  # (R, B) class index per target rank and sample
    forward: Callable[[Tensor], Tensor]  # batched logits of extra inputs (no grad)
    chunk_size: int  # how many extra inputs one forward may take
    layer_forward: Callable[[Tensor], Tensor] | None = None  # the target layer's (B, C, h, w) for extra inputs
    sizer: ChunkSizer | None = None  # sizes the chunks of `forward`'s extra inputs (`chunks`)


class PerturbationMethod(Method):
    """A map from the model's scores on modified inputs (no hooks, no gradient)."""

    reads_layer: bool = False  # True: `attribute` reads ctx.layer_forward (the explanation names the layer)

    @property
    def categorical(self) -> bool:
        """`attribute` returns class indices (kind LABELS), kept as they are, not normalised."""
        return self.kind == LABELS

    def attribute(self, ctx: ModelContext) -> Tensor:
        """(R, B, h, w) map per target rank, before the engine's relu and normalisation."""
        raise NotImplementedError


class LayerImageMethod(Method):
    """Shows channels of the target layer themselves, one tile per channel."""

    kind = TILES

    def select(self, activations: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, N) indices of the channels to show, in display order."""
        raise NotImplementedError


class CombinedMethod(Method):
    """A product of other methods' results (e.g. guided Grad-CAM)."""

    kind = GRADIENT

    requires: ClassVar[tuple[str, str]]  # (input-gradient method, CAM method)

    def combine(self, gradient: Tensor, cam: Tensor) -> Tensor:
        """gradient (B, 3, H, W), cam (B, H, W) in [0, 1] -> (B, 3, H, W)."""
        raise NotImplementedError


@dataclass(frozen=True)
class AttentionContext:
    """What an attention method may read for one batch and one target rank (no layer)."""

    attentions: list[Tensor]  # per block, in order: (B, heads, N, N) softmax probabilities, detached
    gradients: list[Tensor] | None  # per block: d(score)/d(attention), the score as `gradient` asks
    prefix: int  # leading non-patch tokens (class, distillation, registers); token 0 is the class token
    grid: tuple[int, int]  # (h, w) of the N - prefix patch tokens, row-major
    targets: Tensor  # (B,) class index per sample
    logits: Tensor  # (B, num_classes), detached


class AttentionMethod(Method):
    """A map over the patch grid from the attention of every block of a vision transformer.

    `gradient` says which gradients the engine computes: None (none), ``"logit"`` (of the
    target's logit, one backward to every block's attention) or ``"block"`` (of each block's
    own score, the final norm and head applied to that block's output, LeGrad's).
    """

    gradient: ClassVar[str | None] = None
    needs_class_token: ClassVar[bool] = False  # reads the class token's row of the attention

    def attribute(self, ctx: AttentionContext) -> Tensor:
        """(B, h, w) map over the patch grid, before the engine's relu and normalisation."""
        raise NotImplementedError
