"""Occlusion, the paper's three views: class (tested against captum in test_methods_more),
feature (the strongest channel's total activation) and winner (a label map)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from tiny_models import Patterns
from typer.testing import CliRunner

from camcli.cli import app
from camcli.engine import Explainer, TargetSpec
from camcli.errors import UsageError
from camcli.io import decode_image
from camcli.methods import get_method
from camcli.methods.occlusion import patch_masks
from camcli.models import InputSpec, load_model, resolve_layer
from camcli.run.stages import preprocess

CPU = torch.device("cpu")
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


def _occlusion(model, layer: str, x: torch.Tensor, spec: InputSpec, **settings):
    info = resolve_layer(model, layer, spec, CPU)
    method = get_method("occlusion", settings)
    result = Explainer(model, info, [method], channels_last=False).explain(x, TargetSpec())
    return result.explanations[0]


def test_feature_occlusion_drops_on_the_strongest_channels_field() -> None:
    """One red plus on black: channel 0 of the pattern net is the strongest; covering any
    mark pixel lowers its total activation, covering anything else changes nothing."""
    x = torch.zeros(1, 3, 32, 32)
    marks = [(12, 20), (11, 20), (13, 20), (12, 19), (12, 21)]
    for y, xx in marks:
        x[0, 0, y, xx] = 0.8
    spec = InputSpec(32, (0.0,) * 3, (1.0,) * 3)
    explanation = _occlusion(Patterns(), "pool", x, spec, patch=6, stride=3, occlusion_target="feature")
    assert explanation.layer == "pool" and explanation.kind == "heatmap"
    heat = explanation.maps[0]
    masks = patch_masks(32, 32, 6, 3, CPU)
    touching = torch.stack([masks[:, y, xx] for y, xx in marks]).any(0)  # patches that cover a mark pixel
    support = masks[touching].any(0)
    assert (heat[support] > 0).all() and (heat[~support] == 0).all()
    assert heat[12, 20] == heat.max()


def test_occlusion_target_is_checked() -> None:
    with pytest.raises(UsageError, match="occlusion-target"):
        get_method("occlusion", {"occlusion_target": "object"})


def _two_objects(path: Path, samples_dir: Path) -> None:
    """The cat (left) beside the espresso (right): centre squares of the samples, 224 px each."""

    def square(name: str) -> np.ndarray:
        image = decode_image(samples_dir / name)
        h, w = image.shape[:2]
        s = min(h, w)
        crop = image[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        return cv2.resize(crop, (224, 224), interpolation=cv2.INTER_AREA)

    both = np.concatenate([square("skimage_chelsea.png"), square("skimage_coffee.png")], 1)
    cv2.imwrite(str(path), both[:, :, ::-1])


def test_winner_occlusion_on_two_objects(tmp_path: Path, samples_dir: Path) -> None:
    """The winner at each occluder position (Zeiler & Fergus fig. 7e): hiding part of the cat
    lets the espresso win, hiding the espresso leaves a cat class winning. So the coffee
    classes appear only on the cat's half, and the coffee's half is all cat classes."""
    _two_objects(tmp_path / "two.png", samples_dir)
    loaded = load_model("efficientnet_lite0")
    x = preprocess(decode_image(tmp_path / "two.png"), loaded.input)[None]
    explanation = _occlusion(loaded.model, "auto", x, loaded.input, patch=64, stride=32, occlusion_target="winner")
    assert explanation.kind == "labels" and explanation.layer is None
    labels = explanation.maps[0].long()
    half = labels.shape[1] // 2
    left, right = set(labels[:, :half].unique().tolist()), set(labels[:, half:].unique().tolist())
    assert left & COFFEE_CLASSES and left & CAT_CLASSES
    assert right <= CAT_CLASSES
    coffee = torch.isin(labels, torch.tensor(sorted(COFFEE_CLASSES)))
    assert not coffee[:, half:].any()


def test_winner_occlusion_writes_a_label_map(tmp_path: Path, samples_dir: Path) -> None:
    _two_objects(tmp_path / "two.png", samples_dir)
    result = CliRunner().invoke(
        app,
        ["explain", str(tmp_path / "two.png"), "-m", "occlusion", "--occlusion-target", "winner"]
        + ["--patch", "64", "--stride", "32", "-o", str(tmp_path / "out"), "--device", "cpu", "--grid"],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "two.png.json").read_text())
    entry = record["explanations"][0]
    indices = {c["index"] for c in entry["classes"]}
    assert indices & CAT_CLASSES and indices & COFFEE_CLASSES
    assert abs(sum(c["share"] for c in entry["classes"]) - 1) < 1e-6
    assert record["request"]["method_options"]["occlusion.occlusion_target"] == "winner"
    picture = cv2.imread(str(tmp_path / "out" / entry["overlay"]))
    assert picture.shape[1] == 448 and picture.shape[0] > 224  # the picture, then the legend below
