"""Attention rollout: Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020.

The residual connection is accounted for by mixing each block's head-averaged attention
with the identity, Â^l = 0.5 mean_h A^l + 0.5 I (rows re-normalised), and attention is
rolled out through the blocks, R = Â^L ... Â^2 Â^1 (section 3). The map is the class
token's row of R at the patch tokens: how much of the class token's final representation
flows from each patch. Class-agnostic: every target gets the same map.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import AttentionContext, AttentionMethod

if TYPE_CHECKING:
    from torch import Tensor


@register
class Rollout(AttentionMethod):
    name = "rollout"
    title = "Attention rollout: R = prod_l (0.5 mean_h A^l + 0.5 I), class-token row"
    paper = "Abnar & Zuidema, ACL 2020"
    url = "https://arxiv.org/abs/2005.00928"
    needs = "vision transformer with a class token (class-agnostic)"
    cost = "1 forward"
    needs_class_token = True

    def attribute(self, ctx: AttentionContext) -> Tensor:
        import torch

        first = ctx.attentions[0]
        batch, tokens = first.shape[0], first.shape[-1]
        eye = torch.eye(tokens, device=first.device)
        rolled = eye.expand(batch, tokens, tokens)
        for probs in ctx.attentions:
            mixed = 0.5 * probs.float().mean(1) + 0.5 * eye
            rolled = (mixed / mixed.sum(-1, keepdim=True)) @ rolled
        return rolled[:, 0, ctx.prefix :].reshape(batch, *ctx.grid)
