"""Finer-CAM, --contrast, --smooth, the shared guided forward, ROAD and `camcli sanity`:
against pytorch-grad-cam on the same model, layer, input and target, and by hand."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from camcli.engine import Contrast, Explainer, TargetSpec, parse_contrast
from camcli.errors import UsageError
from camcli.methods import parse_methods
from camcli.metrics import noisy_linear_imputation, road_scores
from camcli.models import load_model, resolve_layer
from camcli.sanity import blocks, run_sanity, spearman, ssim

pytest.importorskip("pytorch_grad_cam")

from pytorch_grad_cam import FinerCAM, GradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

CPU = torch.device("cpu")


def pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64)))[0, 1])


def up(maps: torch.Tensor, size: int) -> np.ndarray:
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    loaded = load_model("resnet18", "none", input_size=96)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    return loaded, x, resolve_layer(loaded.model, "layer3", loaded.input, CPU)


def reference(cls, model, layer: str, x, **kwargs) -> np.ndarray:
    model = copy.deepcopy(model)
    with cls(model, [dict(model.named_modules())[layer]]) as cam:
        return cam(x.clone(), **kwargs)


def test_finercam_matches_pytorch_grad_cam(resnet) -> None:
    loaded, x, info = resnet
    result = Explainer(loaded.model, info, parse_methods("finercam,gradcam")).explain(x, TargetSpec())
    finer, grad = result.explanations
    ref = reference(FinerCAM, loaded.model, "layer3", x)
    for i in range(2):
        assert pearson(up(finer.maps, 96)[i], ref[i]) >= 0.99
    assert min(pearson(finer.maps[i], grad.maps[i]) for i in range(2)) < 0.99  # it is not Grad-CAM


@pytest.mark.parametrize("smooth", ["aug", "eigen"])
def test_smoothing_matches_pytorch_grad_cam(resnet, smooth: str) -> None:
    loaded, x, info = resnet
    result = Explainer(loaded.model, info, parse_methods("gradcam"), smooth=smooth).explain(x, TargetSpec())
    (e,) = result.explanations
    plain = Explainer(loaded.model, info, parse_methods("gradcam")).explain(x, TargetSpec()).explanations[0]
    targets = [ClassifierOutputTarget(int(t)) for t in e.targets]
    ref = reference(GradCAM, loaded.model, "layer3", x, targets=targets, **{f"{smooth}_smooth": True})
    for i in range(2):
        assert pearson(up(e.maps, 96)[i], ref[i]) >= 0.99
    assert not torch.allclose(e.maps, plain.maps, atol=1e-3)  # smoothing changed something


def test_guided_shares_the_cam_forward(resnet) -> None:
    loaded, x, info = resnet
    calls = []
    handle = loaded.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        both = Explainer(loaded.model, info, parse_methods("gradcam,guided-gradcam")).explain(x, TargetSpec(topk=2))
    finally:
        handle.remove()
    assert len(calls) == 1
    alone = {
        (e.method, e.rank): e.maps
        for m in ("gradcam", "guided-backprop")
        for e in Explainer(loaded.model, info, parse_methods(m)).explain(x, TargetSpec(topk=2)).explanations
    }
    for e in both.explanations:
        if (e.method, e.rank) in alone:
            torch.testing.assert_close(e.maps, alone[e.method, e.rank], atol=1e-6, rtol=1e-4)


def test_contrast_and_smooth_refuse_what_they_do_not_define(resnet) -> None:
    loaded, _, info = resnet
    for methods, kwargs in (
        ("guided-backprop", {"contrast": Contrast()}),
        ("scorecam", {"contrast": Contrast()}),
        ("finercam", {"contrast": Contrast()}),
        ("eigencam", {"smooth": "eigen"}),
        ("saliency", {"smooth": "aug"}),
    ):
        with pytest.raises(UsageError):
            Explainer(loaded.model, info, parse_methods(methods), **kwargs)
    assert parse_contrast("second", None, 10) == Contrast(None)
    assert parse_contrast("3", None, 10) == Contrast(3)
    with pytest.raises(UsageError):
        Explainer(loaded.model, info, parse_methods("gradcam"), contrast=Contrast(5)).explain(
            torch.randn(1, 3, 96, 96), TargetSpec(index=5)
        )


def test_contrast_second_is_the_logit_difference(resnet) -> None:
    """--contrast second = Grad-CAM of y_top1 - y_top2, computed by hand with autograd."""
    loaded, x, info = resnet
    (e,) = (
        Explainer(loaded.model, info, parse_methods("gradcam"), contrast=Contrast())
        .explain(x, TargetSpec())
        .explanations
    )
    model = copy.deepcopy(loaded.model).eval()
    store = {}
    dict(model.named_modules())["layer3"].register_forward_hook(lambda _m, _i, o: store.setdefault("a", o))
    logits = model(x)
    top2 = logits.topk(2).indices
    assert e.contrasts.tolist() == top2[:, 1].tolist()
    score = (logits.gather(1, top2[:, :1]) - logits.gather(1, top2[:, 1:])).sum()
    (g,) = torch.autograd.grad(score, store["a"])
    cam = (g.mean((2, 3), keepdim=True) * store["a"]).sum(1).relu().detach()
    for i in range(2):
        assert pearson(e.maps[i], cam[i]) >= 0.999


def _composite(loaded) -> torch.Tensor:
    import cv2

    from camcli.io import decode_image
    from camcli.run.stages import preprocess

    samples = Path(__file__).resolve().parent.parent / "samples"
    halves = [
        cv2.resize(decode_image(samples / name), (224, 224), interpolation=cv2.INTER_AREA)
        for name in ("skimage_chelsea.png", "skimage_coffee.png")
    ]
    return preprocess(np.ascontiguousarray(np.concatenate(halves, 1)), loaded.input)[None]


def test_each_class_map_sits_on_its_own_half_of_a_composite() -> None:
    """The cat (left) and the espresso cup (right) side by side, default pretrained model:
    each class's map, contrasted with the other class, has >= 90 % of its mass on its half."""
    loaded = load_model("efficientnet_lite0", None)
    x = _composite(loaded)
    info = resolve_layer(loaded.model, "auto", loaded.input, CPU)
    cat, cup = 285, 967  # Egyptian cat, espresso
    assert loaded.label(cat) == "Egyptian cat" and loaded.label(cup) == "espresso"
    for target, other, side in ((cat, cup, 0), (cup, cat, 1)):
        contrasted = Explainer(loaded.model, info, parse_methods("cam,gradcam"), contrast=Contrast(other))
        finer = Explainer(loaded.model, info, parse_methods("finercam"))
        for e in (
            contrasted.explain(x, TargetSpec(index=target)).explanations
            + finer.explain(x, TargetSpec(index=target)).explanations
        ):
            heat = e.maps[0]
            half = heat.shape[1] // 2
            share = float((heat[:, half:] if side else heat[:, :half]).sum() / heat.sum())
            assert share >= 0.9, (e.method, loaded.label(target), share)


def test_road_imputation_and_scores_match_pytorch_grad_cam() -> None:
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    removed = torch.rand(2, 32, 32, generator=g) > 0.4
    ours = noisy_linear_imputation(x, removed, noise=0.0)
    ref = torch.stack([NoisyLinearImputer(noise=0.0)(x[i], (~removed[i]).float()) for i in range(2)])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[~removed[:, None].expand_as(x)], x[~removed[:, None].expand_as(x)])
    torch.manual_seed(0)
    model = load_model("resnet18", "none", input_size=32).model.eval()
    cam = torch.rand(2, 32, 32, generator=g)  # no ties: percentile and rank thresholds agree
    with torch.no_grad():
        targets = model(x).argmax(1)
    percentiles = (20, 50, 80)
    morf, lerf = road_scores(model, x, cam, torch.arange(2), targets, percentiles=percentiles, noise=0.0)
    wanted = [ClassifierOutputSoftmaxTarget(int(c)) for c in targets]
    for ours_curve, remove in ((morf, RemoveMostRelevantFirst), (lerf, RemoveLeastRelevantFirst)):
        expected = np.mean(
            [
                PerturbationConfidenceMetric(remove(p, NoisyLinearImputer(noise=0.0)))(
                    x, cam.numpy(), wanted, model, return_diff=False
                )
                for p in percentiles
            ],
            axis=0,
        )
        np.testing.assert_allclose(ours_curve.numpy(), expected, rtol=2e-3, atol=1e-5)


def test_spearman_and_ssim_by_hand() -> None:
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 11, 11, generator=g).clamp(min=0.5)  # many ties, as a relu'd map
    b = torch.rand(3, 11, 11, generator=g)
    for i in range(3):
        assert float(spearman(a[i : i + 1], b[i : i + 1])) == pytest.approx(spearmanr(a[i].ravel(), b[i].ravel())[0])
    assert torch.allclose(ssim(a, a), torch.ones(3))
    # one 11 x 11 window: SSIM by its definition with the normalised Gaussian weights
    coords = np.arange(11) - 5
    w = np.exp(-(coords**2) / (2 * 1.5**2))
    w = np.outer(w, w) / np.outer(w, w).sum()
    x, y = a[0].double().numpy(), b[0].double().numpy()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy, cxy = (w * x * x).sum() - mx**2, (w * y * y).sum() - my**2, (w * x * y).sum() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert float(ssim(a[:1], b[:1])) == pytest.approx(expected, rel=1e-5)


def test_sanity_runs_on_a_copy_and_randomisation_changes_maps() -> None:
    torch.manual_seed(0)
    loaded = load_model("resnet18", "none", input_size=48)
    model = loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    info = resolve_layer(model, "auto", loaded.input, CPU)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    result = run_sanity(model, [info], parse_methods("gradcam,eigencam"), x, ["a", "b"], batch_size=2)
    assert result.steps[0] == "none" and result.steps[1] == "fc" and result.steps[-1] == "conv1"
    assert len(result.steps) == 1 + len(blocks(model)) == 1 + 1 + 2 + 8  # conv1, bn1, layer1.0..layer4.1, fc
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert [id(p) for p in model.parameters()] == params
    curve = result.mean_curve("gradcam")
    assert curve[0] == 1.0 and curve[-1] < 0.9
    assert result.mean_curve("eigencam")[1] == pytest.approx(1.0)  # the head does not feed Eigen-CAM
    assert np.mean(result.logit_spearman["eigencam"]) == pytest.approx(1.0)  # class-agnostic: fails, as it must
    assert all(r != t for r, t in zip(result.random_classes, result.targets, strict=True))


def test_sanity_cli_writes_table_json_and_plot(tmp_path: Path, samples_dir: Path) -> None:
    out = tmp_path / "out"
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    (bad / "cat.png").write_bytes((samples_dir / "skimage_chelsea.png").read_bytes())
    command = [sys.executable, "-m", "camcli", "sanity", str(bad), "-m", "gradcam,saliency", "--model", "resnet18"]
    command += ["--weights", "none", "--input-size", "48", "-o", str(out), "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr  # one image failed, the other was tested
    assert "broken.png" in done.stderr
    assert "gradcam" in done.stdout and "saliency" in done.stdout
    data = json.loads((out / "sanity.json").read_text())
    assert data["images"] == ["cat.png"] and set(data["methods"]) == {"gradcam", "saliency"}
    assert len(data["methods"]["gradcam"]["spearman"]) == len(data["steps"])
    import cv2

    picture = cv2.imread(str(out / "sanity.png"))
    assert picture is not None and picture.shape[1] > 1000
