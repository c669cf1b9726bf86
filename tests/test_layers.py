"""Automatic target-layer location, named layers, the model x method table, and the
engine's promise to put every hook and flag back when a forward raises."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camcli.engine import Explainer, TargetSpec, capture
from camcli.errors import MethodNotApplicable, UsageError
from camcli.methods import parse_methods
from camcli.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    POOLING_MODULES,
    InputSpec,
    LayerInfo,
    LoadedModel,
    load_model,
    resolve_layer,
)

CPU = torch.device("cpu")
SIZE = 64

MODELS = [
    "efficientnet_lite0",
    "resnet18",
    "vgg11",
    "densenet121",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "convnext_tiny",
]
METHODS = ["cam", "gradcam", "gradcam++", "scorecam", "guided-backprop", "guided-gradcam"]
CAM_FAMILY = {"cam", "gradcam", "gradcam++", "scorecam"}

AUTO_LAYER = {
    "efficientnet_lite0": "_head_act",
    "resnet18": "layer4",
    "vgg11": "features",
    "densenet121": "features",
    "mobilenet_v3_small": "features",
    "efficientnet_b0": "features",
    "convnext_tiny": "features",
}

# Which cells refuse (MethodNotApplicable); every other cell must run.
NO_LINEAR_HEAD = {"vgg11", "mobilenet_v3_small", "convnext_tiny"}  # MLP / Linear+Hardswish / LayerNorm
NOT_RECTIFIER = {"mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"}  # Hardswish / SiLU / GELU
REFUSES: dict[str, set[str]] = {
    "cam": NO_LINEAR_HEAD,
    "gradcam": set(),
    "gradcam++": set(),
    "scorecam": set(),
    "guided-backprop": NOT_RECTIFIER,
    "guided-gradcam": NOT_RECTIFIER,
}
# Score-CAM runs one forward per channel (512 to 1280 here). On a 2-core CPU these two
# cells take about 5 s each, so they are marked slow; the others take 0.3 to 3.5 s.
SLOW_SCORECAM = {"vgg11", "convnext_tiny"}


@functools.cache
def loaded(name: str) -> LoadedModel:
    """The pretrained Lite0 (offline) or a seeded random-weight torchvision model, 64 px."""
    torch.manual_seed(0)
    if name == "efficientnet_lite0":
        return load_model(name, input_size=SIZE)
    return load_model(name, "none", input_size=SIZE)


@functools.cache
def auto_layer(name: str) -> LayerInfo:
    model = loaded(name)
    return resolve_layer(model.model, "auto", model.input, CPU)


def seeded_input(batch: int, size: int = SIZE, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


# --- 1: automatic layer -------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_auto_layer(name: str) -> None:
    model = loaded(name).model
    info = auto_layer(name)
    assert info.name == AUTO_LAYER[name]
    assert not isinstance(dict(model.named_modules())[info.name], POOLING_MODULES)
    assert info.as_consumed == (name == "densenet121")
    assert info.num_classes == 1000
    assert info.spatial == (2, 2)  # 64 px / stride 32
    assert (info.head is None) == (name in NO_LINEAR_HEAD)


def test_auto_layer_on_full_size_lite0() -> None:
    """The real default: pretrained Lite0 at its own 224 px."""
    lite0 = load_model("efficientnet_lite0")
    info = resolve_layer(lite0.model, "auto", lite0.input, CPU)
    assert lite0.input.size == 224
    assert (info.name, info.channels, info.spatial, info.head) == ("_head_act", 1280, (7, 7), "_fc")


# --- 2: the captured tensor is the one the head pools -------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_gap_of_captured_activation_gives_logits(name: str) -> None:
    model = loaded(name).model
    info = auto_layer(name)
    assert info.head is not None
    head = dict(model.named_modules())[info.head]
    assert isinstance(head, nn.Linear)
    module = dict(model.named_modules())[info.name]
    x = seeded_input(2)
    with torch.no_grad(), capture(module, info.as_consumed, track_grad=False) as store:
        logits = model(x)
    activation = store["activation"]
    assert activation.shape == (2, info.channels, *info.spatial)
    predicted = F.linear(activation.mean((2, 3)), head.weight, head.bias)
    torch.testing.assert_close(predicted, logits, atol=1e-4, rtol=1e-4)


def test_densenet_output_as_produced_is_not_what_is_pooled() -> None:
    """Why `as_consumed` exists: DenseNet's features are ReLU'd in place before pooling."""
    model = loaded("densenet121").model
    info = auto_layer("densenet121")
    head = dict(model.named_modules())[info.head or ""]
    with torch.no_grad(), capture(model.features, False, track_grad=False) as store:
        logits = model(seeded_input(2))
    raw = store["activation"]
    assert (raw < 0).any()
    predicted = F.linear(raw.mean((2, 3)), head.weight, head.bias)
    assert not torch.allclose(predicted, logits, atol=1e-3)
    predicted = F.linear(raw.relu().mean((2, 3)), head.weight, head.bias)
    torch.testing.assert_close(predicted, logits, atol=1e-4, rtol=1e-4)


# --- 3: named layers ----------------------------------------------------------------------------


def test_named_layer() -> None:
    resnet = loaded("resnet18")
    info = resolve_layer(resnet.model, "layer3", resnet.input, CPU)
    assert (info.name, info.channels, info.spatial, info.as_consumed) == ("layer3", 256, (4, 4), False)
    assert info.head is None  # layer4 lies between layer3 and the pooled head
    nested = resolve_layer(resnet.model, "layer4.1.conv2", resnet.input, CPU)
    assert (nested.channels, nested.spatial) == (512, (2, 2))


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "efficientnet_lite0",
        "densenet121",  # the auto layer named explicitly is still read as pooled
    ],
)
def test_naming_the_auto_layer_resolves_the_same(name: str) -> None:
    model = loaded(name)
    info = auto_layer(name)
    assert resolve_layer(model.model, info.name, model.input, CPU) == info


@pytest.mark.parametrize("typo", ["layer5", "layr4"])
def test_layer_typo_suggests_close_matches(typo: str) -> None:
    resnet = loaded("resnet18")
    with pytest.raises(UsageError) as raised:
        resolve_layer(resnet.model, typo, resnet.input, CPU)
    message = str(raised.value)
    assert repr(typo) in message
    assert "layer4" in message


def test_named_layer_that_is_not_a_feature_map() -> None:
    resnet = loaded("resnet18")
    with pytest.raises(UsageError, match="is no spatial map"):
        resolve_layer(resnet.model, "fc", resnet.input, CPU)


def test_a_model_that_cannot_run_the_input_size_is_refused_in_one_line(tmp_path, samples_dir) -> None:
    """torchvision's MaxViT partitions 7x7 windows: at --input-size 100 its traced forward fails,
    and the user gets one line with the model's own reason and exit 2, not a traceback."""
    from typer.testing import CliRunner

    from camcli.cli import app

    args = ["explain", str(samples_dir / "skimage_coffee.png"), "--model", "maxvit_t", "--weights", "none"]
    result = CliRunner().invoke(app, [*args, "--input-size", "100", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "cannot run a 3x100x100 input (RuntimeError: shape" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_torchvision_vit_takes_another_size_as_torchvision_resamples_it(tmp_path, samples_dir) -> None:
    """camcli resizes the built ViT in place; the reference is torchvision's own route: a ViT
    built at the new size holding `interpolate_embeddings` of the same weights."""
    from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings
    from typer.testing import CliRunner

    from camcli.cli import app
    from camcli.models.sources.torchvision import TorchvisionSource

    torch.manual_seed(0)
    shape = {"patch_size": 8, "num_layers": 1, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32, "num_classes": 5}
    model = VisionTransformer(image_size=32, **shape).eval()
    reference = VisionTransformer(image_size=48, **shape).eval()
    reference.load_state_dict(interpolate_embeddings(48, 8, model.state_dict()))
    note = TorchvisionSource().adapt_input_size(model, 32, 48)
    assert note is not None and "token grid 4x4 -> 6x6" in note
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    assert TorchvisionSource().adapt_input_size(torchvision_resnet(), 224, 96) is None  # a CNN takes any size

    args = ["explain", str(samples_dir / "skimage_coffee.png"), "--model", "vit_b_16", "--weights", "none"]
    result = CliRunner().invoke(app, [*args, "--input-size", "96", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "vit_b_16 was built for 224 px, resized to 96 px: token grid 14x14 -> 6x6" in result.output


def torchvision_resnet() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18()


# --- 4: the model x method table ----------------------------------------------------------------


def table_cells() -> list[object]:
    cells: list[object] = []
    for name in MODELS:
        for method in METHODS:
            marks = [pytest.mark.slow] if method == "scorecam" and name in SLOW_SCORECAM else []
            cells.append(pytest.param(name, method, marks=marks, id=f"{name}-{method}"))
    return cells


def test_expected_table_keeps_fast_scorecam_cells() -> None:
    assert "resnet18" not in SLOW_SCORECAM and "efficientnet_lite0" not in SLOW_SCORECAM
    refusals = {(m, n) for m, names in REFUSES.items() for n in names}
    assert len(refusals) == 9 and len(MODELS) * len(METHODS) - len(refusals) == 33


@pytest.mark.parametrize(("name", "method"), table_cells())
def test_model_method_table(name: str, method: str) -> None:
    model = loaded(name).model
    info = auto_layer(name)
    x = seeded_input(1)
    if name in REFUSES[method]:
        with pytest.raises(MethodNotApplicable):
            Explainer(model, info, parse_methods(method), chunk_size=64).explain(x, TargetSpec())
        return
    result = Explainer(model, info, parse_methods(method), chunk_size=64).explain(x, TargetSpec())
    assert result.logits.shape == (1, 1000)
    assert [(e.method, e.rank) for e in result.explanations] == [(method, 0)]
    explanation = result.explanations[0]
    assert explanation.targets.tolist() == result.logits.argmax(1).tolist()
    maps = explanation.maps
    assert torch.isfinite(maps).all()
    if method in CAM_FAMILY:
        assert maps.shape == (1, *info.spatial)
        assert explanation.layer == info.name
        assert maps.min() >= 0 and maps.max() <= 1
        if not explanation.flat.any():
            assert maps.max() == 1
    else:
        assert maps.shape == (1, 3, SIZE, SIZE)
        assert explanation.layer == (info.name if method == "guided-gradcam" else None)
    assert explanation.flat.shape == (1,)


# --- 5: hooks and flags are restored when a forward raises --------------------------------------


class Exploding(nn.Module):
    """conv -> BN -> ReLU -> (raise) -> GAP -> linear; `explode` arms the raise."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 5)
        self.explode = False

    def forward(self, x: Tensor) -> Tensor:
        a = self.relu(self.bn(self.conv(x)))
        if self.explode:
            raise RuntimeError("boom after the target layer")
        return self.fc(a.mean((2, 3)))


def hooks_left(model: nn.Module) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
    ]


@pytest.mark.parametrize(
    "methods", ["cam,gradcam,gradcam++,scorecam,guided-backprop,guided-gradcam", "gradcam", "guided-backprop"]
)
def test_state_restored_after_forward_raises(methods: str) -> None:
    torch.manual_seed(0)
    model = Exploding()
    spec = InputSpec(8, IMAGENET_MEAN, IMAGENET_STD)
    info = resolve_layer(model, "conv", spec, CPU)
    assert info.head is None  # BN and ReLU lie between conv and the pooling
    info = resolve_layer(model, "relu", spec, CPU)
    assert info.head == "fc"
    explainer = Explainer(model, info, parse_methods(methods), chunk_size=4)

    model.train()
    model.bn.eval()  # mixed modes must come back as they were
    model.conv.weight.requires_grad_(False)
    model.fc.bias.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    assert set(flags.values()) == {True, False} and set(modes.values()) == {True, False}
    assert hooks_left(model) == []

    model.explode = True
    with pytest.raises(RuntimeError, match="boom"):
        explainer.explain(torch.randn(2, 3, 8, 8), TargetSpec())

    assert hooks_left(model) == []
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    # No rectifier override survives either: ReLU's backward is the ordinary one again.
    x = torch.tensor([-1.0, 2.0], requires_grad=True)
    (grad,) = torch.autograd.grad((F.relu(x) * -1.0).sum(), x)
    assert grad.tolist() == [0.0, -1.0]

    model.explode = False  # and the explainer still works afterwards
    model.eval()
    result = explainer.explain(torch.randn(2, 3, 8, 8), TargetSpec())
    assert all(torch.isfinite(e.maps).all() for e in result.explanations)
    assert hooks_left(model) == []
