"""The Python API runs the CLI's engine: its heatmaps equal the CLI's .npy files."""

from __future__ import annotations

import json
import time

import numpy as np
import PIL.Image
import pytest
import torch
from typer.testing import CliRunner

import camcli
from camcli import explain, list_methods, load_model
from camcli.cli import app
from camcli.errors import UsageError
from camcli.io import decode_image

METHODS = "gradcam,gradcam++,guided-backprop"  # scorecam is checked elsewhere: 1280 forwards per image


@pytest.fixture(scope="module")
def lite0():
    return load_model()


def test_api_heatmaps_equal_the_cli_npy_files(tmp_path, samples_dir) -> None:
    images = [samples_dir / "skimage_chelsea.png", samples_dir / "skimage_coffee.png"]
    out = tmp_path / "out"
    args = ["-m", METHODS, "-k", "2", "--save-heatmap", "-o", str(out), "-b", "2", "--input-size", "112"]
    result = CliRunner().invoke(app, ["explain", *map(str, images), *args])
    assert result.exit_code == 0, result.output
    model = load_model(input_size=112)  # the same small input keeps the test fast
    api = explain(images, METHODS, model=model, topk=2, batch_size=2)
    assert len(api) == 2
    for path, got in zip(images, api, strict=True):
        record = json.loads((out / f"{path.name}.json").read_text())
        assert [(p.index, p.label) for p in got.predictions] == [
            (p["index"], p["label"]) for p in record["predictions"]
        ]
        assert len(got.explanations) == len(record["explanations"]) == 6
        for mine, theirs in zip(got.explanations, record["explanations"], strict=True):
            assert (mine.method, mine.layer, mine.target.index) == (
                theirs["method"],
                theirs["layer"],
                theirs["target"]["index"],
            )
            assert mine.target.score == pytest.approx(theirs["target"]["score"], rel=1e-6)
            written = np.load(out / theirs["heatmap"])
            assert mine.heatmap.dtype == written.dtype == np.float32 and mine.heatmap.shape == written.shape
            np.testing.assert_allclose(mine.heatmap, written, rtol=0, atol=1e-6)


def test_paths_arrays_pil_and_tensors_give_the_same_maps(samples_dir, lite0) -> None:
    path = samples_dir / "skimage_camera.png"
    rgb = decode_image(path)
    inputs = [
        str(path),
        rgb,
        PIL.Image.fromarray(rgb),
        torch.from_numpy(rgb).permute(2, 0, 1),  # (3, H, W) uint8, torchvision's layout
        torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0,  # float in [0, 1]
    ]
    results = explain(inputs, "gradcam", model=lite0)
    reference = results[0]
    assert reference.predictions[0].label == "tripod"
    assert reference.heatmap("gradcam").shape == rgb.shape[:2]
    for other in results[1:]:
        assert [p.index for p in other.predictions] == [p.index for p in reference.predictions]
        np.testing.assert_allclose(other.heatmap("gradcam"), reference.heatmap("gradcam"), atol=1e-6)


def test_single_image_target_by_name_and_errors(samples_dir, lite0) -> None:
    (result,) = explain(samples_dir / "skimage_coffee.png", ["cam"], model=lite0, target="cup")
    assert result.explanations[0].target.index == 968 and result.explanations[0].target.label == "cup"
    assert result.heatmap("cam", 968).max() > 0.99
    with pytest.raises(KeyError):
        result.heatmap("gradcam")
    with pytest.raises(UsageError, match="unknown method"):
        explain(samples_dir / "skimage_coffee.png", "gradcan", model=lite0)
    with pytest.raises(UsageError, match="image array"):
        explain(np.zeros((4, 4, 5), dtype=np.uint8), model=lite0)


def test_public_names_and_a_cheap_import() -> None:
    assert list_methods() == camcli.list_methods() and "gradcam" in list_methods()
    assert camcli.explain is explain and camcli.load_model is load_model
    with pytest.raises(AttributeError):
        camcli.nothing  # noqa: B018
    start = time.perf_counter()
    import importlib

    importlib.reload(camcli)
    assert time.perf_counter() - start < 1.0


def test_api_with_a_user_model_and_labels() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )
    loaded = load_model("torch.nn:Identity", labels=["ok", "not ok"], input_size=32)
    loaded.model = model.eval()
    image = np.random.default_rng(0).random((20, 30, 3))  # float in [0, 1]
    (result,) = explain(image, "cam", model=loaded, target="not ok")
    assert result.explanations[0].target.label == "not ok" and result.heatmap("cam").shape == (20, 30)
    assert {p.label for p in result.predictions} == {"ok", "not ok"}


def test_results_show_inline_and_give_the_clis_record(tmp_path, samples_dir, lite0, validate_record) -> None:
    image = samples_dir / "skimage_chelsea.png"
    (result,) = explain(image, "gradcam,saliency", model=lite0)
    png = result._repr_png_()
    assert png.startswith(b"\x89PNG")
    shown = np.asarray(PIL.Image.open(__import__("io").BytesIO(png)))
    assert shown.shape[1] > 2 * shown.shape[0]  # the image, then one panel per method
    record = json.loads(result.to_json())
    validate_record(record)
    out = tmp_path / "out"
    assert CliRunner().invoke(app, ["explain", str(image), "-o", str(out), "-m", "gradcam,saliency"]).exit_code == 0
    written = json.loads((out / "skimage_chelsea.png.json").read_text())
    for key in ("image", "width", "height", "model", "weights", "input", "predictions", "explanations", "error"):
        assert record[key] == written[key], key
    for key in ("model", "weights", "layer", "methods", "target", "topk", "heatmap"):
        assert record["request"][key] == written["request"][key], key


def test_api_takes_the_clis_fusion_settings_and_metrics(tmp_path, samples_dir) -> None:
    """The API runs the CLI's plan: fused layers, a method setting and the metrics come out
    as the CLI writes them for the same image."""
    image = samples_dir / "skimage_coffee.png"
    out = tmp_path / "out"
    flags = ["--layer", "fine", "--fuse", "product", "--set", "rise.masks=40", "--metrics", "--steps", "5"]
    args = ["-m", "layercam,rise", *flags, "--save-heatmap", "--input-size", "160", "-o", str(out)]
    result = CliRunner().invoke(app, ["explain", str(image), *args])
    assert result.exit_code == 0, result.output
    record = json.loads((out / f"{image.name}.json").read_text())
    (got,) = explain(
        image,
        "layercam,rise",
        model=load_model(input_size=160),
        layer="fine",
        fuse="product",
        settings={"rise.masks": 40},
        metrics=True,
        steps=5,
    )
    for mine, theirs in zip(got.explanations, record["explanations"], strict=True):
        assert (mine.method, mine.layer) == (theirs["method"], theirs["layer"])
        np.testing.assert_allclose(mine.heatmap, np.load(out / theirs["heatmap"]), rtol=0, atol=1e-6)
        assert mine.metrics == pytest.approx(theirs["metrics"], rel=1e-5)
    assert "," in got.explanations[0].layer  # two layers fused
    assert json.loads(got.to_json())["request"]["method_options"] == {"rise.masks": 40}
