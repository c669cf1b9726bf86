"""Each method against its definition, on tiny networks whose maps are computed by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camcli.engine import Explainer, TargetSpec, parse_target
from camcli.errors import MethodNotApplicable, UsageError
from camcli.methods import get_method, list_methods, parse_methods
from camcli.models import InputSpec, resolve_layer

SPEC = InputSpec(size=2, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
TOP1 = TargetSpec()


class Tiny(nn.Module):
    """x -> 1x1 conv (channel k copies input channel k) -> activation -> GAP -> linear."""

    def __init__(self, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 2, kernel_size=1, bias=False)
        self.act = activation if activation is not None else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).view(2, 3, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(self.features(x))).flatten(1))


def batch() -> torch.Tensor:
    """Sample 0: top-1 is class 0; sample 1: top-1 is class 1 (per-sample targets)."""
    x = torch.zeros(2, 3, 2, 2)
    x[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x[0, 1] = torch.tensor([[0.4, 0.3], [0.2, 0.1]])
    x[1, 0] = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    x[1, 1] = torch.tensor([[0.0, 0.0], [0.0, 8.0]])
    return x


def explain(model: nn.Module, methods: str, target: TargetSpec = TOP1, layer: str = "features"):
    info = resolve_layer(model, layer, SPEC, torch.device("cpu"))
    return Explainer(model, info, parse_methods(methods)).explain(batch(), target)


def maps_of(result, method: str, rank: int = 0) -> torch.Tensor:
    return next(e for e in result.explanations if e.method == method and e.rank == rank).maps


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_cam_and_gradcam_by_hand_with_per_sample_targets(method: str) -> None:
    result = explain(Tiny(), method)
    assert result.logits.argmax(1).tolist() == [0, 1]
    explanation = result.explanations[0]
    assert explanation.targets.tolist() == [0, 1]  # each sample its own target
    expected = torch.tensor(
        [
            [[0.0, 1 / 3], [2 / 3, 1.0]],  # relu(A_0) for class 0, min-max normalised
            [[0.0, 0.0], [0.0, 1.0]],  # relu(A_1) for class 1
        ]
    )
    torch.testing.assert_close(maps_of(result, method), expected)


def test_fixed_target_and_negative_weights_by_hand() -> None:
    # class 2 = A_0 - A_1; sample 0: [[0.6, 1.7], [2.8, 3.9]] -> normalised (x - 0.6) / 3.3
    result = explain(Tiny(), "cam,gradcam", TargetSpec(index=2))
    expected0 = (torch.tensor([[0.6, 1.7], [2.8, 3.9]]) - 0.6) / 3.3
    # sample 1: relu([[0, 1], [0, -8]]) = [[0, 1], [0, 0]]
    expected1 = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    for method in ("cam", "gradcam"):
        torch.testing.assert_close(maps_of(result, method), torch.stack([expected0, expected1]))


def test_gradcam_plus_plus_matches_eq19_by_hand() -> None:
    x = batch()
    result = explain(Tiny(), "gradcam++")
    w = Tiny().fc.weight.detach()
    for b, c in enumerate([0, 1]):
        acts = x[b, :2]  # A_k = input channel k
        weights = []
        for k in range(2):
            g = float(w[c, k]) / 4  # d y_c / d A_k,ij = W[c, k] / (h w), constant
            if g == 0:
                weights.append(0.0)
                continue
            alpha = g**2 / (2 * g**2 + float(acts[k].sum()) * g**3 + 1e-7)
            weights.append(4 * alpha * max(g, 0.0))
        cam = torch.relu(sum(wk * acts[k] for k, wk in enumerate(weights)))
        expected = (cam - cam.min()) / (cam.max() - cam.min())
        torch.testing.assert_close(maps_of(result, "gradcam++")[b], expected)


def test_scorecam_matches_its_definition() -> None:
    model = Tiny(nn.ReLU())
    x = batch()
    result = explain(model, "scorecam", layer="act")
    for b in range(2):
        acts = torch.relu(x[b, :2])
        target = int(model(x[b : b + 1]).argmax())
        cam = torch.zeros(2, 2)
        for k in range(2):
            a = acts[k]
            if a.max() == a.min():
                continue  # a constant channel has no mask: weight 0
            mask = (a - a.min()) / (a.max() - a.min())
            prob = F.softmax(model(x[b : b + 1] * mask), dim=1)[0, target]
            cam += prob * a
        cam = torch.relu(cam)
        expected = (cam - cam.min()) / (cam.max() - cam.min())
        torch.testing.assert_close(maps_of(result, "scorecam")[b], expected.detach())


class TinyRectified(nn.Module):
    """A conv with mixed-sign weights, a rectifier, GAP and a linear head with mixed signs."""

    def __init__(self, activation: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        self.activation = activation
        self.relu = {"relu": nn.ReLU(), "relu_inplace": nn.ReLU(inplace=True), "relu6": nn.ReLU6()}.get(activation)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, -1.0, 0.5], [-0.5, 1.0, 1.0]]).view(2, 3, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = F.relu(h) if self.relu is None else self.relu(h)
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("activation", ["relu", "relu_inplace", "relu6", "functional"])
def test_guided_backprop_passes_only_positive_gradients(activation: str) -> None:
    torch.manual_seed(0)
    model = TinyRectified(activation)
    x = torch.randn(2, 3, 3, 3) * 4  # some pre-activations exceed 6 for ReLU6
    info = resolve_layer(model, "conv", SPEC, torch.device("cpu"))
    result = Explainer(model, info, parse_methods("guided-backprop")).explain(x, TargetSpec(index=0))
    pre = model.conv(x).detach()
    hi = 6.0 if activation == "relu6" else float("inf")
    grad_h = model.fc.weight[0].detach().view(1, 2, 1, 1) / 9  # d y_0 / d h (GAP over 3x3)
    gated = grad_h.clamp(min=0) * ((pre > 0) & (pre < hi))  # guided rule at the rectifier
    expected = torch.einsum("bkhw,kc->bchw", gated, model.conv.weight.detach().view(2, 3))
    torch.testing.assert_close(maps_of(result, "guided-backprop"), expected)
    # the plain gradient would differ: channel 1's negative weight is blocked
    assert not torch.allclose(expected, torch.zeros_like(expected))


def test_guided_backprop_refuses_non_rectifier_activations() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    info = resolve_layer(model, "0", SPEC, torch.device("cpu"))
    with pytest.raises(MethodNotApplicable, match="SiLU"):
        Explainer(model, info, parse_methods("guided-backprop"))


def test_guided_backprop_refuses_functional_gelu() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.gelu(self.conv(x)).mean((2, 3)))

    model = Functional()
    info = resolve_layer(model, "conv", SPEC, torch.device("cpu"))
    with pytest.raises(MethodNotApplicable, match="gelu"):
        Explainer(model, info, parse_methods("guided-backprop")).explain(batch(), TargetSpec())


def test_cam_refuses_models_without_gap_linear_head() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(16, 2))
    info = resolve_layer(model, "0", SPEC, torch.device("cpu"))
    assert info.head is None
    with pytest.raises(MethodNotApplicable, match="gradcam"):
        Explainer(model, info, parse_methods("cam"))


def test_topk_explains_each_rank_with_its_own_class() -> None:
    result = explain(Tiny(), "gradcam", TargetSpec(topk=2))
    ranked = result.logits.topk(2).indices
    for rank in range(2):
        explanation = next(e for e in result.explanations if e.rank == rank)
        assert explanation.targets.tolist() == ranked[:, rank].tolist()


def test_flat_map_is_zeros_with_a_flag_never_nan() -> None:
    # class 1 on sample 0 is fine, but with all-negative contributions the map is flat
    model = Tiny()
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[-1.0, -1.0], [0.0, 1.0], [1.0, -1.0]]))
    result = explain(model, "gradcam,cam", TargetSpec(index=0))
    for explanation in result.explanations:
        assert explanation.flat.tolist() == [True, True]
        assert torch.equal(explanation.maps, torch.zeros_like(explanation.maps))


def test_registry() -> None:
    names = list_methods()
    anchors = ["cam", "gradcam", "gradcam++", "scorecam", "guided-backprop", "guided-gradcam"]
    more = ["layercam", "xgradcam", "hirescam", "eigencam", "saliency", "smoothgrad", "deconvnet"]
    assert names[: len(anchors)] == anchors and set(more) | {"occlusion", "activations"} <= set(names)
    every = [m.name for m in parse_methods("all")]
    assert every == [name for name in names if get_method(name).in_all]
    assert set(anchors + more) <= set(every) and not {"occlusion", "activations", "center"} & set(every)
    assert [m.name for m in parse_methods("all,center")] == [*every, "center"]
    assert [m.name for m in parse_methods("gradcam, cam,gradcam")] == ["gradcam", "cam"]
    for name in names:
        method = get_method(name)
        assert method.paper and method.url.startswith("https://")
    with pytest.raises(UsageError, match="gradcam"):
        get_method("gradcan")


def test_parse_target() -> None:
    names = ["tabby", "tiger cat", "crane", "Crane", "crane"]
    assert parse_target(None, None, names, 5) == TargetSpec()
    assert parse_target("3", None, names, 5) == TargetSpec(index=3)
    assert parse_target("tiger cat", None, names, 5) == TargetSpec(index=1)
    assert parse_target("TABBY", None, names, 5) == TargetSpec(index=0)
    assert parse_target(None, 3, names, 5) == TargetSpec(topk=3)
    for bad, match in [("5", "out of range"), ("crane", "ambiguous"), ("tiger", "candidates: tiger cat")]:
        with pytest.raises(UsageError, match=match):
            parse_target(bad, None, names, 5)
    with pytest.raises(UsageError, match="exclude"):
        parse_target("1", 2, names, 5)
