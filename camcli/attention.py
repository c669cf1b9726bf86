"""Attention probabilities of a vision transformer, captured for one call.

The attention methods (LeGrad, attention rollout, gradient-weighted rollout) read the
post-softmax attention A = softmax(q k^T / sqrt(d)) of every block, (B, heads, N, N), and
some of them its gradient. Neither model family hands it out on a plain forward:

- torchvision's `VisionTransformer` calls its `nn.MultiheadAttention` with
  `need_weights=False`, and the weights that MHA returns on request are a view made after
  they were used, which receives no gradient. For the call, each MHA's `forward` is an
  explicit attention (the same arithmetic as MHA's reference path) that keeps A, the very
  tensor multiplied into the values.
- timm's `Attention` uses the fused `scaled_dot_product_attention`. For the call each
  module's `fused_attn` flag is off, so timm's own explicit branch runs, and a pre-hook on
  its `attn_drop` keeps the softmax output it is given.

With `track_grad` the first captured A is made a leaf that requires grad (parameters are
frozen by the engine, so nothing before it is recorded); every later A depends on it and
stays in the graph, so gradients of the logits reach every block through all paths.
Every hook, flag and `forward` attribute is put back in `finally`. Only the families named
below are read; any other architecture is refused by name rather than guessed at.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camcli.errors import MethodNotApplicable

SUPPORTED = (
    "torchvision VisionTransformer (vit_*) and timm VisionTransformer / DeiT "
    "(with class, distillation and register tokens)"
)
_MISSING = object()


@dataclass(frozen=True)
class Transformer:
    """What the attention methods need to know about a supported vision transformer."""

    family: str  # e.g. "torchvision VisionTransformer"
    blocks: tuple[nn.Module, ...]  # the residual blocks, in order
    attentions: tuple[nn.Module, ...]  # each block's attention module
    prefix: int  # leading non-patch tokens: class, distillation and register tokens
    class_token: bool  # token 0 is a class token
    patch: tuple[int, int]  # patch height, width (the stride of the patch embedding)
    ceil_grid: bool  # timm's dynamic padding: a partial patch at the border still makes a token
    block_logits: Callable[[Tensor], Tensor] | None  # (B, N, C) block output -> (B, classes), LeGrad's score
    no_block_logits: str = ""  # why block_logits is None

    def grid(self, size: tuple[int, int], tokens: int) -> tuple[int, int]:
        """The patch grid (h, w) of an input of `size` (H, W), checked against the token count."""
        if self.ceil_grid:
            grid = (-(-size[0] // self.patch[0]), -(-size[1] // self.patch[1]))
        else:
            grid = (size[0] // self.patch[0], size[1] // self.patch[1])
        if grid[0] * grid[1] + self.prefix != tokens:
            raise MethodNotApplicable(
                f"the attention has {tokens} tokens, but a {size[0]}x{size[1]} input in patches of "
                f"{self.patch[0]}x{self.patch[1]} gives {grid[0]}x{grid[1]} + {self.prefix} prefix tokens"
            )
        return grid


def find_transformer(model: nn.Module, method: str) -> Transformer:
    """The model read as a supported vision transformer, or MethodNotApplicable naming `method`."""
    found = _torchvision_vit(model, method) or _timm_vit(model, method)
    if found is None:
        raise MethodNotApplicable(
            f"{method} reads the attention of a vision transformer; {type(model).__name__} is not one of "
            f"the supported kinds ({SUPPORTED}); use gradcam or saliency instead"
        )
    return found


def _torchvision_vit(model: nn.Module, method: str) -> Transformer | None:
    if not type(model).__module__.startswith("torchvision."):
        return None
    from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

    if type(model) is not VisionTransformer:
        return None
    blocks = tuple(model.encoder.layers)
    for index, block in enumerate(blocks):
        if type(block) is not EncoderBlock or type(block.self_attention) is not nn.MultiheadAttention:
            raise MethodNotApplicable(
                f"{method}: encoder.layers.{index} is not torchvision's EncoderBlock with self-attention"
            )
        _check_mha(block.self_attention, f"{method}: encoder.layers.{index}.self_attention")

    def block_logits(tokens: Tensor) -> Tensor:
        # LeGrad's score of an intermediate block: the final norm and head on the token mean
        return model.heads(model.encoder.ln(tokens.mean(1)))

    return Transformer(
        family="torchvision VisionTransformer",
        blocks=blocks,
        attentions=tuple(block.self_attention for block in blocks),
        prefix=1,
        class_token=True,
        patch=(model.patch_size, model.patch_size),
        ceil_grid=False,
        block_logits=block_logits,
    )


def _check_mha(mha: nn.MultiheadAttention, name: str) -> None:
    if not mha.batch_first or not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        raise MethodNotApplicable(f"{name}: only batch-first attention with one packed q/k/v projection is read")
    if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
        raise MethodNotApplicable(f"{name}: attention with added key/value tokens is not read")


def _timm_vit(model: nn.Module, method: str) -> Transformer | None:
    if not type(model).__module__.startswith("timm."):
        return None
    from timm.layers import Attention
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Block, VisionTransformer

    if type(model) not in (VisionTransformer, VisionTransformerDistilled):
        return None
    blocks = tuple(model.blocks)
    for index, block in enumerate(blocks):
        kind = type(block).__name__
        if type(block) is not Block:
            raise MethodNotApplicable(f"{method}: blocks.{index} is a {kind}; only timm's pre-norm Block is read")
        if type(block.attn) is not Attention or not isinstance(block.attn.attn_drop, nn.Dropout):
            raise MethodNotApplicable(
                f"{method}: blocks.{index}.attn is a {type(block.attn).__name__}; only timm's Attention is read"
            )
    patch_embed = model.patch_embed
    distilled = type(model) is VisionTransformerDistilled
    block_logits: Callable[[Tensor], Tensor] | None = None
    reason = ""
    if model.attn_pool is not None:
        reason = "its head pools the tokens with attention (global_pool='map'), not by mean or class token"
    else:

        def block_logits(tokens: Tensor) -> Tensor:
            pooled = model.fc_norm(model.norm(tokens.mean(1)))
            if distilled:
                return (model.head(pooled) + model.head_dist(pooled)) / 2
            return model.head(pooled)

    return Transformer(
        family=f"timm {type(model).__name__}",
        blocks=blocks,
        attentions=tuple(block.attn for block in blocks),
        prefix=int(model.num_prefix_tokens),
        class_token=model.cls_token is not None,
        patch=tuple(int(p) for p in patch_embed.patch_size),
        ceil_grid=bool(getattr(patch_embed, "dynamic_img_pad", False)),
        block_logits=block_logits,
        no_block_logits=reason,
    )


@dataclass
class Captured:
    """What one forward left: each block's attention (B, heads, N, N) and, if kept, its output tokens."""

    attentions: list[Tensor] = field(default_factory=list)
    tokens: list[Tensor] = field(default_factory=list)

    def checked(self, transformer: Transformer) -> list[Tensor]:
        """The attentions, after checking that there is one row-stochastic (B, heads, N, N) per block."""
        if len(self.attentions) != len(transformer.blocks):
            raise MethodNotApplicable(
                f"captured {len(self.attentions)} attention maps for {len(transformer.blocks)} blocks"
            )
        for index, probs in enumerate(self.attentions):
            rows = probs.detach().float().sum(-1)
            if (
                probs.ndim != 4
                or probs.shape[-1] != probs.shape[-2]
                or not torch.allclose(rows, torch.ones_like(rows), atol=1e-2)
            ):
                raise MethodNotApplicable(
                    f"block {index}: the captured tensor {tuple(probs.shape)} is no attention map"
                )
        return self.attentions


@contextmanager
def capture_attention(transformer: Transformer, track_grad: bool, keep_tokens: bool) -> Iterator[Captured]:
    """Collect every block's attention probabilities (and with `keep_tokens` its output) for
    the forwards inside the block; the model is exactly as before afterwards."""
    captured = Captured()

    def keep(probs: Tensor) -> Tensor:
        if track_grad and not probs.requires_grad:
            probs = probs.detach().requires_grad_(True)
        captured.attentions.append(probs)
        return probs

    handles = []
    forwards: list[tuple[nn.Module, Any]] = []
    flags: list[tuple[nn.Module, Any]] = []
    try:
        for attention in transformer.attentions:
            if isinstance(attention, nn.MultiheadAttention):
                forwards.append((attention, attention.__dict__.get("forward", _MISSING)))
                attention.forward = MethodType(_explicit_mha(keep), attention)
            else:  # timm Attention: its own explicit branch, softmax output taken at attn_drop
                flags.append((attention, attention.__dict__.get("fused_attn", _MISSING)))
                attention.fused_attn = False
                handles.append(attention.attn_drop.register_forward_pre_hook(lambda _, args: (keep(args[0]),)))
        if keep_tokens:
            for block in transformer.blocks:
                handles.append(block.register_forward_hook(lambda _, __, out: captured.tokens.append(out)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        for module, previous in forwards:
            _restore(module, "forward", previous)
        for module, previous in flags:
            _restore(module, "fused_attn", previous)


def _restore(module: nn.Module, name: str, previous: Any) -> None:
    if previous is _MISSING:
        module.__dict__.pop(name, None)
    else:
        module.__dict__[name] = previous


def _explicit_mha(keep: Callable[[Tensor], Tensor]) -> Callable[..., tuple[Tensor, Tensor | None]]:
    """nn.MultiheadAttention.forward for batch-first self-attention without masks, computed
    explicitly so that the attention probabilities are a tensor of the graph."""

    def forward(
        self: nn.MultiheadAttention,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if query is not key or key is not value or key_padding_mask is not None or attn_mask is not None or is_causal:
            raise MethodNotApplicable("only unmasked self-attention (query = key = value) is read")
        batch, tokens, embed = query.shape
        heads = self.num_heads
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, tokens, 3, heads, embed // heads).permute(2, 0, 3, 1, 4)
        probs = keep(((q * (embed // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1))
        mixed = F.dropout(probs, self.dropout, self.training) @ v
        out = F.linear(mixed.transpose(1, 2).reshape(batch, tokens, embed), self.out_proj.weight, self.out_proj.bias)
        weights = (probs.mean(1) if average_attn_weights else probs) if need_weights else None
        return out, weights

    return forward
