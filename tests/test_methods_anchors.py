"""The methods the anchors offer, against the anchors on the same model, layer, input and
target (Pearson >= 0.99 after the same post-processing): captum 0.9 (integrated
gradients, input x gradient, GradientSHAP), pytorch-grad-cam 1.5.7 (Ablation-CAM,
Eigen-Grad-CAM, FullGrad, KPCA-CAM), torchcam 0.5.0 (SS-CAM, IS-CAM, Smooth Grad-CAM++),
and RISE from its definition. Randomised methods get the same draws on both sides: the
reference is handed camcli's noise (or fractions) instead of drawing its own.

The model is the seeded random ResNet-18 of test_methods_more, whose two inputs predict
different classes, so every comparison also checks that each sample is explained for its
own target. References may modify the model they are given, so each gets a deep copy.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_layers import MODELS, auto_layer, loaded
from test_methods_more import CPU, TOP1, decorrelated_resnet, minmax, pearson, pick
from torch import Tensor, nn

from camcli.engine import BatchResult, Explainer, TargetSpec
from camcli.methods import get_method, parse_methods
from camcli.methods.rise import make_masks, mask_draws
from camcli.models import IMAGENET_MEAN, IMAGENET_STD, InputSpec, resolve_layer

SPEC = InputSpec(64, IMAGENET_MEAN, IMAGENET_STD)  # for the black baseline in normalised units

#: Measured correlations, printed at the end of the run (pytest -s) for the report.
PEARSONS: dict[str, list[float]] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_pearsons() -> Iterator[None]:
    yield
    for key, values in PEARSONS.items():
        print(f"\n[pearson] {key}: " + ", ".join(f"{v:.6f}" for v in values), end="")


def close(key: str, mine: Tensor, reference: Tensor | np.ndarray) -> None:
    """Each sample's map correlates >= 0.99 with the reference's."""
    for i in range(len(mine)):
        value = pearson(mine[i], np.asarray(reference[i]))
        PEARSONS.setdefault(key, []).append(value)
        assert value >= 0.99, (key, i, value)


@functools.cache
def resnet(size: int) -> tuple[nn.Module, Tensor, Tensor]:
    model, x = decorrelated_resnet(size)
    with torch.no_grad():
        top1 = model(x).argmax(1)
    assert top1[0] != top1[1]
    return model, x, top1


def run(model: nn.Module, x: Tensor, methods: str, layer: str = "layer3", **settings) -> BatchResult:
    info = resolve_layer(model, layer, InputSpec(x.shape[-1], (0.0,) * 3, (1.0,) * 3), CPU)
    return Explainer(model, info, parse_methods(methods, settings, SPEC), chunk_size=4096).explain(x, TOP1)


def positive_map(attributions: Tensor) -> Tensor:
    """captum's (B, 3, H, W) attributions as camcli draws them: summed over colours, relu, min-max."""
    return torch.stack([minmax(a) for a in attributions.detach().sum(1).relu()])


# --- captum ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", ["black", pytest.param("mean", marks=pytest.mark.slow), "blur"])
def test_integrated_gradients_match_captum(baseline: str) -> None:
    captum_attr = pytest.importorskip("captum.attr")
    model, x, top1 = resnet(32)
    method = get_method("integrated-gradients", {"steps": 8, "baseline": baseline}, SPEC)
    explanation = pick(run(model, x, "integrated-gradients", steps=8, baseline=baseline), "integrated-gradients")
    assert explanation.targets.tolist() == top1.tolist()
    base, _, _ = method._path(x)
    ig = captum_attr.IntegratedGradients(copy.deepcopy(model))
    attributions, delta = ig.attribute(
        x.clone(), baselines=base, target=top1, n_steps=8, method="gausslegendre", return_convergence_delta=True
    )
    close(f"integrated-gradients/{baseline}", explanation.maps, positive_map(attributions))
    details = explanation.details
    assert details is not None
    torch.testing.assert_close(details["attribution_sum"], attributions.sum((1, 2, 3)).detach(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(details["completeness_error"], delta.abs().detach(), rtol=1e-2, atol=1e-3)


def test_integrated_gradients_completeness_improves_with_steps() -> None:
    model, x, _ = resnet(32)
    errors = [
        pick(run(model, x, "integrated-gradients", steps=steps), "integrated-gradients").details["completeness_error"]
        for steps in (2, 16)
    ]
    assert (errors[1] < errors[0]).all(), errors


def test_input_x_gradient_matches_captum() -> None:
    captum_attr = pytest.importorskip("captum.attr")
    model, x, top1 = resnet(32)
    explanation = pick(run(model, x, "input-x-gradient"), "input-x-gradient")
    reference = captum_attr.InputXGradient(copy.deepcopy(model)).attribute(x.clone().requires_grad_(), target=top1)
    close("input-x-gradient", explanation.maps, positive_map(reference))


def test_gradient_shap_matches_captum_with_the_same_draws(monkeypatch) -> None:
    """captum's GradientShap is NoiseTunnel(InputBaselineXGradient): given camcli's noisy
    inputs and fractions (captum draws them with np.random.uniform), it must agree."""
    pytest.importorskip("captum.attr")
    from captum.attr._core.gradient_shap import InputBaselineXGradient

    model, x, top1 = resnet(32)
    settings = {"samples": 3, "noise": 0.1, "baseline": "mean"}
    explanation = pick(run(model, x, "gradient-shap", **settings), "gradient-shap")
    noisy, alphas, base = get_method("gradient-shap", settings, SPEC).draws(x)
    flat_alphas = alphas.flatten().double().numpy()
    monkeypatch.setattr(np.random, "uniform", lambda low, high, size: flat_alphas[:size])
    reference = InputBaselineXGradient(copy.deepcopy(model)).attribute(
        noisy.flatten(0, 1), baselines=base.repeat(3, 1, 1, 1), target=top1.repeat(3)
    )
    close("gradient-shap", explanation.maps, positive_map(reference.view(3, *x.shape).mean(0)))


# --- pytorch-grad-cam -----------------------------------------------------------------------------


def grad_cam_reference(cls_name: str, model: nn.Module, layer: str, x: Tensor, top1: Tensor, **kwargs) -> np.ndarray:
    grad_cam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    copied = copy.deepcopy(model)
    with getattr(grad_cam, cls_name)(copied, target_layers=[dict(copied.named_modules())[layer]], **kwargs) as cam:
        return cam(input_tensor=x.clone(), targets=[ClassifierOutputTarget(int(c)) for c in top1])


def upsample(maps: Tensor, size: torch.Size) -> Tensor:
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def test_ablationcam_matches_pytorch_grad_cam() -> None:
    model, x, top1 = resnet(32)  # layer2: 128 channels of 4 x 4, so 2 x 128 ablated forwards per side
    explanation = pick(run(model, x, "ablationcam", "layer2"), "ablationcam")
    assert explanation.targets.tolist() == top1.tolist()
    reference = grad_cam_reference("AblationCAM", model, "layer2", x, top1, batch_size=64)
    close("ablationcam/layer2", upsample(explanation.maps, x.shape[-2:]), reference)


def test_eigengradcam_matches_pytorch_grad_cam_up_to_the_sign() -> None:
    grad_cam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    model, x, top1 = resnet(32)
    explanation = pick(run(model, x, "eigengradcam,hirescam", "layer2"), "eigengradcam")
    hirescam = pick(run(model, x, "hirescam", "layer2"), "hirescam")
    # the same projection on the same gradient x activation, pytorch-grad-cam's sign left free
    copied = copy.deepcopy(model)
    with grad_cam.EigenGradCAM(copied, target_layers=[copied.layer2]) as cam:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cam(input_tensor=x.clone(), targets=[ClassifierOutputTarget(int(c)) for c in top1])
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
    projection = get_2d_projection(grads * acts)
    for i in range(2):
        sign = 1.0 if pearson(projection[i], (grads * acts)[i].sum(0)) >= 0 else -1.0
        reference = minmax(torch.from_numpy(sign * projection[i]).relu())
        close("eigengradcam/layer2", explanation.maps[i : i + 1], reference[None])
        assert pearson(explanation.maps[i], hirescam.maps[i]) > 0  # the sign follows the gradient x activation


def test_kpca_cam_matches_pytorch_grad_cam_up_to_the_sign() -> None:
    pytest.importorskip("sklearn")
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_kernel

    model, x, _ = resnet(32)
    explanation = pick(run(model, x, "kpca-cam", "layer2"), "kpca-cam")
    handle_store: list[Tensor] = []
    handle = model.layer2.register_forward_hook(lambda _m, _a, out: handle_store.append(out.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    acts = handle_store[0].numpy()
    projection = get_2d_projection_kernel(acts)  # scikit-learn's KernelPCA, sigmoid kernel
    for i in range(2):
        sign = 1.0 if pearson(projection[i], acts[i].sum(0)) >= 0 else -1.0
        reference = minmax(torch.from_numpy(sign * projection[i]).relu())
        close("kpca-cam/layer2", explanation.maps[i : i + 1], reference[None])


def test_fullgrad_matches_pytorch_grad_cam() -> None:
    model, x, top1 = resnet(32)
    explanation = pick(run(model, x, "fullgrad"), "fullgrad")
    assert explanation.targets.tolist() == top1.tolist() and explanation.maps.shape == (2, 32, 32)
    reference = grad_cam_reference("FullGrad", model, "layer4", x, top1)
    close("fullgrad", explanation.maps, reference)


def test_fullgrad_uses_every_batch_norm_and_biased_conv() -> None:
    model, _, _ = resnet(64)
    modules = get_method("fullgrad").output_modules(model)
    assert len(modules) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20


# --- torchcam --------------------------------------------------------------------------------------


class GivenNoise:
    """Stands in for torchcam's `torch.distributions.Normal` and hands out camcli's draws."""

    def __init__(self, draws: list[Tensor]) -> None:
        self.draws = list(draws)

    def sample(self, shape: torch.Size) -> Tensor:
        draw = self.draws.pop(0)
        assert draw.shape == shape, (draw.shape, shape)
        return draw


def torchcam_maps(cls_name: str, model: nn.Module, layer: str, x: Tensor, top1: Tensor, noise=None, **kwargs):
    methods = pytest.importorskip("torchcam.methods")
    copied = copy.deepcopy(model).eval()
    with getattr(methods, cls_name)(copied, target_layer=layer, input_shape=tuple(x.shape[1:]), **kwargs) as cam:
        if noise is not None:
            cam._distrib = GivenNoise(noise)
        out = copied(x.clone())
        (maps,) = cam(class_idx=top1.tolist(), scores=out)
    if noise is not None:
        assert not cam._distrib.draws, "torchcam used fewer draws than camcli made"
    return maps.detach()


def test_sscam_matches_torchcam_with_the_same_noise() -> None:
    model, x, top1 = resnet(32)  # layer2: 2 images x 128 channels per draw
    method = get_method("sscam", {"samples": 2, "std": 2.0})
    explanation = pick(run(model, x, "sscam", "layer2", samples=2, std=2.0), "sscam")
    draw = method.noise(CPU)
    noise = [draw((2 * 128, 1, 32, 32)).view(2, 128, 32, 32) for _ in range(2)]  # one chunk per draw, as ours
    reference = torchcam_maps("SSCAM", model, "layer2", x, top1, noise, num_samples=2, std=2.0, batch_size=4096)
    close("sscam/layer2", explanation.maps, reference)


def test_iscam_matches_torchcam() -> None:
    model, x, top1 = resnet(32)
    explanation = pick(run(model, x, "iscam", "layer2", samples=3), "iscam")
    reference = torchcam_maps("ISCAM", model, "layer2", x, top1, num_samples=3, batch_size=4096)
    close("iscam/layer2", explanation.maps, reference)


def test_smoothgradcampp_matches_torchcam_gradients_with_the_same_noise() -> None:
    """torchcam's `SmoothGradCAMpp` departs from the paper on purpose ("a personal correction":
    alpha's denominator sum_ab A_ab D3_ab instead of eq. 19's sum_ab A_ab * D3_ij, and the
    last copy's gradient instead of D_1), so it supplies the noisy copy's gradient and the
    clean activations (one copy: D_p = g^p), and the paper's formula makes the reference."""
    methods = pytest.importorskip("torchcam.methods")
    model, x, top1 = resnet(32)
    method = get_method("smoothgradcam++", {"samples": 1, "noise": 0.2})
    explanation = pick(run(model, x, "smoothgradcam++", "layer2", samples=1, noise=0.2), "smoothgradcam++")
    copied = copy.deepcopy(model).eval()
    with methods.SmoothGradCAMpp(copied, target_layer="layer2", num_samples=1, input_shape=(3, 32, 32)) as cam:
        cam._distrib = GivenNoise([method.noisy_inputs(x)[0] - x])
        out = copied(x.clone())
        clean = cam.hook_a[0].detach().clone()
        cam._get_weights(top1.tolist(), out)
        g = cam.hook_g[0].detach()
    alpha = g.pow(2) / (2 * g.pow(2) + clean.sum((2, 3), keepdim=True) * g.pow(3) + 1e-7)
    weights = (alpha * g.relu()).sum((2, 3))
    reference = torch.stack([minmax(m) for m in (weights[:, :, None, None] * clean).sum(1).relu()])
    close("smoothgradcam++/layer2", explanation.maps, reference)


def test_smoothgradcampp_averages_the_copies_derivatives() -> None:
    """With N copies: alpha from the mean of g^2 and g^3, weights from relu of the mean g."""
    model, x, top1 = resnet(32)
    method = get_method("smoothgradcam++", {"samples": 3, "noise": 0.2})
    explanation = pick(run(model, x, "smoothgradcam++", "layer2", samples=3, noise=0.2), "smoothgradcam++")
    store: list[Tensor] = []
    handle = model.layer2.register_forward_hook(lambda _m, _a, out: store.append(out))
    try:
        grads = []
        for noisy in method.noisy_inputs(x):
            store.clear()
            out = model(noisy.clone().requires_grad_())
            (g,) = torch.autograd.grad(out.gather(1, top1[:, None]).sum(), store[0])
            grads.append(g)
        store.clear()
        with torch.no_grad():
            model(x)
        acts = store[0]
    finally:
        handle.remove()
    d1, d2, d3 = (torch.stack([g.pow(p) for g in grads]).mean(0) for p in (1, 2, 3))
    alpha = d2 / (2 * d2 + acts.sum((2, 3), keepdim=True) * d3 + 1e-7)
    weights = (alpha * d1.relu()).sum((2, 3))
    expected = torch.stack([minmax(m) for m in (weights[:, :, None, None] * acts).sum(1).relu()])
    # float32 rounding of the cubed gradients differs between the engine's channels_last layout
    # and this contiguous hand computation: up to ~1e-3 on maps in [0, 1]
    torch.testing.assert_close(explanation.maps, expected, atol=2e-3, rtol=1e-2)


# --- RISE, from its definition --------------------------------------------------------------------


class LeftBright(nn.Module):
    """Two classes: logit_0 = 4 * mean of the left half of channel 0, logit_1 = 0."""

    def forward(self, x: Tensor) -> Tensor:
        left = x[:, 0, :, : x.shape[-1] // 2].mean((1, 2))
        return torch.stack([4 * left, torch.zeros_like(left)], 1)


def test_rise_is_its_definition() -> None:
    """S = 1/(N p) sum_i P_c(I * M_i) M_i, computed mask by mask in numpy."""
    model = LeftBright()
    x = torch.rand(2, 3, 12, 12) + 0.5
    settings = {"masks": 6, "cells": 3, "p": 0.5, "seed": 3}
    attributions = get_method("rise", settings).attribute(_model_context(model, x, chunk=5))
    grids, shifts = mask_draws(6, 3, 0.5, 3, CPU)
    masks = make_masks(grids, shifts, 12, 12).numpy()
    for b in range(2):
        expected = np.zeros((12, 12))
        for mask in masks:
            logits = 4 * (x[b, 0].numpy() * mask)[:, :6].mean()
            p0 = np.exp(logits) / (np.exp(logits) + 1.0)
            expected += p0 * mask
        np.testing.assert_allclose(attributions[0, b].numpy(), expected / (6 * 0.5), rtol=1e-5, atol=1e-6)


def test_rise_masks_by_hand() -> None:
    """A 2 x 2 grid [[1, 0], [0, 0]] on a 4 x 4 image: cells of 2 px upsampled to 6 x 6, shift 0:
    the bilinear ramp of a corner cell, cropped at the top left."""
    grids = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    mask = make_masks(grids, torch.zeros(1, 2), 4, 4)[0]
    # bilinear 2 -> 6, half-pixel centres: output i samples input (i + 0.5) / 3 - 0.5, clamped to
    # [0, 1]: -1/3, 0, 1/3, 2/3, 1, 4/3 -> cell 0's weight 1, 1, 2/3, 1/3, 0, 0; the crop keeps 4
    ramp = torch.tensor([1.0, 1.0, 2 / 3, 1 / 3])
    torch.testing.assert_close(mask, torch.outer(ramp, ramp))
    shifted = make_masks(grids, torch.tensor([[0.99, 0.0]]), 4, 4)[0]  # down by int(0.99 * 2) = 1 row
    torch.testing.assert_close(shifted[:3], mask[1:])


def test_rise_is_seeded_and_independent_of_the_chunk_size() -> None:
    model = LeftBright()
    x = torch.rand(2, 3, 12, 12)
    rise = get_method("rise", {"masks": 10, "cells": 3})
    a = rise.attribute(_model_context(model, x, chunk=3))
    b = rise.attribute(_model_context(model, x, chunk=64))
    torch.testing.assert_close(a, b)
    c = get_method("rise", {"masks": 10, "cells": 3, "seed": 1}).attribute(_model_context(model, x, chunk=64))
    assert not torch.allclose(a, c)
    masks = make_masks(*mask_draws(2000, 7, 0.5, 0, CPU), 16, 16)
    assert masks.min() >= 0 and masks.max() <= 1 + 1e-6 and abs(float(masks.mean()) - 0.5) < 0.02


def _model_context(model: nn.Module, x: Tensor, chunk: int):
    from camcli.methods import ModelContext

    with torch.no_grad():
        logits = model(x)
    return ModelContext(
        inputs=x, logits=logits, targets=torch.zeros(1, len(x), dtype=torch.long), forward=model, chunk_size=chunk
    )


# --- the model x method table -----------------------------------------------------------------------

CHEAP = {
    "input-x-gradient": {},
    "integrated-gradients": {"steps": 2},
    "gradient-shap": {"samples": 2},
    "eigengradcam": {},
    "kpca-cam": {},
    "fullgrad": {},
    "smoothgradcam++": {"samples": 1},
    "rise": {"masks": 4},
}
PIXEL_MAPS = {"input-x-gradient", "integrated-gradients", "gradient-shap", "fullgrad", "rise"}


@pytest.mark.parametrize("method", list(CHEAP))
@pytest.mark.parametrize(
    "name", [n if n in ("resnet18", "efficientnet_lite0") else pytest.param(n, marks=pytest.mark.slow) for n in MODELS]
)
def test_model_method_table_of_new_methods(name: str, method: str) -> None:
    """Every model of the table runs every new method (the ones costing K forwards per image,
    ablationcam, sscam and iscam, are checked on ResNet-18 above)."""
    model = loaded(name).model
    info = auto_layer(name)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    methods = parse_methods(method, CHEAP[method], SPEC)
    result = Explainer(model, info, methods, chunk_size=64).explain(x, TargetSpec())
    (explanation,) = result.explanations
    assert explanation.targets.tolist() == result.logits.argmax(1).tolist()
    assert torch.isfinite(explanation.maps).all()
    assert explanation.maps.shape == ((1, 64, 64) if method in PIXEL_MAPS else (1, *info.spatial))
    assert explanation.maps.min() >= 0 and explanation.maps.max() <= 1


# --- end to end -------------------------------------------------------------------------------------


def test_explain_anchor_methods_end_to_end(tmp_path, samples_dir, validate_record) -> None:
    """--set reaches each method, integrated-gradients' completeness is in the JSON, and the
    records keep the schema; a changed setting redoes the image, the same one skips it."""
    from typer.testing import CliRunner

    from camcli.cli import app

    args = ["explain", str(samples_dir / "skimage_coffee.png"), "--model", "resnet18", "--weights", "none"]
    args += ["--input-size", "32", "-o", str(tmp_path), "-m", "integrated-gradients,rise,kpca-cam"]
    args += ["--set", "integrated-gradients.steps=4", "--set", "rise.masks=8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    path = tmp_path / "skimage_coffee.png.json"
    record = json.loads(path.read_text())
    validate_record(record)
    assert record["request"]["method_options"] == {"integrated-gradients.steps": "4", "rise.masks": "8"}
    ig = record["explanations"][0]
    assert set(ig["details"]) == {"attribution_sum", "logit_difference", "completeness_error"}
    assert ig["details"]["completeness_error"] == pytest.approx(
        abs(ig["details"]["attribution_sum"] - ig["details"]["logit_difference"]), rel=1e-4, abs=1e-5
    )
    again = CliRunner().invoke(app, args)
    assert "1 already done" in again.output
    changed = CliRunner().invoke(app, [*args[:-1], "rise.masks=9"])
    assert "1 explained" in changed.output
