"""Discovery commands and compare grids, checked on their real output."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision
from typer.testing import CliRunner

from camcli import __version__
from camcli.cli import app
from camcli.methods import list_methods
from camcli.models import load_model, resolve_layer
from camcli.render import GRID_PAD, grid_size, panel_width, title_height

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_methods_lists_every_registered_method() -> None:
    text = run("methods")
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    for name in list_methods():
        assert any(line.split()[0] == name for line in lines[1:]), name
    assert "Selvaraju et al., ICCV 2017" in text.stdout and "1 + K forwards" in text.stdout
    rows = json.loads(run("methods", "--json").stdout)
    assert [r["name"] for r in rows] == list_methods()
    assert {"name", "title", "paper", "url", "needs", "cost", "in_all"} <= set(rows[0])


def test_models_lists_resnet18_with_its_weights_and_cache_state(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    text = run("models", "resnet1*")
    assert text.exit_code == 0, text.output
    line = next(line for line in text.stdout.splitlines() if line.split()[0] == "resnet18")
    assert "torchvision" in line and "IMAGENET1K_V1" in line and line.split()[3] == "-"
    assert "efficientnet_lite0" not in text.stdout  # the glob filters
    # a checkpoint in the cache is reported as cached
    member = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = tmp_path / "hub" / "checkpoints" / Path(member.url).name
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"")
    entries = json.loads(run("models", "resnet18", "--json").stdout)
    tv = next(e for e in entries if e["name"] == "resnet18")
    assert tv["weights"] == [{"name": "IMAGENET1K_V1", "default": True, "cached": True}]
    assert any(e["name"] == "timm:resnet18" and e["source"] == "timm" for e in entries)
    assert run("models", "no_such_model*").exit_code == 2


def test_models_without_pattern_starts_with_the_embedded_default() -> None:
    entries = json.loads(run("models", "--json").stdout)
    assert entries[0]["name"] == "efficientnet_lite0" and entries[0]["source"] == "embedded"
    assert {"resnet18", "convnext_tiny"} <= {e["name"] for e in entries}


@pytest.mark.parametrize("model", ["resnet18", "efficientnet_lite0", "timm:resnet18"])
def test_layers_marks_the_layer_auto_chooses(model: str) -> None:
    result = run("layers", model, "--input-size", "64")
    assert result.exit_code == 0, result.output
    loaded = load_model(model, "none", input_size=64)
    auto = resolve_layer(loaded.model, "auto", loaded.input, torch.device("cpu")).name
    marked = [line.split()[0] for line in result.stdout.splitlines() if line.endswith("<- auto")]
    assert marked == [auto]
    names = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert names == [n for n, _ in loaded.model.named_modules() if n]
    listing = json.loads(run("layers", model, "--input-size", "64", "--json").stdout)
    assert listing["auto"] == auto and listing["logits"] == [1, 1000]
    shapes = {row["name"]: row["shape"] for row in listing["layers"]}
    assert shapes[auto][0] == 1 and len(shapes[auto]) == 4


def test_layers_depth_and_unknown_model() -> None:
    result = run("layers", "resnet18", "--input-size", "64", "--depth", "1")
    lines = result.stdout.splitlines()[1:]
    assert [line.split()[0] for line in lines] == [
        "conv1",
        "bn1",
        "relu",
        "maxpool",
        *[f"layer{i}" for i in range(1, 5)],
        "avgpool",
        "fc",
    ]
    assert "layer4  " in lines[7] and "(1, 512, 2, 2)" in lines[7]
    bad = run("layers", "resnt18")
    assert bad.exit_code == 2 and "resnet18" in bad.stderr


def test_version_command_and_flag() -> None:
    result = run("version")
    assert result.exit_code == 0
    assert f"camcli        {__version__}" in result.stdout
    assert torch.__version__ in result.stdout and cv2.__version__ in result.stdout
    info = json.loads(run("version", "--json").stdout)
    assert info["torchvision"] == torchvision.__version__ and info["cuda_devices"] == [] or torch.cuda.is_available()
    flag = run("--version")
    assert flag.exit_code == 0 and flag.stdout.startswith(f"camcli {__version__} (torch")


@pytest.fixture(scope="module")
def small_image(tmp_path_factory, samples_dir) -> Path:
    """A 60 x 40 photo: grids are checked pixel by pixel, so keep them small."""
    image = cv2.imread(str(samples_dir / "skimage_chelsea.png"))
    path = tmp_path_factory.mktemp("img") / "cat.png"
    cv2.imwrite(str(path), cv2.resize(image, (60, 40), interpolation=cv2.INTER_AREA))
    return path


def _panel_boxes(rows: int, columns: int, pw: int, ph: int) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    th = title_height(ph)
    return {
        (r, c): (
            GRID_PAD + r * (th + ph + GRID_PAD) + th,
            GRID_PAD + c * (pw + GRID_PAD),
            ph,
            pw,
        )
        for r in range(rows)
        for c in range(columns)
    }


def test_compare_grid_has_the_right_size_and_panels(tmp_path, small_image) -> None:
    out = tmp_path / "out"
    result = run(
        "compare",
        str(small_image),
        "-m",
        "cam,gradcam",
        "-k",
        "2",
        "-o",
        str(out),
        "--panel-size",
        "64",
        "--input-size",
        "64",
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["cat.png.grid.png"], "compare writes only the grid"
    grid = cv2.imread(str(out / "cat.png.grid.png"))[:, :, ::-1]
    pw = panel_width(60, 40, 64)
    assert (grid.shape[1], grid.shape[0]) == grid_size(2, 3, pw, 64)  # 2 targets x (original + 2 methods)
    boxes = _panel_boxes(2, 3, pw, 64)
    original = cv2.resize(cv2.imread(str(small_image))[:, :, ::-1], (pw, 64), interpolation=cv2.INTER_LINEAR)
    y, x, h, w = boxes[0, 0]
    assert np.abs(grid[y : y + h, x : x + w].astype(int) - original).max() <= 1
    y, x, h, w = boxes[1, 0]
    assert (grid[y : y + h, x : x + w] == 255).all(), "second row: no repeated original"
    for cell in [(0, 1), (0, 2), (1, 1), (1, 2)]:  # overlays: tinted, not the original
        y, x, h, w = boxes[cell]
        assert np.abs(grid[y : y + h, x : x + w].astype(int) - original).mean() > 5
    # gutters are white
    assert (grid[:, :GRID_PAD] == 255).all() and (grid[:GRID_PAD] == 255).all()


def test_explain_grid_beside_per_method_files(tmp_path, small_image, validate_record) -> None:
    out = tmp_path / "out"
    result = run("explain", str(small_image), "-m", "gradcam,guided-backprop", "-o", str(out), "--grid", "--jsonl")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    validate_record(record)
    assert record["grid"] == "cat.png.grid.png"
    assert {p.name for p in out.iterdir()} == {
        "cat.png.json",
        "cat.png.gradcam.png",
        "cat.png.guided-backprop.png",
        "cat.png.grid.png",
    }
    grid = cv2.imread(str(out / "cat.png.grid.png"))
    assert (grid.shape[1], grid.shape[0]) == grid_size(1, 3, panel_width(60, 40, 224), 224)
    again = run("explain", str(small_image), "-m", "gradcam,guided-backprop", "-o", str(out), "--grid")
    assert "1 already done" in again.stderr


def test_shell_completion_of_method_lists(tmp_path) -> None:
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "_CAMCLI_COMPLETE": "complete_bash",
        "COMP_WORDS": "camcli explain -m gradcam,sc",
        "COMP_CWORD": "3",
    }
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    script = "from camcli.cli import app; app(prog_name='camcli')"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["gradcam,scorecam"], proc.stderr
    help_text = run("--help").stdout
    assert "--install-completion" in help_text


def test_models_table_fits_a_width_unless_wide() -> None:
    from camcli import commands

    entries = commands.model_entries("resnet*")
    narrow = commands.format_models(entries, 70)
    table = [line for line in narrow.splitlines() if line.startswith(("model", "resnet"))]
    assert table and all(len(line) <= 70 for line in table)
    assert "~" in narrow and "--wide" in narrow
    assert any(len(line) > 70 for line in commands.format_models(entries).splitlines())
