"""timm models: `--model timm:NAME`, weights only from a user file or timm's local cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from camcli.cli import app
from camcli.errors import UsageError
from camcli.models import load_model

timm = pytest.importorskip("timm")


@pytest.fixture
def empty_caches(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "torch"


def test_preprocessing_comes_from_pretrained_cfg() -> None:
    loaded = load_model("timm:resnet18", "none")
    cfg = timm.models.get_pretrained_cfg("resnet18")
    assert loaded.name == "timm:resnet18" and loaded.weights == "none"
    assert loaded.input.size == cfg.input_size[-1] and loaded.input.mean == cfg.mean and loaded.input.std == cfg.std
    assert loaded.input.interpolation == "bicubic" and len(loaded.categories) == 1000


def test_default_weights_are_never_downloaded(empty_caches) -> None:
    with pytest.raises(UsageError, match="never downloads"):
        load_model("timm:resnet18")


def test_default_weights_from_the_local_cache(empty_caches) -> None:
    state = timm.create_model("resnet18").state_dict()
    url = timm.models.get_pretrained_cfg("resnet18").url
    cached = empty_caches / "hub" / "checkpoints" / Path(url).name
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    loaded = load_model("timm:resnet18")
    assert loaded.weights == f"timm resnet18 ({cached.name})"
    assert all(torch.equal(state[k], v) for k, v in loaded.model.state_dict().items())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_with_its_own_class_count(tmp_path, suffix: str) -> None:
    state = timm.create_model("resnet18", num_classes=7).state_dict()
    path = tmp_path / f"mine{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    loaded = load_model("timm:resnet18", str(path))
    assert loaded.model.fc.out_features == 7 and loaded.categories is None
    assert torch.equal(loaded.model.fc.weight, state["fc.weight"])


def test_unknown_timm_model_suggests() -> None:
    with pytest.raises(UsageError, match="did you mean resnet18"):
        load_model("timm:resnet18x", "none")


def test_explain_a_timm_model(tmp_path, samples_dir) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "explain",
            str(samples_dir / "skimage_camera.png"),
            "--model",
            "timm:resnet18",
            "--weights",
            "none",
            "--input-size",
            "64",
            "-m",
            "cam,gradcam",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "skimage_camera.png.json").read_text())
    assert record["model"] == "timm:resnet18" and record["explanations"][0]["layer"] == "layer4"
