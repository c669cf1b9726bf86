"""Models as users bring them: outputs, heads, input channels, raw maps and boxes, weights files.

Tiny models from tests/tiny_models.py have maps computable by hand; torchvision and timm
models get random weights written to real .pth / .safetensors files.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from camcli.api import explain
from camcli.boxes import box_iou, map_boxes
from camcli.cli import app
from camcli.errors import UsageError
from camcli.models import load_model

runner = CliRunner()
FLAT = ["--input-size", "32", "--mean", "0,0,0", "--std", "1,1,1"]


def _png(path: Path, rgb: np.ndarray) -> Path:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def _run(*args: str) -> tuple[int, list[dict], str]:
    result = runner.invoke(app, ["explain", *args, "--jsonl", "-q"])
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result.exit_code, records, result.stderr


def _halves(left: tuple[int, int, int], right: tuple[int, int, int], size: int = 32) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    image[:, : size // 2] = left
    image[:, size // 2 :] = right
    return image


# --- outputs -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "key"), [("dict_output", None), ("tuple_output", "1"), ("logits_attribute", None)])
def test_outputs_unwrapped_give_the_plain_models_maps(tmp_path, name, key) -> None:
    image = _png(tmp_path / "a.png", _halves((250, 250, 250), (40, 40, 40)))
    plain = explain(
        image, "gradcam", model=load_model("tiny_models:brightness", input_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    )
    args = [str(image), "--model", f"tiny_models:{name}", *FLAT, "-o", str(tmp_path / "o"), "--save-heatmap"]
    code, (record,), _ = _run(*args, *(["--output-key", key] if key else []))
    assert code == 0
    assert record["predictions"][0]["index"] == plain[0].predictions[0].index == 0
    heat = np.load(tmp_path / "o" / record["explanations"][0]["heatmap"])
    np.testing.assert_allclose(heat, plain[0].heatmap("gradcam"), atol=1e-6)


def test_tuple_first_tensor_is_the_default_and_a_bad_key_is_one_line(tmp_path) -> None:
    image = _png(tmp_path / "a.png", _halves((250, 250, 250), (40, 40, 40)))
    code, (record,), _ = _run(str(image), "--model", "tiny_models:tuple_output", *FLAT, "-o", str(tmp_path / "o"))
    assert code == 0 and record["predictions"][0]["index"] == 1  # the first tensor is -logits
    result = runner.invoke(
        app, ["explain", str(image), "--model", "tiny_models:dict_output", *FLAT, "--output-key", "nope"]
    )
    assert result.exit_code == 2 and "--output-key 'nope'" in result.stderr and "features" in result.stderr


# --- heads ---------------------------------------------------------------------------------


def test_multi_label_positive_explains_each_images_own_classes(tmp_path) -> None:
    red_green = _png(tmp_path / "rg.png", _halves((255, 0, 0), (0, 255, 0)))
    blue = _png(tmp_path / "b.png", np.full((32, 32, 3), (0, 0, 255), np.uint8))
    out = tmp_path / "o"
    code, records, _ = _run(
        str(red_green),
        str(blue),
        "--model",
        "tiny_models:three_labels",
        *FLAT,
        "-t",
        "positive",
        "-o",
        str(out),
        "--save-heatmap",
        "-b",
        "2",
    )
    assert code == 0
    by_name = {Path(r["image"]).name: r for r in records}
    rg, b = by_name["rg.png"], by_name["b.png"]
    assert [e["target"]["index"] for e in rg["explanations"]] == [0, 1]
    assert [e["target"]["index"] for e in b["explanations"]] == [2]
    assert rg["score"] == "sigmoid" and rg["request"]["threshold"] == 0.5
    for e in rg["explanations"] + b["explanations"]:
        assert e["target"]["score"] == pytest.approx(1 / (1 + np.exp(-7.5 if e["target"]["index"] == 2 else -2.5)))
    red, green = (np.load(out / e["heatmap"]) for e in rg["explanations"])
    assert red[:, :14].min() > 0.9 and red[:, 18:].max() < 0.1  # class 0 (red) on the left half
    assert green[:, 18:].min() > 0.9 and green[:, :14].max() < 0.1
    other = 1 - rg["predictions"][0]["index"]  # classes 0 and 1 tie: the record's top-1 keeps the plain name
    assert (out / "rg.png.gradcam.png").is_file() and (out / f"rg.png.gradcam.c{other}.png").is_file()
    assert (out / "b.png.gradcam.png").is_file() and not list(out.glob("b.png.gradcam.c*"))


def test_single_logit_targets_1_and_0_have_opposite_sign_weights(tmp_path) -> None:
    image = _png(tmp_path / "a.png", _halves((250, 250, 250), (40, 40, 40)))
    raws, targets = [], []
    for t in ("1", "0"):
        out = tmp_path / t
        code, (record,), _ = _run(
            str(image), "--model", "tiny_models:single_logit", *FLAT, "-t", t, "-o", str(out), "--save-heatmap", "raw"
        )
        assert code == 0
        (e,) = record["explanations"]
        targets.append(e["target"])
        raws.append(np.load(out / e["raw_heatmap"]))
    positive, negative = targets
    assert positive["gradient_of"] == "logit" and negative["gradient_of"] == "-logit"
    z = (250 + 40) / 2 / 255 - 0.5
    assert positive["score"] == pytest.approx(1 / (1 + np.exp(-z)), abs=1e-5)
    assert negative["score"] == pytest.approx(1 - positive["score"], abs=1e-5)
    assert np.abs(raws[0]).max() > 0
    np.testing.assert_allclose(raws[1], -raws[0], atol=1e-7)  # Grad-CAM weight of -z is minus that of z
    result = runner.invoke(
        app, ["explain", str(image), "--model", "tiny_models:single_logit", *FLAT, "--score", "softmax"]
    )
    assert result.exit_code == 2 and "no softmax" in result.stderr


# --- input channels ------------------------------------------------------------------------


def test_one_channel_model_on_rgb_and_grayscale_png(tmp_path) -> None:
    rgb = _halves((200, 100, 0), (10, 20, 250))
    luminance = np.rint(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    colour = _png(tmp_path / "colour.png", rgb)
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), luminance)  # a real 1-channel PNG
    loaded = load_model("tiny_models:gray", input_size=32, mean=(0.0,), std=(1.0,))
    assert loaded.input.channels == 1
    colour_result, grey_result = explain([colour, grey], "gradcam,saliency", model=loaded)
    expected = luminance.astype(np.float64).mean() / 255
    for result in (colour_result, grey_result):
        assert result.predictions[0].index == 0
    np.testing.assert_allclose(colour_result.heatmap("gradcam"), grey_result.heatmap("gradcam"), atol=2e-2)
    code, (record,), _ = _run(
        str(colour),
        "--model",
        "tiny_models:gray",
        "--input-size",
        "32",
        "--mean",
        "0",
        "--std",
        "1",
        "-o",
        str(tmp_path / "o"),
        "--score",
        "logit",
    )
    assert code == 0 and record["input"]["channels"] == 1 and record["input"]["mean"] == [0.0]
    assert record["predictions"][0]["score"] == pytest.approx(expected, abs=2e-3)  # logit = mean luminance
    # --channels 3 on a 1-channel model is the model's own error, not a silent conversion
    result = runner.invoke(app, ["explain", str(colour), "--model", "tiny_models:gray", *FLAT, "--channels", "3"])
    assert result.exit_code != 0


# --- raw maps and boxes --------------------------------------------------------------------


def test_two_blobs_give_exactly_their_two_boxes_largest_first() -> None:
    heat = np.zeros((40, 60), np.float32)
    heat[5:10, 3:8] = 0.6  # 5 x 5
    heat[20:31, 30:51] = 1.0  # 11 x 21
    heat[0, 59] = 0.1  # under 0.15 x max: no box
    assert map_boxes(heat, 0.15) == [[30, 20, 50, 30], [3, 5, 7, 9]]
    assert map_boxes(np.zeros((4, 4), np.float32), 0.15) == []
    assert box_iou([0, 0, 9, 9], [5, 0, 14, 9]) == pytest.approx(50 / 150)


def test_raw_maps_keep_their_ratio_across_images(tmp_path) -> None:
    bright = _halves((200, 200, 200), (60, 60, 60))
    dim = bright // 2
    files = [_png(tmp_path / "bright.png", bright), _png(tmp_path / "dim.png", dim)]
    out = tmp_path / "o"
    code, records, _ = _run(
        *map(str, files), "--model", "tiny_models:brightness", *FLAT, "-o", str(out), "--save-heatmap", "raw", "-b", "2"
    )
    assert code == 0
    by_name = {Path(r["image"]).name: r["explanations"][0] for r in records}
    raw_bright, raw_dim = (np.load(out / by_name[n]["raw_heatmap"]) for n in ("bright.png", "dim.png"))
    assert raw_bright.shape == (32, 32) and raw_bright.dtype == np.float32
    np.testing.assert_allclose(raw_dim, 0.5 * raw_bright, rtol=1e-5)
    assert by_name["dim.png"]["raw_max"] == pytest.approx(0.5 * by_name["bright.png"]["raw_max"], rel=1e-5)
    assert by_name["bright.png"]["raw_min"] == pytest.approx(float(raw_bright.min()))
    normalised = [np.load(out / by_name[n]["heatmap"]) for n in ("bright.png", "dim.png")]
    np.testing.assert_allclose(normalised[0], normalised[1], atol=1e-5)  # min-max hides the ratio


def test_box_threshold_boxes_drawn_and_localisation_iou(tmp_path) -> None:
    image = np.zeros((64, 96, 3), np.uint8)
    image[8:24, 8:24] = 255
    image[36:60, 50:90] = 255
    path = _png(tmp_path / "blobs.png", image)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"blobs.png": [[50, 36, 89, 59]]}))
    out = tmp_path / "o"
    code, (record,), _ = _run(
        str(path),
        "--model",
        "tiny_models:brightness",
        *FLAT,
        "-o",
        str(out),
        "--box-threshold",
        "0.5",
        "--draw-boxes",
        "--boxes",
        str(boxes),
        "-t",
        "0",
    )
    assert code == 0
    found = record["explanations"][0]["boxes"]
    assert len(found) == 2
    assert box_iou(found[0], [50, 36, 89, 59]) > 0.8 and box_iou(found[1], [8, 8, 23, 23]) > 0.6
    assert record["explanations"][0]["metrics"]["localisation_iou"] == pytest.approx(
        box_iou(found[0], [50, 36, 89, 59])
    )
    overlay = cv2.imread(str(out / record["explanations"][0]["overlay"]))
    x0, y0, _, _ = found[0]
    assert (overlay[y0, x0 + 5] == 255).all()  # the white box edge
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(path),
            "--model",
            "tiny_models:brightness",
            *FLAT,
            "--boxes",
            str(boxes),
            "-m",
            "gradcam",
            "-o",
            str(tmp_path / "e"),
            "--steps",
            "2",
            "-t",
            "0",
        ],
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["methods"][0]["localisation_iou"] > 0.8


# --- weights ---------------------------------------------------------------------------------


def test_random_weights_are_said_once_and_recorded(tmp_path) -> None:
    image = _png(tmp_path / "a.png", _halves((250, 250, 250), (40, 40, 40)))
    result = runner.invoke(
        app,
        [
            "explain",
            str(image),
            "--model",
            "resnet18",
            "--weights",
            "none",
            "--input-size",
            "32",
            "-o",
            str(tmp_path / "o"),
            "--jsonl",
        ],
    )
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if "random weights" in line]
    assert len(warnings) == 1
    assert json.loads(result.stdout.splitlines()[0])["random_weights"] is True


def test_weight_names_case_insensitive_and_each_choice_named_once() -> None:
    from torchvision.models import ResNet18_Weights

    from camcli.models.sources.torchvision import _weights_member

    assert _weights_member(ResNet18_Weights, "imagenet1k_v1") is ResNet18_Weights.IMAGENET1K_V1
    assert _weights_member(ResNet18_Weights, "ResNet18_Weights.default") is ResNet18_Weights.DEFAULT
    with pytest.raises(UsageError) as error:
        _weights_member(ResNet18_Weights, "v9")
    choices = str(error.value).split("use ", 1)[1].split(", ")
    assert len(choices) == len(set(choices)) and choices.count("DEFAULT") == 1


@pytest.mark.parametrize(("model", "size"), [("resnet18", 64), ("timm:resnet10t", 64), ("tiny_models:brightness", 32)])
def test_safetensors_and_pth_give_the_same_maps(tmp_path, samples_dir, model, size) -> None:
    from safetensors.torch import save_file

    if model.startswith("timm:"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    state = load_model(model, "none").model.state_dict()
    torch.save(state, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.SafeTensors"))  # any case
    image = samples_dir / "skimage_chelsea.png"
    maps = []
    for name in ("w.pth", "w.SafeTensors"):
        loaded = load_model(model, str(tmp_path / name), input_size=size)
        assert not loaded.random_weights
        (result,) = explain(image, "gradcam,gradcam++", model=loaded)
        maps.append([e.heatmap for e in result.explanations])
    for a, b in zip(*maps, strict=True):
        assert a.std() > 0
        np.testing.assert_array_equal(a, b)


def test_api_multi_label_and_binary_scores() -> None:
    red_green, blue = _halves((255, 0, 0), (0, 255, 0)), np.full((32, 32, 3), (0, 0, 255), np.uint8)
    loaded = load_model("tiny_models:three_labels", input_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    first, second = explain([red_green, blue], "gradcam", model=loaded, target="positive")
    assert [e.target.index for e in first.explanations] == [0, 1]
    assert [e.target.index for e in second.explanations] == [2]
    assert second.predictions[0].score == pytest.approx(1 / (1 + np.exp(-7.5)))  # sigmoid, not softmax
    binary = load_model("tiny_models:single_logit", input_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    (result,) = explain(red_green, "gradcam", model=binary, target=1)
    assert result.explanations[0].target.score == pytest.approx(1 / (1 + np.exp(-(255 / 3 / 255 - 0.5))), abs=1e-5)


def test_save_heatmap_takes_an_optional_value() -> None:
    from camcli.cli import _save_heatmap_value

    assert _save_heatmap_value(["a.png", "--save-heatmap", "raw", "-q"]) == [
        "a.png",
        "--save-heatmap",
        "--save-heatmap-raw",
        "-q",
    ]
    assert _save_heatmap_value(["--save-heatmap=map", "a.png"]) == ["--save-heatmap", "a.png"]
    assert _save_heatmap_value(["--save-heatmap", "photos/"]) == ["--save-heatmap", "photos/"]
