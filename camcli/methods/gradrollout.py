"""Gradient-weighted attention rollout: Chefer, Gur, Wolf, "Generic Attention-model
Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021.

For self-attention, each block's attention A^l is weighted by the gradient of the target's
logit y^t, kept where positive and averaged over heads, Ā^l = E_h[(d y^t / d A^l ⊙ A^l)^+]
(eq. 5), and relevance is propagated from the identity, R <- R + Ā^l R for l = 1..L
(eq. 6). The map is the class token's row of R at the patch tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import AttentionContext, AttentionMethod

if TYPE_CHECKING:
    from torch import Tensor


@register
class GradRollout(AttentionMethod):
    name = "grad-rollout"
    title = "Gradient-weighted rollout: R += E_h[(grad ⊙ A)^+] R, class-token row"
    paper = "Chefer, Gur, Wolf, ICCV 2021"
    url = "https://arxiv.org/abs/2103.15679"
    needs = "vision transformer with a class token, gradient"
    cost = "1 forward + full backward"
    needs_gradient = True
    needs_class_token = True
    gradient = "logit"

    def attribute(self, ctx: AttentionContext) -> Tensor:
        import torch

        assert ctx.gradients is not None
        first = ctx.attentions[0]
        batch, tokens = first.shape[0], first.shape[-1]
        relevance = torch.eye(tokens, device=first.device).expand(batch, tokens, tokens)
        for probs, grad in zip(ctx.attentions, ctx.gradients, strict=True):
            weighted = (grad.float() * probs.float()).clamp(min=0).mean(1)
            relevance = relevance + weighted @ relevance
        return relevance[:, 0, ctx.prefix :].reshape(batch, *ctx.grid)
