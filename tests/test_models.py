"""Model zoo loading: torchvision's Weights API and cache, user files and factories, and
never unpickling a data file."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision

from camcli.errors import UsageError
from camcli.models import list_models, load_model


class _Marker:
    """Unpickling this creates a file: proof that a loader executed code from data."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def _cache_file(torch_home: Path, weights: torchvision.models.WeightsEnum) -> Path:
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / os.path.basename(weights.url)


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def test_torchvision_weights_come_from_the_cache(torch_home) -> None:
    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.save(reference.state_dict(), _cache_file(torch_home, weights))
    for choice in ("IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"):
        loaded = load_model("resnet18", choice)
        assert loaded.weights == "ResNet18_Weights.IMAGENET1K_V1"
        for key, value in reference.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[key], value), key
    assert loaded.input.size == 224 and loaded.input.mean == (0.485, 0.456, 0.406)
    assert loaded.categories == weights.meta["categories"]
    assert not loaded.model.training


def test_densenet_legacy_checkpoint_keys_are_renamed(torch_home) -> None:
    torch.manual_seed(2)
    reference = torchvision.models.densenet121()
    legacy = {}
    for key, value in reference.state_dict().items():  # the layout of the released (2017) files
        if key.endswith("num_batches_tracked"):
            continue
        for part in ("norm1", "norm2", "relu1", "relu2", "conv1", "conv2"):
            if f".{part}." in key and "denselayer" in key:
                key = key.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        legacy[key] = value
    assert any(".norm.1." in key for key in legacy)
    torch.save(legacy, _cache_file(torch_home, torchvision.models.DenseNet121_Weights.IMAGENET1K_V1))
    loaded = load_model("densenet121", "DEFAULT")
    assert torch.equal(loaded.model.features.conv0.weight, reference.features.conv0.weight)


def test_a_pickle_in_the_cache_is_refused_and_never_runs(torch_home, tmp_path) -> None:
    marker = tmp_path / "pwned"
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    with open(_cache_file(torch_home, weights), "wb") as handle:
        pickle.dump({"fc.weight": _Marker(marker)}, handle)
    with pytest.raises(UsageError, match="refused"):
        load_model("resnet18", "IMAGENET1K_V1")
    assert not marker.exists()


def test_a_pickle_as_weights_file_is_refused_and_never_runs(tmp_path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": _Marker(marker)}, evil)
    with pytest.raises(UsageError, match="refused"):
        load_model("resnet18", str(evil))
    assert not marker.exists()


def test_weights_file_nested_with_module_prefix_and_other_class_count(tmp_path) -> None:
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(num_classes=7)
    path = tmp_path / "finetuned.pth"
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    loaded = load_model("resnet18", str(path))
    assert loaded.model.fc.out_features == 7 and loaded.categories is None
    assert loaded.label(3) == "class 3"
    assert torch.equal(loaded.model.fc.weight, reference.fc.weight)


def test_mismatched_state_dict_lists_the_first_problems(tmp_path) -> None:
    path = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(UsageError, match="unexpected layer1.2") as error:
        load_model("resnet18", str(path))
    assert "more" in str(error.value)


def test_user_factory_and_checkpoint(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodels.py").write_text(
        "import torchvision\n"
        "def small():\n"
        "    return torchvision.models.resnet18(num_classes=4)\n"
        "def broken():\n"
        "    raise ValueError('no such config')\n"
    )
    torch.manual_seed(4)
    state = torchvision.models.resnet18(num_classes=4).state_dict()
    torch.save(state, tmp_path / "small.pth")
    loaded = load_model("mymodels:small", "small.pth")
    assert torch.equal(loaded.model.fc.bias, state["fc.bias"])
    assert loaded.input.size == 224
    with pytest.raises(UsageError, match="mymodels:broken: the factory raised ValueError: no such config"):
        load_model("mymodels:broken")
    with pytest.raises(UsageError, match="cannot import"):
        load_model("mymodels:missing")


def test_lite0_weights_and_names() -> None:
    assert list_models()[0] == "efficientnet_lite0" and "resnet18" in list_models()
    assert load_model(weights="none").weights == "none"
    with pytest.raises(UsageError, match="unknown model 'resnet19'.*resnet18"):
        load_model("resnet19")
    with pytest.raises(UsageError, match="IMAGENET1K_V1"):
        load_model("resnet18", "IMAGENET9K")
