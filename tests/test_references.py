"""camcli's maps against independent implementations (pytorch-grad-cam, captum).

Every test uses a seeded random-weight torchvision model and small seeded random
inputs. A random ResNet predicts the same class for every noise image (its pooled
features share one large common direction m), so `decorrelate_head` projects m out
of the head's weights and zeroes its bias: logits = W (I - m m^T / |m|^2) f. The two
samples of a batch then predict different classes (asserted where it matters), which
is what makes "each sample is explained for its own target" testable, and their top
classes keep maps with positive mass (no flat maps). The model is still a GAP +
linear network, so CAM and everything else apply as before.

References may modify the model they are given (pytorch-grad-cam swaps ReLU modules
and leaves gradients behind, captum registers hooks), so each one gets a deep copy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camcli.engine import BatchResult, Explainer, Explanation, TargetSpec, memory_format
from camcli.methods import parse_methods
from camcli.models import LayerInfo, load_model, resolve_layer

pytest.importorskip("pytorch_grad_cam")

from pytorch_grad_cam import (  # noqa: E402
    GradCAM,
    GradCAMPlusPlus,
    GuidedBackpropReLUModel,
    ScoreCAM,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

CPU = torch.device("cpu")
# Score-CAM is compared on its own, at 64 px: 2 x 512 extra forwards at 96 px take seconds.
FAST_METHODS = "cam,gradcam,gradcam++,guided-backprop,guided-gradcam"

#: Measured correlations, printed at the end of the run (pytest -s / -rA) for the report.
PEARSONS: dict[str, list[float]] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_pearsons() -> Iterator[None]:
    yield
    for key, values in PEARSONS.items():
        print(f"\n[pearson] {key}: " + ", ".join(f"{v:.8f}" for v in values), end="")


def pearson(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    assert x.shape == y.shape
    assert x.std() > 0 and y.std() > 0, "a constant map has no correlation to compare"
    return float(np.corrcoef(x, y)[0, 1])


def record(key: str, value: float) -> float:
    PEARSONS.setdefault(key, []).append(value)
    return value


def upsample(maps: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """(B, h, w) CAM maps to the input size, as the CLI renders them."""
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def seeded_input(batch: int, size: int, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


def decorrelate_head(model: nn.Module, head: nn.Linear, inputs: Tensor, scale: float = 1.0) -> None:
    """Project the mean pooled feature of `inputs` out of the head's weights (times
    `scale`); zero bias."""
    features: list[Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: features.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        handle.remove()
    mean = features[0].mean(0)
    with torch.no_grad():
        head.weight.sub_(torch.outer(head.weight @ mean, mean) / mean.dot(mean))
        head.weight.mul_(scale)
        head.bias.zero_()


@dataclass
class Setup:
    model: nn.Module
    info: LayerInfo
    x: Tensor
    top2: Tensor  # (B, 2) each sample's two best classes, from a plain forward (not camcli)


def make_resnet18(size: int, layer: str = "auto", scale: float = 1.0) -> Setup:
    torch.manual_seed(0)
    loaded = load_model("resnet18", "none", input_size=size)
    x = seeded_input(2, size)
    decorrelate_head(loaded.model, loaded.model.fc, x, scale)
    info = resolve_layer(loaded.model, layer, loaded.input, CPU)
    with torch.no_grad():
        top2 = loaded.model(x).topk(2, dim=1).indices
    assert top2[0, 0] != top2[1, 0], "the two samples must predict different classes"
    return Setup(loaded.model, info, x, top2)


@pytest.fixture(scope="module")
def resnet96() -> Setup:
    """Head scaled x300: the channel contributions sum(A) * dy/dA reach ~70, so Grad-CAM++'s
    alpha = 1 / (2 + sum(A) g) is far from a constant 1/2. With the random head as it
    is, Grad-CAM++ equals mean(relu(g))-weighted Grad-CAM (Pearson 1.000), and a wrong
    alpha would pass the comparison; at x300 that simplification has Pearson 0.90-0.97."""
    return make_resnet18(96, scale=300.0)


@pytest.fixture(scope="module")
def resnet96_result(resnet96: Setup) -> BatchResult:
    """Every method but Score-CAM, top-1 and top-2 of each sample, in one call."""
    explainer = Explainer(resnet96.model, resnet96.info, parse_methods(FAST_METHODS), chunk_size=64)
    return explainer.explain(resnet96.x, TargetSpec(topk=2))


def pick(result: BatchResult, method: str, rank: int = 0) -> Explanation:
    found = [e for e in result.explanations if e.method == method and e.rank == rank]
    assert len(found) == 1, (method, rank, [(e.method, e.rank) for e in result.explanations])
    return found[0]


def test_fixture_gives_each_sample_its_own_top1(resnet96: Setup, resnet96_result: BatchResult) -> None:
    assert resnet96.info.name == "layer4"
    top = resnet96.top2
    torch.testing.assert_close(resnet96_result.logits.topk(2, dim=1).indices, top)
    for method in FAST_METHODS.split(","):
        for rank in (0, 1):
            explanation = pick(resnet96_result, method, rank)
            assert explanation.targets.tolist() == top[:, rank].tolist()
            assert not explanation.flat.any()


# --- 1, 2: Grad-CAM and Grad-CAM++ vs pytorch-grad-cam ------------------------------------------

REFERENCE_CAMS: dict[str, type] = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}


def reference_cam(cls: type, model: nn.Module, layer: str, x: Tensor, targets: list[Any]) -> np.ndarray:
    model = copy.deepcopy(model)
    target_layer = dict(model.named_modules())[layer]
    with cls(model, target_layers=[target_layer]) as cam:
        return cam(input_tensor=x.clone(), targets=targets)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
@pytest.mark.parametrize("rank", [0, 1])
def test_gradient_cams_match_pytorch_grad_cam(
    resnet96: Setup, resnet96_result: BatchResult, method: str, rank: int
) -> None:
    explanation = pick(resnet96_result, method, rank)
    targets = resnet96.top2[:, rank].tolist()
    assert explanation.targets.tolist() == targets
    assert explanation.maps.shape == (2, 3, 3)
    ours = upsample(explanation.maps, resnet96.x.shape[-2:])
    reference = reference_cam(
        REFERENCE_CAMS[method], resnet96.model, "layer4", resnet96.x, [ClassifierOutputTarget(c) for c in targets]
    )
    assert reference.shape == (2, 96, 96)
    for i in range(2):
        assert record(f"{method} rank {rank} vs pytorch-grad-cam", pearson(ours[i], reference[i])) >= 0.99


def test_gradcam_with_mixed_targets_uses_each_samples_own(resnet96: Setup) -> None:
    """Sample 0 explained for its top-1, sample 1 for its top-2: checked by swapping targets.

    With the reference explaining each sample for the OTHER sample's class, the maps
    must be measurably less alike than with the right class: otherwise this test could
    not tell a per-sample target from a batch-wide one.
    """
    explainer = Explainer(resnet96.model, resnet96.info, parse_methods("gradcam"), chunk_size=64)
    result = explainer.explain(resnet96.x, TargetSpec(topk=2))
    rank0, rank1 = pick(result, "gradcam", 0), pick(result, "gradcam", 1)
    mixed = [int(resnet96.top2[0, 0]), int(resnet96.top2[1, 1])]
    assert mixed[0] != mixed[1]
    assert [int(rank0.targets[0]), int(rank1.targets[1])] == mixed
    ours = upsample(torch.stack([rank0.maps[0], rank1.maps[1]]), resnet96.x.shape[-2:])
    right = reference_cam(GradCAM, resnet96.model, "layer4", resnet96.x, [ClassifierOutputTarget(c) for c in mixed])
    wrong = reference_cam(
        GradCAM, resnet96.model, "layer4", resnet96.x, [ClassifierOutputTarget(c) for c in mixed[::-1]]
    )
    for i in range(2):
        good = record("gradcam mixed targets vs pytorch-grad-cam", pearson(ours[i], right[i]))
        bad = record("gradcam vs pytorch-grad-cam with the other sample's class", pearson(ours[i], wrong[i]))
        assert good >= 0.99
        assert good - bad > 1e-3


def test_fixed_index_target_applies_to_every_sample(resnet96: Setup) -> None:
    explainer = Explainer(resnet96.model, resnet96.info, parse_methods("gradcam"), chunk_size=64)
    result = explainer.explain(resnet96.x, TargetSpec(index=7))
    explanation = pick(result, "gradcam")
    assert explanation.targets.tolist() == [7, 7]
    ours = upsample(explanation.maps, resnet96.x.shape[-2:])
    reference = reference_cam(GradCAM, resnet96.model, "layer4", resnet96.x, [ClassifierOutputTarget(7)] * 2)
    for i in range(2):
        assert record("gradcam class 7 vs pytorch-grad-cam", pearson(ours[i], reference[i])) >= 0.99


# --- 3: CAM equals Grad-CAM on a GAP + linear network -------------------------------------------


@pytest.mark.parametrize("rank", [0, 1])
def test_cam_equals_gradcam_on_resnet(resnet96_result: BatchResult, rank: int) -> None:
    cam, gradcam = pick(resnet96_result, "cam", rank), pick(resnet96_result, "gradcam", rank)
    assert not cam.flat.any()
    assert cam.maps.shape == gradcam.maps.shape
    torch.testing.assert_close(cam.maps, gradcam.maps, atol=1e-5, rtol=0)


# --- 4: Score-CAM vs pytorch-grad-cam -----------------------------------------------------------


def log_probability(c: int) -> Callable[[Tensor], Tensor]:
    """pytorch-grad-cam softmaxes these over channels: weights = p_k / sum_k p_k."""
    return lambda output: output.log_softmax(-1)[c]


def check_scorecam(size: int, layer: str, threshold: float) -> None:
    setup = make_resnet18(size, layer)
    explainer = Explainer(setup.model, setup.info, parse_methods("scorecam"), chunk_size=128)
    explanation = pick(explainer.explain(setup.x, TargetSpec()), "scorecam")
    targets = setup.top2[:, 0].tolist()
    assert explanation.targets.tolist() == targets
    ours = upsample(explanation.maps, setup.x.shape[-2:])
    model = copy.deepcopy(setup.model)
    with ScoreCAM(model, target_layers=[dict(model.named_modules())[layer]]) as cam:
        cam.batch_size = 128
        reference = cam(input_tensor=setup.x.clone(), targets=[log_probability(c) for c in targets])
    for i in range(2):
        value = record(f"scorecam {layer} @ {size}px vs pytorch-grad-cam", pearson(ours[i], reference[i]))
        assert value >= threshold


def test_scorecam_matches_pytorch_grad_cam_layer3() -> None:
    check_scorecam(64, "layer3", 0.999)


@pytest.mark.slow
def test_scorecam_matches_pytorch_grad_cam_layer4() -> None:
    check_scorecam(64, "layer4", 0.999)


# --- 5: guided backprop vs pytorch-grad-cam and captum ------------------------------------------


def test_guided_backprop_matches_pytorch_grad_cam(resnet96: Setup, resnet96_result: BatchResult) -> None:
    assert all(type(m) is not nn.SiLU for m in resnet96.model.modules())
    for rank in (0, 1):
        explanation = pick(resnet96_result, "guided-backprop", rank)
        assert explanation.maps.shape == (2, 3, 96, 96)
        assert explanation.targets.tolist() == resnet96.top2[:, rank].tolist()
        for i in range(2):
            model = copy.deepcopy(resnet96.model)
            reference = GuidedBackpropReLUModel(model, device="cpu")(
                resnet96.x[i : i + 1].clone(), target_category=int(resnet96.top2[i, rank])
            )
            assert reference.shape == (96, 96, 3)
            ours = explanation.maps[i].permute(1, 2, 0)
            assert record("guided-backprop vs pytorch-grad-cam", pearson(ours, reference)) >= 0.99


def test_guided_backprop_matches_captum(resnet96: Setup, resnet96_result: BatchResult) -> None:
    captum_attr = pytest.importorskip("captum.attr")
    for rank in (0, 1):
        explanation = pick(resnet96_result, "guided-backprop", rank)
        model = copy.deepcopy(resnet96.model)
        target = resnet96.top2[:, rank]
        reference = captum_attr.GuidedBackprop(model).attribute(resnet96.x.clone(), target=target)
        assert reference.shape == explanation.maps.shape
        for i in range(2):
            value = pearson(explanation.maps[i], reference[i].detach())
            assert record("guided-backprop vs captum", value) >= 0.99


def test_guided_backprop_leaves_model_usable(resnet96: Setup, resnet96_result: BatchResult) -> None:
    """After the guided pass, the plain forward is unchanged (no patched ReLU left)."""
    # in the engine's memory format, which it borrows for the call only (layouts differ in the last digits)
    with torch.no_grad(), memory_format(resnet96.model, torch.channels_last):
        logits = resnet96.model(resnet96.x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(logits, resnet96_result.logits)


# --- 6: guided Grad-CAM is guided backprop times upsampled Grad-CAM ----------------------------


@pytest.mark.parametrize("rank", [0, 1])
def test_guided_gradcam_is_product(resnet96: Setup, resnet96_result: BatchResult, rank: int) -> None:
    guided = pick(resnet96_result, "guided-backprop", rank).maps
    gradcam = upsample(pick(resnet96_result, "gradcam", rank).maps, resnet96.x.shape[-2:])
    combined = pick(resnet96_result, "guided-gradcam", rank).maps
    assert combined.shape == guided.shape
    assert combined.abs().amax() > 0
    torch.testing.assert_close(combined, guided * gradcam[:, None], atol=1e-7, rtol=1e-5)


# --- 7: DenseNet's captured tensor is the one that is pooled ------------------------------------


def test_densenet_cam_equals_gradcam() -> None:
    torch.manual_seed(0)
    loaded = load_model("densenet121", "none", input_size=64)
    model = loaded.model
    x = seeded_input(2, 64)
    decorrelate_head(model, model.classifier, x)
    info = resolve_layer(model, "auto", loaded.input, CPU)
    assert info.name == "features" and info.as_consumed and info.head == "classifier"
    explainer = Explainer(model, info, parse_methods("cam,gradcam"), chunk_size=64)
    result = explainer.explain(x, TargetSpec())
    cam, gradcam = pick(result, "cam"), pick(result, "gradcam")
    assert cam.targets[0] != cam.targets[1]
    assert not cam.flat.any() and not gradcam.flat.any()
    torch.testing.assert_close(cam.maps, gradcam.maps, atol=1e-4, rtol=0)
    # The pre-ReLU tensor gives a different Grad-CAM: the test can tell them apart.
    features = model.features(x)
    weights = model.classifier.weight[cam.targets]
    pre_relu = (weights[:, :, None, None] * features).sum(1).relu().detach()
    lo = pre_relu.flatten(1).amin(1)[:, None, None]
    hi = pre_relu.flatten(1).amax(1)[:, None, None]
    assert not torch.allclose((pre_relu - lo) / (hi - lo), cam.maps, atol=1e-2)
