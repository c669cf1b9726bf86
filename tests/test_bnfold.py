"""Batch norm folded into its convolution in the recorded passes (`camcli.bnfold`): learned on a
model's first pass, checked on every later one, never a different map."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from camcli.engine import Explainer, TargetSpec
from camcli.methods import parse_methods
from camcli.models import InputSpec, load_model, resolve_layers

CPU = torch.device("cpu")


def _with_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """A fresh BatchNorm is the identity: give every one trained-like statistics."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
    return model.eval()


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _unfolded(model: nn.Module, layers, methods: str, x: torch.Tensor, topk: int = 2):
    explainer = Explainer(model, layers, parse_methods(methods))
    explainer.folds.disabled = True
    return explainer.explain(x, TargetSpec(topk=topk))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v2", "resnet18"])
@pytest.mark.parametrize(
    ("layer", "methods"), [("fine", "gradcam,gradcam++,layercam"), ("auto", "guided-backprop,gradcam,guided-gradcam")]
)
def test_folded_passes_give_the_unfolded_maps(name: str, layer: str, methods: str) -> None:
    loaded = load_model(name, None if name == "efficientnet_lite0" else "none", input_size=64)
    model = _with_statistics(loaded.model)
    layers = resolve_layers(model, layer, loaded.input, CPU)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    explainer = Explainer(model, layers, parse_methods(methods))
    explainer.folds.pixels_per_weight = 0.0  # every pair, paying or not: the mechanism under test
    first = explainer.explain(x, TargetSpec(topk=2))  # watched: learns the pairs, folds nothing
    assert explainer.folds.pairs and explainer.folds.folded_calls == 0
    folded = explainer.explain(x, TargetSpec(topk=2))
    assert explainer.folds.folded_calls > 0 and not explainer.folds.disabled
    reference = _unfolded(model, layers, methods, x)
    torch.testing.assert_close(first.logits, reference.logits)
    torch.testing.assert_close(folded.logits, reference.logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(folded.explanations, reference.explanations, strict=True):
        assert (a.method, a.rank) == (b.method, b.rank) and torch.equal(a.targets, b.targets)
        if a.method == "guided-backprop":  # an input gradient: rounding can flip a guided mask at 0
            assert _pearson(a.maps, b.maps) > 0.9999, a.method
            assert (a.maps - b.maps).abs().max() <= 5e-3 * b.maps.abs().max(), a.method
        else:
            torch.testing.assert_close(a.maps, b.maps, atol=2e-4, rtol=0, msg=a.method)


class _ReadsItsConvTwice(nn.Module):
    """conv -> bn -> relu, plus the convolution's own output added back when `raw` is set: a
    model whose reads change between calls (what the first pass cannot know)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)
        self.raw = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(torch.relu(self.stem(x)))
        out = torch.relu(self.bn(y))
        if self.raw:
            out = out + y
        return self.head(out.mean((2, 3)))


def _tiny() -> tuple[nn.Module, list, torch.Tensor]:
    model = _with_statistics(_ReadsItsConvTwice())
    spec = InputSpec(size=16, mean=(0.0,) * 3, std=(1.0,) * 3)
    layers = resolve_layers(model, "stem", spec, CPU)
    return model, layers, torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def _watched(model: nn.Module, layers, x: torch.Tensor, methods: str = "gradcam,guided-backprop") -> Explainer:
    """An explainer after its first (watched) pass, folding every pair from then on."""
    explainer = Explainer(model, layers, parse_methods(methods))
    explainer.folds.pixels_per_weight = 0.0
    explainer.explain(x, TargetSpec())
    return explainer


def _assert_unfolded_maps(model: nn.Module, layers, x: torch.Tensor, result) -> None:
    reference = _unfolded(model, layers, "gradcam,guided-backprop", x, 1)
    torch.testing.assert_close(result.logits, reference.logits)
    for a, b in zip(result.explanations, reference.explanations, strict=True):
        torch.testing.assert_close(a.maps, b.maps)


def test_a_conv_output_read_beside_its_norm_is_not_folded() -> None:
    model, layers, x = _tiny()
    model.raw = True
    explainer = _watched(model, layers, x)
    assert explainer.folds.pairs == {}  # the add read y: no pair
    again = explainer.explain(x, TargetSpec())
    assert explainer.folds.folded_calls == 0
    _assert_unfolded_maps(model, layers, x, again)


def test_a_model_whose_reads_change_falls_back_to_the_unfolded_pass() -> None:
    model, layers, x = _tiny()
    explainer = _watched(model, layers, x)
    assert id(model.conv.weight) in explainer.folds.pairs  # learned while y went to the norm only
    model.raw = True  # now y is read by the add too: the folded y would be wrong there
    result = explainer.explain(x, TargetSpec())
    assert explainer.folds.disabled  # the mismatch was caught, the pass re-run unfolded
    _assert_unfolded_maps(model, layers, x, result)


def test_a_hooked_conv_is_not_folded_and_its_hook_sees_its_own_output() -> None:
    model, layers, x = _tiny()
    explainer = _watched(model, layers, x, "guided-backprop")
    seen: list[torch.Tensor] = []
    handle = model.conv.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        calls = explainer.folds.folded_calls
        explainer.explain(x, TargetSpec())
        assert explainer.folds.folded_calls == calls  # the only pair is hooked: left as it is
    finally:
        handle.remove()
    with torch.no_grad():
        expected = model.conv(torch.relu(model.stem(x)))
    torch.testing.assert_close(seen[0], expected)


def test_torchvision_resnet_folds_every_pair_in_its_guided_pass() -> None:
    """All 20 conv + norm pairs of resnet18 (downsample branches included) are found."""
    model = _with_statistics(torchvision.models.resnet18())
    layers = resolve_layers(model, "auto", InputSpec(size=32, mean=(0.0,) * 3, std=(1.0,) * 3), CPU)
    explainer = Explainer(model, layers, parse_methods("guided-backprop"))
    explainer.explain(torch.randn(1, 3, 32, 32), TargetSpec())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(explainer.folds.pairs) == len(convs) == 20


def test_reduced_precision_passes_are_never_folded() -> None:
    """Under autocast the norm would run in fp32 and the folded conv in bf16: not folded."""
    from camcli.bnfold import BatchNormFolds, FoldingMode

    folds = BatchNormFolds(torchvision.models.resnet18())
    assert FoldingMode(folds).active
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not FoldingMode(folds).active
    folds.disabled = True
    assert not FoldingMode(folds).active


def test_folding_only_where_it_pays() -> None:
    """A 7x7 stage's convolutions (thousands of weights per output channel, 49 pixels) are
    left unfolded: refolding their weights each pass would cost more than the norm."""
    from camcli.bnfold import BatchNormFolds

    folds = BatchNormFolds(nn.Identity())
    wide = nn.Conv2d(512, 512, 3, padding=1)
    assert not folds.pays(torch.empty(8, 512, 7, 7), wide.weight, wide)  # 392 pixels < 4,608 weights
    assert folds.pays(torch.empty(8, 64, 56, 56), nn.Conv2d(64, 64, 3).weight, nn.Conv2d(64, 64, 3))
    strided = nn.Conv2d(64, 64, 3, stride=2)
    assert not folds.pays(torch.empty(1, 64, 40, 40), strided.weight, strided)  # 400 / 4 < 576
