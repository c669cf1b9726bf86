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


def test_a_timm_vit_takes_another_input_size_as_timm_fine_tunes_it(tmp_path) -> None:
    """--input-size 160 on a ViT of 224: camcli calls timm's set_input_size after loading the
    file; timm building the model at 160 and loading the same file (its checkpoint filter
    resamples the position embeddings) is the independent reference: the same logits."""
    from safetensors.torch import save_file

    name = "vit_tiny_patch16_224"
    torch.manual_seed(0)
    path = tmp_path / "vit.safetensors"
    save_file(timm.create_model(name).state_dict(), str(path))
    loaded = load_model(f"timm:{name}", str(path), input_size=160)
    assert loaded.input.size == 160 and "token grid 14x14 -> 10x10" in loaded.adapted
    reference = timm.create_model(name, img_size=160, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), reference.eval()(x), atol=1e-5, rtol=1e-4)
    assert load_model(f"timm:{name}", str(path), input_size=224).adapted is None  # its own size: untouched
    assert load_model("timm:resnet18", "none", input_size=160).adapted is None  # a CNN takes any size


def test_explain_a_timm_vit_at_another_size_says_so(tmp_path, samples_dir) -> None:
    out = tmp_path / "out"
    args = ["explain", str(samples_dir / "skimage_camera.png"), "--model", "timm:vit_tiny_patch16_224"]
    result = CliRunner().invoke(app, [*args, "--weights", "none", "--input-size", "160", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "note: timm:vit_tiny_patch16_224 was built for 224 px, resized to 160 px" in result.output
    record = json.loads((out / "skimage_camera.png.json").read_text())
    assert "token grid 14x14 -> 10x10" in record["adapted"] and record["input"]["size"] == [160, 160]
    layers = CliRunner().invoke(app, ["layers", "timm:vit_tiny_patch16_224", "--input-size", "160"])
    assert layers.exit_code == 0 and "1+100 -> 10x10" in layers.output, layers.output
