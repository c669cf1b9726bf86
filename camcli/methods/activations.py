"""Intermediate activations: the channels of a layer as images, "what this layer sees"
(Chollet, Deep Learning with Python, 2017, section 5.4.1).

The N channels with the largest mean activation over the image, strongest first; the
engine normalises each tile to [0, 1] on its own and the writer tiles them with the
colormap. No target: the tiles are the same for every class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camcli.methods import register
from camcli.methods.base import LayerImageMethod, Setting

if TYPE_CHECKING:
    from torch import Tensor


@register
class Activations(LayerImageMethod):
    name = "activations"
    title = "Layer activations"
    paper = "Chollet, Manning 2017 (Deep Learning with Python 5.4.1)"
    url = "https://www.manning.com/books/deep-learning-with-python"
    needs = "nothing"
    cost = "1 forward"
    needs_fp32 = True  # bf16 vs fp32 Pearson 0.68-0.98 on the samples (benchmarks/RESULTS.md)
    in_all = False
    settings = (Setting("tiles", int, 16, "how many channels to show", minimum=1, alias="--tiles"),)

    def __init__(self, tiles: int = 16) -> None:
        self.tiles = tiles

    def select(self, activations: Tensor) -> Tensor:
        strength = activations.mean(dim=(2, 3))
        return strength.topk(min(self.tiles, strength.shape[1]), dim=1).indices
