"""Grad-CAM on the activations that break CAM tools: in-place ReLU right after the target
layer (VGG), ReLU6 (MobileNetV2), SiLU (EfficientNet-B0), GELU + LayerNorm (ConvNeXt),
a functional in-place ReLU before pooling (DenseNet). Each map is checked against the
definition, computed here by splitting the model at the layer by hand:
``relu(sum_k mean(dy/dA_k) A_k)``, min-max normalised. Plus: the engine puts every hook
and flag back when a model raises inside a method's extra forwards."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from test_layers import loaded  # the same seeded random-weight models, built once per run
from torch import Tensor, nn

from camcli.engine import Explainer, TargetSpec
from camcli.methods import parse_methods
from camcli.models import IMAGENET_MEAN, IMAGENET_STD, InputSpec, resolve_layer

CPU = torch.device("cpu")
SIZE = 96  # inputs: 3 x 3 maps at stride 32

# model -> (layer, (model, input) -> the activation camcli explains, (model, activation) -> logits)
Split = tuple[str, Callable[[nn.Module, Tensor], Tensor], Callable[[nn.Module, Tensor], Tensor]]
SPLITS: dict[str, Split] = {
    # conv output that the next module, ReLU(inplace=True), overwrites
    "vgg11": (
        "features.18",
        lambda m, x: m.features[:19](x),
        lambda m, a: m.classifier(torch.flatten(m.avgpool(m.features[19:](a)), 1)),
    ),
    "mobilenet_v2": (
        "features",
        lambda m, x: m.features(x),
        lambda m, a: m.classifier(torch.flatten(F.adaptive_avg_pool2d(a, 1), 1)),
    ),
    "efficientnet_b0": (
        "features",
        lambda m, x: m.features(x),
        lambda m, a: m.classifier(torch.flatten(m.avgpool(a), 1)),
    ),
    "convnext_tiny": (
        "features",
        lambda m, x: m.features(x),
        lambda m, a: m.classifier(m.avgpool(a)),
    ),
    # DenseNet rectifies `features` in place (F.relu(..., inplace=True)) before pooling:
    # camcli explains the map as pooled
    "densenet121": (
        "features",
        lambda m, x: F.relu(m.features(x)),
        lambda m, a: m.classifier(torch.flatten(F.adaptive_avg_pool2d(a, 1), 1)),
    ),
}


def gradcam_by_definition(name: str, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(maps normalised to [0, 1], flat flags), computed on the model split at the layer."""
    model = loaded(name).model
    _, head, tail = SPLITS[name]
    with torch.no_grad():
        activation = head(model, x)
    leaf = activation.clone().requires_grad_(True)
    logits = tail(model, leaf.clone())  # the clone: in-place ops downstream must not touch the leaf
    (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), leaf)
    cam = (grad.mean((2, 3), keepdim=True) * activation).sum(1).relu()
    lo = cam.flatten(1).amin(1)[:, None, None]
    hi = cam.flatten(1).amax(1)[:, None, None]
    flat = (hi - lo).flatten() <= 1e-6 * hi.abs().flatten()
    return torch.where(flat[:, None, None], torch.zeros_like(cam), (cam - lo) / (hi - lo)), flat


@pytest.mark.parametrize("name", list(SPLITS))
def test_gradcam_matches_the_definition(name: str) -> None:
    model = loaded(name).model
    layer, _, _ = SPLITS[name]
    info = resolve_layer(model, layer, loaded(name).input, CPU)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    targets = logits.topk(3, dim=1).indices[:, 2]  # a class other than the top one
    result = Explainer(model, info, parse_methods("gradcam,gradcam++")).explain(x, TargetSpec(topk=3))
    gradcam = [e for e in result.explanations if e.method == "gradcam" and e.rank == 2][0]
    assert gradcam.targets.tolist() == targets.tolist()
    expected, flat = gradcam_by_definition(name, x, targets)
    assert gradcam.flat.tolist() == flat.tolist()
    assert not flat.all(), "the test needs at least one map with variation"
    torch.testing.assert_close(gradcam.maps, expected, atol=2e-4, rtol=1e-3)
    for explanation in result.explanations:
        assert torch.isfinite(explanation.maps).all()
        assert explanation.maps.shape == expected.shape
    assert all(p.grad is None for p in model.parameters())


def test_guided_backprop_through_relu6_is_finite_and_not_empty() -> None:
    model = loaded("mobilenet_v2").model
    info = resolve_layer(model, "auto", loaded("mobilenet_v2").input, CPU)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    result = Explainer(model, info, parse_methods("guided-backprop,guided-gradcam")).explain(x, TargetSpec())
    for explanation in result.explanations:
        assert explanation.maps.shape == (2, 3, SIZE, SIZE)
        assert torch.isfinite(explanation.maps).all() and not explanation.flat.any()


class RaisesOnCall(nn.Module):
    """conv -> ReLU -> GAP -> linear that raises on its `fail_at`-th forward: inside
    Score-CAM's masked forwards, or guided backprop's own forward."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)
        self.calls = 0
        self.fail_at = fail_at

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError(f"boom in forward {self.calls}")
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize(("methods", "fail_at"), [("scorecam", 3), ("gradcam,saliency", 2)])
def test_hooks_and_flags_restored_when_a_method_forward_raises(methods: str, fail_at: int) -> None:
    torch.manual_seed(0)
    model = RaisesOnCall(fail_at=0)
    info = resolve_layer(model, "relu", InputSpec(8, IMAGENET_MEAN, IMAGENET_STD), CPU)
    explainer = Explainer(model, info, parse_methods(methods), chunk_size=2)
    model.train()
    model.fc.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.calls, model.fail_at = 0, fail_at
    with pytest.raises(RuntimeError, match=f"boom in forward {fail_at}"):
        explainer.explain(torch.randn(2, 3, 8, 8), TargetSpec())
    # Score-CAM's extra forwards run on the engine's inference copy (camcli.fused), which counts its own calls
    copy = explainer._inference_model
    ran = copy.net.calls if copy is not None else model.calls
    assert ran == fail_at, "the failure happened in a method's extra forward, not the first"
    hooked = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]
    assert hooked == []
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert model.training and all(p.grad is None for p in model.parameters())
    model.fail_at = 0
    result = explainer.explain(torch.randn(2, 3, 8, 8), TargetSpec())
    assert all(torch.isfinite(e.maps).all() for e in result.explanations)
