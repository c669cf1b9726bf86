"""The command line end to end on the sample photos: files, fields, shapes, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from camcli.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def invoke(*args: str, stdin: str | None = None):
    return runner.invoke(app, ["explain", *args], input=stdin)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, samples_dir):
    out = tmp_path_factory.mktemp("out")
    result = invoke(str(samples_dir), "-o", str(out), "-m", "cam,gradcam,guided-backprop", "--save-heatmap", "--jsonl")
    return result, out


def test_explain_samples_writes_documented_files(sample_run, samples_dir, sample_labels) -> None:
    result, out = sample_run
    assert result.exit_code == 0, result.output
    for name, label in sample_labels.items():
        record = json.loads((out / f"{name}.json").read_text())
        assert set(record) >= {
            "schema_version",
            "image",
            "width",
            "height",
            "model",
            "weights",
            "input",
            "device",
            "versions",
            "predictions",
            "explanations",
            "error",
        }
        assert record["schema_version"] == 1 and record["error"] is None
        assert (record["width"], record["height"]) == (label["width"], label["height"])
        assert record["model"] == "efficientnet_lite0" and record["device"] == "cpu"
        assert record["input"] == {"size": [224, 224], "mean": [0.5] * 3, "std": [0.5] * 3}
        assert set(record["versions"]) == {"camcli", "torch", "torchvision"}
        assert len(record["predictions"]) == 5
        assert record["predictions"][0]["index"] in label["acceptable_classes"]
        scores = [p["score"] for p in record["predictions"]]
        assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
        assert [e["method"] for e in record["explanations"]] == ["cam", "gradcam", "guided-backprop"]
        for explanation in record["explanations"]:
            layer_fields = {"grid", "layout"} if explanation["layer"] is not None else set()
            assert set(explanation) == {"method", "layer", "target", "overlay", "heatmap", "warning", *layer_fields}
            if layer_fields:
                assert explanation["grid"] == [7, 7] and explanation["layout"] == "NCHW 7x7"
            assert explanation["target"]["index"] == record["predictions"][0]["index"]
            assert explanation["warning"] is None
            overlay = cv2.imread(str(out / explanation["overlay"]))
            assert overlay.shape == (label["height"], label["width"], 3)
            heat = np.load(out / explanation["heatmap"])
            assert heat.dtype == np.float32
            if explanation["method"] == "guided-backprop":
                assert explanation["layer"] is None
                assert heat.shape == (label["height"], label["width"], 3)
            else:
                assert explanation["layer"] == "_head_act"
                assert heat.shape == (label["height"], label["width"])
                assert 0.0 <= heat.min() and heat.max() <= 1.0 and heat.max() > 0.99
    assert not list(out.rglob("*.tmp")), "no temporary files are left behind"


def test_jsonl_streams_one_object_per_image_in_input_order(sample_run, samples_dir) -> None:
    result, out = sample_run
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["image"]).name for r in lines] == sorted(p.name for p in samples_dir.glob("*.png"))
    assert lines[0] == json.loads((out / f"{Path(lines[0]['image']).name}.json").read_text())


def test_overlay_colours_are_rgb_not_bgr(sample_run, samples_dir) -> None:
    """The hottest point of a jet overlay is red-ish in RGB: check the written file's colour order."""
    _, out = sample_run
    heat = np.load(out / "skimage_coffee.png.gradcam.npy")
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    original = cv2.imread(str(samples_dir / "skimage_coffee.png"))[y, x].astype(float)
    written = cv2.imread(str(out / "skimage_coffee.png.gradcam.png"))[y, x].astype(float)
    blue, _, red = written - 0.5 * original  # the colormap's share, in cv2's BGR order
    assert red > 50 and blue < 10  # jet's hottest colour is (128, 0, 0) RGB, at alpha 0.5


def test_rerun_skips_finished_images_and_overwrite_redoes_them(tmp_path, samples_dir) -> None:
    source = tmp_path / "in"
    source.mkdir()
    shutil.copy(samples_dir / "skimage_chelsea.png", source / "a.png")
    out = tmp_path / "out"
    first = invoke(str(source), "-o", str(out))
    assert first.exit_code == 0, first.output
    stamp = (out / "a.png.json").stat().st_mtime_ns
    second = invoke(str(source), "-o", str(out))
    assert second.exit_code == 0 and "1 already done" in second.stderr
    assert (out / "a.png.json").stat().st_mtime_ns == stamp
    other = invoke(str(source), "-o", str(out), "-m", "cam")  # different methods: redone
    assert "1 explained" in other.stderr
    forced = invoke(str(source), "-o", str(out), "-m", "cam", "--overwrite")
    assert "1 explained" in forced.stderr


def test_bad_file_is_one_line_and_the_rest_is_processed(tmp_path, samples_dir) -> None:
    source = tmp_path / "in"
    (source / "sub").mkdir(parents=True)
    shutil.copy(samples_dir / "skimage_coffee.png", source / "sub" / "good.png")
    (source / "notes.jpg").write_text("not an image")
    out = tmp_path / "out"
    result = invoke(str(source), "-o", str(out))
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if "notes.jpg" in line]
    assert len(errors) == 1 and "not a decodable image" in errors[0]
    assert "Traceback" not in result.output
    assert json.loads((out / "notes.jpg.json").read_text())["error"] == "not a decodable image"
    assert json.loads((out / "sub" / "good.png.json").read_text())["error"] is None
    assert (out / "sub" / "good.png.gradcam.png").is_file()
    # the failed image is retried by the next run, the good one is not redone
    again = invoke(str(source), "-o", str(out))
    assert again.exit_code == 1 and "1 already done" in again.stderr


def test_topk_names_files_by_class(tmp_path, samples_dir) -> None:
    out = tmp_path / "out"
    result = invoke(str(samples_dir / "skimage_chelsea.png"), "-o", str(out), "-k", "2", "-m", "gradcam")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "skimage_chelsea.png.json").read_text())
    targets = [e["target"]["index"] for e in record["explanations"]]
    assert targets == [p["index"] for p in record["predictions"][:2]]
    first, second = record["explanations"]  # the top-1 keeps the plain name, any other class has its index
    assert first["overlay"] == "skimage_chelsea.png.gradcam.png"
    assert second["overlay"] == f"skimage_chelsea.png.gradcam.c{second['target']['index']}.png"
    assert all((out / e["overlay"]).is_file() for e in record["explanations"])


def test_target_by_name(tmp_path, samples_dir) -> None:
    out = tmp_path / "out"
    result = invoke(str(samples_dir / "skimage_coffee.png"), "-o", str(out), "-t", "Cup", "-m", "cam")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "skimage_coffee.png.json").read_text())
    assert record["explanations"][0]["target"]["index"] == 968


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "gradcan"], "unknown method"),
        (["--target", "5000"], "out of range"),
        (["--target", "parachte"], "unknown class name"),
        (["--target", "1", "--topk", "2"], "exclude"),
        (["--topk", "0"], "--topk"),
        (["--batch-size", "0"], "--batch-size"),
        (["--layer", "_head_ac"], "_head_act"),
        (["--device", "cuda:7"], "not available"),
        (["--batch-size", "abc"], "--batch-size"),
        (["--no-such-option"], "No such option"),
        (["--model", "resnet"], "unknown model"),
        (["--model", "vgg11", "--weights", "none", "-m", "cam"], "use gradcam"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, samples_dir, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    result = invoke(str(samples_dir / "skimage_chelsea.png"), "-o", str(out), *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output
    assert not list(out.glob("*.json")), "nothing is processed after a usage error"


def test_missing_input_is_exit_2_before_any_work(tmp_path, samples_dir) -> None:
    out = tmp_path / "out"
    result = invoke(str(samples_dir / "skimage_chelsea.png"), str(tmp_path / "nope.jpg"), "-o", str(out))
    assert result.exit_code == 2 and "nope.jpg" in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_python_m_and_stdin_paths(tmp_path, samples_dir) -> None:
    """`find ... | camcli explain - --jsonl` as a real subprocess; stdin paths stay inside --out."""
    out = tmp_path / "out"
    paths = f"{samples_dir / 'skimage_camera.png'}\n\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "camcli", "explain", "-", "--jsonl", "-q", "-o", str(out), "-m", "cam"],
        input=paths,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # -q: nothing but errors
    record = json.loads(proc.stdout)
    assert record["predictions"][0]["label"] == "tripod"
    written = list(out.rglob("*.json"))
    assert len(written) == 1 and written[0].is_relative_to(out)
    assert written[0].name == "skimage_camera.png.json"


def test_help_shows_every_option_plainly_and_each_command_whole() -> None:
    """Plain help (click's formatter, no rich layout): no Python types as metavars, every
    option of explain, and each command's whole first paragraph in `camcli --help`."""
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "100"})
    assert top.exit_code == 0, top.output
    flat = " ".join(top.stdout.split())
    assert "(Zeiler & Fergus fig. 2): its strongest activations, their receptive-field patches" in flat
    assert "per image in --out. report" in flat  # click alone would cut it at 45 characters or a full stop
    explain = runner.invoke(app, ["explain", "--help"], env={"COLUMNS": "100"})
    assert explain.exit_code == 0, explain.output
    words = explain.stdout.split()
    text = " ".join(words)
    for python_type in ("<bool>", "<list[str]>", "{inputs}", "SET_", "╭"):
        assert python_type not in text
    for shown in ("explain [OPTIONS] INPUTS...", "--include INCLUDE", "--set SET", "--save-heatmap Also", "timm:NAME"):
        assert shown in text
    options = [p for p in typer.main.get_command(app).commands["explain"].params if p.param_type_name == "option"]
    assert len(options) > 50
    for option in options:
        assert (option.opts[-1] in words) != option.hidden, option.opts
