"""How a layer's output lies over the image: NCHW, NHWC or tokens (B, N, C), detected, never assumed.

A tensor is a spatial map of the input only when some of its dimensions are the input's
height and width divided by one stride (what convolutions, patch embeddings and
poolings do). `detect` matches a tensor's shape to the input size and returns the
`Layout` that reads it as (B, C, h, w), or the reason it is no map: attention internals
(B, heads, N, d), vectors (B, C), window batches, shapes that fit two layouts and
nothing says which. Tokens lose their prefix (class, distillation, register tokens)
and take their grid from the input size, so other sizes and non-square inputs work.
Model hints (timm's `num_prefix_tokens`, torchvision ViT's class token, a patch size)
confirm a reading; they never replace the shape check.

The engine applies the same `Layout.to_map` to a layer's activation and to its gradient,
so every method keeps its (B, C, h, w) contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

MAX_PREFIX = 8  # class + distillation + register tokens searched without a hint

_CHANNELS_FIRST = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)


@dataclass(frozen=True)
class Layout:
    """A layer's layout: ``NCHW``, ``NHWC`` or ``tokens`` (with `prefix` leading non-grid tokens)."""

    kind: str
    grid: tuple[int, int]  # (h, w) at the probe input
    prefix: int = 0
    stride: float = 1.0  # input pixels per grid cell, to find the grid at another input size

    def describe(self) -> str:
        """'NCHW 7x7', 'NHWC 7x7', 'tokens 1+196 -> 14x14' (what `camcli layers` shows)."""
        h, w = self.grid
        if self.kind == "tokens":
            return f"tokens {self.prefix}+{h * w} -> {h}x{w}" if self.prefix else f"tokens {h * w} -> {h}x{w}"
        return f"{self.kind} {h}x{w}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "prefix": self.prefix}

    def to_map(self, x: Tensor, input_size: tuple[int, int] | None = None) -> Tensor:
        """`x` (this layout) as (B, C, h, w): a view or copy that autograd follows."""
        if self.kind == "NCHW":
            return x
        if self.kind == "NHWC":
            return x.permute(0, 3, 1, 2)
        tokens = x[:, self.prefix :]
        h, w = self.grid
        if tokens.shape[1] != h * w:  # another input size than the probe's
            found = token_grid(tokens.shape[1], input_size or (round(h * self.stride), round(w * self.stride)))
            if found is None:
                raise ValueError(f"{tokens.shape[1]} tokens form no grid of the input {input_size}")
            h, w = found
        return tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


NCHW_DEFAULT = Layout("NCHW", (0, 0))
# Pixels unpadded ("valid") convolutions may lose at the border: a 7x7, or three 3x3 in a row.
BORDER_LOSS = 6
AMBIGUOUS = "nothing tells which"  # the words of a refusal that the model's graph may settle


def grid_stride(size: int, cells: int) -> int | None:
    """The integer stride mapping `size` input pixels onto `cells` grid cells, if any.

    Allows what padding-free convolutions lose at the border (PiT: 224 -> 27 at stride
    8; Inception: 299 -> 8 at stride 32; LeNet: 28 -> 24 after a 5x5 convolution):
    |size - cells * stride| <= max(stride, 5% of size, BORDER_LOSS).
    """
    if not 1 < cells <= size:
        return None
    for stride in sorted({max(1, size // cells), max(1, round(size / cells)), -(-size // cells)}):
        if abs(size - cells * stride) <= max(stride, 0.05 * size, BORDER_LOSS):
            return stride
    return None


def _same_stride(input_size: tuple[int, int], grid: tuple[int, int]) -> int | None:
    """The one stride mapping the input (H, W) onto grid (h, w), or None."""
    sh, sw = grid_stride(input_size[0], grid[0]), grid_stride(input_size[1], grid[1])
    if sh is None or sw is None:
        return None
    if sh != sw and abs(input_size[0] / grid[0] - input_size[1] / grid[1]) > 0.1 * max(sh, sw):
        return None
    return sh


def token_grid(count: int, input_size: tuple[int, int], patch: int | None = None) -> tuple[int, int] | None:
    """The grid (h, w) with h * w == `count` cells over `input_size` at one stride, if exactly one
    (or exactly one at the model's `patch` size)."""
    found = [
        (h, count // h)
        for h in range(2, count // 2 + 1)
        if count % h == 0 and _same_stride(input_size, (h, count // h)) is not None
    ]
    if patch and len(found) > 1:
        found = [g for g in found if g == (input_size[0] // patch, input_size[1] // patch)] or found
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class Hints:
    """What the model says about its tokens (each may be unknown)."""

    prefix: int | None = None  # class + distillation + register tokens
    patch: int | None = None


def model_hints(model: nn.Module) -> Hints:
    """timm (`num_prefix_tokens`, `patch_embed.patch_size`), torchvision ViT (`class_token`,
    `patch_size`) and Hugging Face configs (`patch_size`, `num_register_tokens`)."""
    prefix = getattr(model, "num_prefix_tokens", None)
    patch: Any = getattr(model, "patch_size", None)
    embed = getattr(model, "patch_embed", None)
    if patch is None and embed is not None:
        patch = getattr(embed, "patch_size", None)
    if prefix is None and isinstance(getattr(model, "class_token", None), Tensor):
        prefix = 1  # torchvision VisionTransformer
    config = getattr(model, "config", None)
    if config is not None:
        patch = patch or getattr(config, "patch_size", None)
        if prefix is None and getattr(config, "model_type", "") in {"vit", "deit", "dinov2", "dinov2_with_registers"}:
            prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0) + (config.model_type == "deit")
    if isinstance(patch, (tuple, list)):
        patch = patch[0] if len(set(patch)) == 1 else None
    return Hints(prefix if isinstance(prefix, int) else None, patch if isinstance(patch, int) else None)


def _channels_first_module(module: nn.Module | None) -> bool | None:
    """What a module's type says about its 4-D output: True NCHW, False NHWC, None nothing."""
    if module is None:
        return None
    if isinstance(module, _CHANNELS_FIRST) or "2d" in type(module).__name__.lower():
        return True
    if isinstance(module, (nn.Linear, nn.LayerNorm)):
        return False
    return None


def detect(
    shape: tuple[int, ...],
    input_size: tuple[int, int],
    batch: int,
    hints: Hints = Hints(),
    module: nn.Module | None = None,
) -> Layout | str:
    """The layout of a layer output of `shape` for an input batch of `batch` x 3 x `input_size`,
    or why it is no spatial map of the input."""
    where = f"{tuple(shape)} for a {input_size[0]}x{input_size[1]} input"
    if len(shape) < 1 or shape[0] != batch:
        return f"{where}: its first dimension is not the batch (windows or a reshaped batch)"
    if len(shape) == 4:
        readings = []
        nchw = _same_stride(input_size, (shape[2], shape[3]))
        if nchw is not None:
            readings.append(Layout("NCHW", (shape[2], shape[3]), 0, nchw))
        nhwc = _same_stride(input_size, (shape[1], shape[2]))
        if nhwc is not None:
            readings.append(Layout("NHWC", (shape[1], shape[2]), 0, nhwc))
        if len(readings) == 2:
            evidence = _channels_first_module(module)
            if evidence is None:
                return (
                    f"{where}: reads as NCHW or NHWC and {AMBIGUOUS} "
                    f"(a {type(module).__name__} output); refused rather than guessed"
                )
            readings = [readings[0] if evidence else readings[1]]
        if not readings:
            return f"{where}: no two dimensions are the input's grid (an attention internal, not a spatial map)"
        return readings[0]
    if len(shape) == 3:
        count, channels = shape[1], shape[2]
        if channels == 1:
            return f"{where}: one channel per token, a pooled vector rather than a map"
        prefixes = [hints.prefix] if hints.prefix is not None and hints.prefix <= count else []
        prefixes += [p for p in range(MAX_PREFIX + 1) if p != hints.prefix]
        for p in prefixes:
            grid = token_grid(count - p, input_size, hints.patch)
            if grid is None:
                continue
            if _ambiguous_prefix(count, p, input_size, hints):
                return f"{where}: tokens with {p} or another number of leading tokens; refused rather than guessed"
            confirmed = p == hints.prefix or (
                hints.patch is not None and grid == (input_size[0] // hints.patch, input_size[1] // hints.patch)
            )
            channels_last = isinstance(module, (nn.Linear, nn.LayerNorm))
            if not (confirmed or channels_last) and token_grid(channels, input_size) is not None:
                return f"{where}: reads as (B, N, C) or (B, C, N) and nothing tells which; refused rather than guessed"
            stride = _same_stride(input_size, grid) or 1
            return Layout("tokens", grid, p, float(stride))
        return f"{where}: its tokens form no grid of the input"
    kind = "a vector" if len(shape) <= 2 else "not a map"
    return f"{where}: a {len(shape)}-D tensor is no spatial map ({kind})"


def _ambiguous_prefix(count: int, prefix: int, input_size: tuple[int, int], hints: Hints) -> bool:
    """True if another prefix also gives a grid and no hint picks `prefix`."""
    if hints.prefix == prefix:
        return False
    others = [p for p in range(MAX_PREFIX + 1) if p != prefix and token_grid(count - p, input_size, hints.patch)]
    if hints.patch:
        others = [p for p in others if token_grid(count - p, input_size, hints.patch) is not None]
        mine = token_grid(count - prefix, input_size, hints.patch)
        expected = (input_size[0] // hints.patch, input_size[1] // hints.patch)
        if mine == expected:
            return False
    return bool(others)
