"""Metrics on constructed cases whose answers are known by hand, and against
independent references (TorchRay's pointing game, pytorch-grad-cam's confidence change)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camcli.boxes import load_boxes
from camcli.engine import Explanation, TargetSpec
from camcli.errors import UsageError
from camcli.io import InputItem
from camcli.methods.center import centered_gaussian
from camcli.metrics import (
    MetricOptions,
    area_under_curve,
    blur,
    box_masks,
    box_tensor,
    confidence_change,
    energy_in_box,
    evaluate_batch,
    perturbation_curves,
    pointing_game,
    resize_to_images,
    saliency,
    substrate,
)


class QuadrantNet(nn.Module):
    """Two classes; logit 0 = gain * mean of the top-left quadrant, logit 1 = 0."""

    def __init__(self, gain: float = 4.0) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(gain))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        score = self.gain * x[:, :, : h // 2, : w // 2].mean(dim=(1, 2, 3))
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def quadrant_map(size: int, order: dict[str, float]) -> torch.Tensor:
    """(1, size, size) map with one constant value per quadrant (tl, tr, bl, br)."""
    half = size // 2
    m = torch.zeros(1, size, size)
    m[:, :half, :half], m[:, :half, half:] = order["tl"], order["tr"]
    m[:, half:, :half], m[:, half:, half:] = order["bl"], order["br"]
    return m


def top_left_image(size: int = 16) -> torch.Tensor:
    x = torch.zeros(1, 3, size, size)
    x[:, :, : size // 2, : size // 2] = 1.0
    return x


# -- deletion and insertion ------------------------------------------------------------


def test_deletion_drops_exactly_when_the_quadrant_is_removed() -> None:
    x = top_left_image()
    # removal order br, tr, tl, bl: with 4 steps the top-left quadrant goes at step 3
    maps = quadrant_map(16, {"br": 1.0, "tr": 0.75, "tl": 0.5, "bl": 0.25})
    one = torch.zeros(1, dtype=torch.long)
    deletion, insertion = perturbation_curves(QuadrantNet(), x, maps, one * 0, one * 0, MetricOptions(steps=4))
    high, chance = sigmoid(4.0), 0.5
    assert deletion[0].tolist() == pytest.approx([high, high, high, chance, chance], abs=1e-6)
    # insertion starts from the blurred copy; the quadrant is back from step 3 on
    blurred = QuadrantNet()(blur(x)).softmax(1)[0, 0].item()
    assert insertion[0].tolist() == pytest.approx([blurred, blurred, blurred, high, high], abs=1e-6)
    # trapezoid over x in [0, 1]: (h/2 + h + h + c + c/2) / 4
    auc = area_under_curve(deletion)
    assert auc.item() == pytest.approx((high / 2 + 2 * high + chance + chance / 2) / 4, abs=1e-6)


def test_deletion_counts_pixels_per_step_and_breaks_ties_in_row_major_order() -> None:
    # 20 steps of an 8 x 8 input: step k removes floor(64 k / 20) pixels; a constant map
    # removes rows top to bottom, so the top-left quadrant (rows 0-3, columns 0-3) is
    # gone once 28 pixels are (k = 9: 28 pixels) and partly gone before.
    x = top_left_image(8)
    maps = torch.ones(1, 8, 8)
    deletion, _ = perturbation_curves(
        QuadrantNet(),
        x,
        maps,
        torch.zeros(1, dtype=torch.long),
        torch.zeros(1, dtype=torch.long),
        MetricOptions(steps=20),
    )
    expected = []
    for k in range(21):
        removed = (64 * k) // 20
        keep = torch.ones(64, dtype=torch.bool)
        keep[:removed] = False
        left = (x[0, 0].flatten() * keep).view(8, 8)
        expected.append(sigmoid(4.0 * left[:4, :4].mean().item()))
    assert deletion[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert deletion[0, 9].item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kind", "after"),
    [
        ("zero", 0.0),  # the top-left quadrant becomes 0
        ("mean", 0.25),  # the image's own mean: a quarter of the pixels are 1
    ],
)
def test_substrates_by_hand(kind: str, after: float) -> None:
    x = top_left_image()
    maps = quadrant_map(16, {"tl": 1.0, "tr": 0.0, "bl": 0.0, "br": 0.0})
    zero = torch.zeros(1, dtype=torch.long)
    deletion, _ = perturbation_curves(QuadrantNet(), x, maps, zero, zero, MetricOptions(steps=4, substrate=kind))
    assert deletion[0, 1].item() == pytest.approx(sigmoid(4.0 * after), abs=1e-6)


def test_substrate_values() -> None:
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(substrate(x, "zero"), torch.zeros_like(x))
    assert torch.allclose(substrate(x, "mean"), x.mean(dim=(2, 3), keepdim=True).expand_as(x))
    # RISE's blur at 224 px: sigma 5 in an 11-px kernel; a constant image stays constant
    kernel = torch.exp(-0.5 * (torch.arange(11.0) - 5) ** 2 / 25)
    kernel = kernel / kernel.sum()
    padded = F.pad(x, (5, 5, 5, 5), mode="reflect")
    by_hand = F.conv2d(padded.flatten(0, 1)[:, None], (kernel[:, None] * kernel[None, :])[None, None])
    assert torch.allclose(substrate(x, "blur"), by_hand.view_as(x), atol=1e-5)
    constant = torch.full((1, 3, 64, 64), 0.3)
    assert torch.allclose(blur(constant), constant)
    with pytest.raises(UsageError, match="substrate"):
        MetricOptions(substrate="noise")


# -- average drop and increase in confidence --------------------------------------------


def test_average_drop_and_increase_by_hand() -> None:
    x = top_left_image()
    half = torch.full((2, 16, 16), 0.5)
    sample, targets = torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    drop, increase = confidence_change(QuadrantNet(4.0), x, half, sample, targets)
    y, o = sigmoid(4.0), sigmoid(2.0)  # masked by 0.5: the quadrant's mean halves
    assert drop.tolist() == pytest.approx([(y - o) / y] * 2, abs=1e-6)
    assert increase.tolist() == [False, False]
    # a class that the quadrant argues against gains confidence when it is dimmed
    drop, increase = confidence_change(QuadrantNet(-4.0), x, half, sample, targets)
    assert drop.tolist() == [0.0, 0.0] and increase.tolist() == [True, True]


def test_confidence_change_matches_pytorch_grad_cam() -> None:
    metrics = pytest.importorskip("pytorch_grad_cam.metrics.cam_mult_image")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
    ).eval()
    x = torch.randn(4, 3, 24, 24)
    maps = torch.rand(4, 24, 24)
    targets = torch.tensor([0, 3, 1, 4])
    drop, increase = confidence_change(model, x, maps, torch.arange(4), targets)
    their_targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    their_drop = metrics.DropInConfidence()(x, maps.numpy(), their_targets, model)
    their_increase = metrics.IncreaseInConfidence()(x, maps.numpy(), their_targets, model)
    clean = model(x).softmax(1).gather(1, targets[:, None]).squeeze(1)
    # pytorch-grad-cam's drop is max(0, Y - O); Chattopadhyay et al. divide it by Y
    assert torch.allclose(drop * clean, torch.from_numpy(their_drop).float(), atol=1e-6)
    assert increase.float().tolist() == their_increase.tolist()


# -- localisation -----------------------------------------------------------------------


def test_box_indicator_map_has_all_energy_in_the_box_and_hits() -> None:
    sizes = torch.tensor([[30, 50], [40, 20]])  # (height, width)
    boxes, valid = box_tensor([[(10, 5, 29, 24)], [(0, 0, 4, 9), (15, 30, 19, 39)]], "cpu")
    masks = box_masks(boxes, valid, 40, 50)
    assert masks[0].sum() == 20 * 20 and masks[1].sum() == 5 * 10 + 5 * 10
    maps = masks.float()
    assert energy_in_box(maps, masks).tolist() == [1.0, 1.0]
    assert pointing_game(maps, boxes, valid).tolist() == [True, True]
    # the complement: no energy inside, and its maximum (first in row-major order) misses
    outside = (~masks).float() * (torch.arange(50) < sizes[:, 1, None])[:, None, :]
    outside = outside * (torch.arange(40) < sizes[:, 0, None])[:, :, None]
    assert energy_in_box(outside, masks).tolist() == [0.0, 0.0]
    assert pointing_game(outside, boxes, valid, tolerance=0.5).tolist() == [False, False]
    # a map with no mass is a miss with no energy
    assert pointing_game(torch.zeros(2, 40, 50), boxes, valid).tolist() == [False, False]
    assert energy_in_box(torch.zeros(2, 40, 50), masks).tolist() == [0.0, 0.0]


def point_map(height: int, width: int, x: int, y: int) -> torch.Tensor:
    m = torch.zeros(1, height, width)
    m[0, y, x] = 1.0
    return m


@pytest.mark.parametrize(
    ("x", "y", "hit"),
    [
        (60, 30, True),  # inside
        (49 + 14, 30, True),  # 14 px right of the box
        (49 + 15, 30, False),  # 15 px: the tolerance disk no longer reaches it (strict, as TorchRay)
        (20 - 14, 30, True),
        (20 - 15, 30, False),
        (49 + 9, 39 + 11, True),  # beyond the corner: sqrt(9^2 + 11^2) = 14.2
        (49 + 9, 39 + 12, False),  # sqrt(9^2 + 12^2) = 15
    ],
)
def test_pointing_game_15_px_tolerance_edge(x: int, y: int, hit: bool) -> None:
    boxes, valid = box_tensor([[(20, 10, 49, 39)]], "cpu")
    assert pointing_game(point_map(80, 100, x, y), boxes, valid).tolist() == [hit]


def test_pointing_game_matches_torchray() -> None:
    torchray = pytest.importorskip("torchray.benchmark.pointing_game")
    game = torchray.PointingGame(num_classes=1, tolerance=15)
    box = (20, 10, 49, 39)
    boxes, valid = box_tensor([[box]], "cpu")
    mask = box_masks(boxes, valid, 70, 90)[0]
    for y in range(0, 70, 3):
        for x in range(0, 90, 2):
            ours = pointing_game(point_map(70, 90, x, y), boxes, valid).item()
            assert ours == (game.evaluate(mask, (x, y)) == 1), (x, y)


def test_resize_to_images_matches_interpolate_per_image() -> None:
    torch.manual_seed(0)
    maps = torch.rand(3, 7, 9)
    sizes = torch.tensor([[30, 45], [7, 9], [5, 4]])  # up, identity, down
    resized = resize_to_images(maps, sizes)
    assert resized.shape == (3, 30, 45)
    for i, (h, w) in enumerate(sizes.tolist()):
        reference = F.interpolate(maps[i, None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        assert torch.allclose(resized[i, :h, :w], reference, atol=1e-5)
        assert resized[i, h:].abs().sum() == 0 and resized[i, :, w:].abs().sum() == 0


def test_saliency_of_gradients_is_max_abs_over_channels() -> None:
    g = torch.zeros(1, 3, 2, 2)
    g[0, 0, 0, 0], g[0, 1, 0, 0], g[0, 2, 1, 1] = 1.0, -4.0, 2.0
    assert saliency(g)[0].tolist() == [[1.0, 0.0], [0.0, 0.5]]
    assert torch.equal(saliency(torch.zeros(1, 3, 3)), torch.zeros(1, 3, 3))


# -- one batch, boxes at original resolution --------------------------------------------


def test_evaluate_batch_maps_boxes_through_the_resize() -> None:
    # two images of different sizes, both resized to the 16 x 16 input without crop; a
    # map of the top-left quadrant lands, in each image's own pixels, on its top-left box
    x = top_left_image().expand(2, 3, 16, 16).contiguous()
    maps = quadrant_map(8, {"tl": 1.0, "tr": 0.0, "bl": 0.0, "br": 0.0}).expand(2, 8, 8)
    explanation = Explanation("m", 0, None, torch.zeros(2, dtype=torch.long), maps, torch.zeros(2, dtype=torch.bool))
    sizes = [(100, 60), (40, 200)]
    boxes = [[(0, 0, 29, 49)], None]
    (metrics,) = evaluate_batch(QuadrantNet(), x, [explanation], sizes, boxes, MetricOptions(steps=4))
    assert metrics["pointing_game"][0].item() == 1.0 and math.isnan(metrics["pointing_game"][1].item())
    assert math.isnan(metrics["energy_in_box"][1].item())
    # bilinear upsampling spreads a little mass past the quadrant's edge (into 2 px of 100)
    assert 0.9 < metrics["energy_in_box"][0].item() < 1.0
    assert metrics["deletion_auc"].tolist() == pytest.approx([(sigmoid(4) / 2 + 3 * 0.5 + 0.25) / 4] * 2)


# -- centre baseline, targets, boxes files ----------------------------------------------


def test_centered_gaussian() -> None:
    g = centered_gaussian(8, 12)
    # pixel centres at i + 0.5, sigma = 1/4 of each side (2 and 3 px here)
    for i in range(8):
        for j in range(12):
            expected = math.exp(-0.5 * (((i + 0.5 - 4) / 2) ** 2 + ((j + 0.5 - 6) / 3) ** 2))
            assert g[i, j].item() == pytest.approx(expected, rel=1e-6)


def test_per_sample_targets() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    assert TargetSpec(per_sample=(None, 2)).resolve(logits)[0].tolist() == [1, 2]
    assert TargetSpec(index=0, per_sample=(1, None)).resolve(logits)[0].tolist() == [1, 0]


def test_boxes_files_in_both_layouts(tmp_path, samples_dir) -> None:
    mapping = tmp_path / "boxes.json"
    mapping.write_text(
        json.dumps({"a/cat.png": [[1, 2, 3, 4], [5, 6, 7, 8, 281], {"bbox": [0, 0, 9, 9], "class": 3}], "dog.jpg": []})
    )
    index = load_boxes(mapping)
    found = index.lookup(InputItem(tmp_path / "a" / "cat.png", "a/cat.png"))
    assert found is not None and found.target == 281  # first classed box; unclassed boxes count too
    assert found.boxes == ((1, 2, 3, 4), (5, 6, 7, 8))
    by_name = index.lookup(InputItem(tmp_path / "x" / "cat.png", "x/cat.png"))
    assert by_name == found
    assert index.lookup(InputItem(tmp_path / "other.png", "other.png")) is None
    labels = load_boxes(samples_dir / "labels.json")
    cat = labels.lookup(InputItem(samples_dir / "skimage_chelsea.png", "skimage_chelsea.png"))
    assert cat is not None and cat.target == 282 and cat.boxes == ((0, 0, 395, 299),)
    for bad in ['{"a.png": [[1, 2, 3]]}', '{"a.png": [[4, 2, 3, 5]]}', "[1]", "not json"]:
        mapping.write_text(bad)
        with pytest.raises(UsageError, match="boxes"):
            load_boxes(mapping)


@pytest.mark.parametrize("baseline", ["zero", "blur"])
def test_deletion_insertion_and_average_drop_match_torchcam(baseline: str) -> None:
    """torchcam 0.5.0 uses one baseline for both curves (ours: insertion always starts
    from the blur), counts ceil(P / steps) pixels per step (equal to ours where steps
    divides P) and integrates over the fraction removed, as here."""
    torchcam_metrics = pytest.importorskip("torchcam.metrics")
    from functools import partial

    from torchcam.methods import GradCAM as TorchcamGradCAM

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    x = torch.randn(3, 3, 20, 20)  # 400 pixels, 20 steps of 20
    softmax = partial(torch.softmax, dim=-1)
    torchcam_baseline = None if baseline == "zero" else blur
    with TorchcamGradCAM(model, target_layer="3") as extractor:
        scores = softmax(model(x))  # as inside torchcam's update: the CAM of the probability
        targets = scores.argmax(1)
        cam = extractor.fuse_cams(extractor(targets.tolist(), scores)).detach()
        curves = torchcam_metrics.DeletionInsertionMetric(extractor, softmax, steps=20, baseline=torchcam_baseline)
        curves.update(x)
        confidence = torchcam_metrics.ClassificationMetric(extractor, softmax)
        confidence.update(x)
    maps = F.interpolate(cam[:, None], size=(20, 20), mode="bilinear", align_corners=False)[:, 0]
    sample = torch.arange(3)
    options = MetricOptions(steps=20, substrate=baseline)
    # torchcam multiplies by its [0, 1] CAM upsampled (whose maximum falls between samples): as given
    deletion, insertion = perturbation_curves(model, x, maps, sample, targets, options)
    theirs = curves.summary()
    assert area_under_curve(deletion).mean().item() == pytest.approx(theirs["deletion_auc"], abs=1e-6)
    if baseline == "blur":
        assert area_under_curve(insertion).mean().item() == pytest.approx(theirs["insertion_auc"], abs=1e-6)
    drop, increase = confidence_change(model, x, maps, sample, targets)
    assert drop.mean().item() == pytest.approx(confidence.summary()["avg_drop"], abs=1e-6)
    assert increase.float().mean().item() == pytest.approx(confidence.summary()["conf_increase"], abs=1e-9)


def test_center_method_through_the_engine() -> None:
    """`center` ignores the model: the min-max normalised Gaussian at the input's size,
    the same for every sample, next to a real method in the same pass."""
    from camcli.engine import Explainer
    from camcli.methods import parse_methods
    from camcli.models import InputSpec, resolve_layer

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    layer = resolve_layer(model, "0", InputSpec(16, (0.0,) * 3, (1.0,) * 3), torch.device("cpu"))
    result = Explainer(model, layer, parse_methods("gradcam,center")).explain(torch.randn(2, 3, 12, 12), TargetSpec())
    center = next(e for e in result.explanations if e.method == "center")
    g = centered_gaussian(12, 12)
    expected = (g - g.min()) / (g.max() - g.min())
    assert center.maps.shape == (2, 12, 12)
    assert torch.allclose(center.maps, expected.expand(2, 12, 12), atol=1e-6)
    assert center.flat.tolist() == [False, False]
