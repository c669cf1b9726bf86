"""Tests for the hand-written EfficientNet-Lite0 and its packaged weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from camcli.lite0 import (
    LITE0_INPUT_SIZE,
    LITE0_MEAN,
    LITE0_STD,
    EfficientNetLite0,
    efficientnet_lite0,
    load_lite0_state_dict,
    timm_lite0,
)


@pytest.fixture(scope="module")
def package_state_dict() -> dict[str, torch.Tensor]:
    return load_lite0_state_dict()


@pytest.fixture(scope="module")
def model() -> EfficientNetLite0:
    return efficientnet_lite0(pretrained=True)


def test_package_weights_load_strictly(
    package_state_dict: dict[str, torch.Tensor],
) -> None:
    assert len(package_state_dict) == 296
    net = EfficientNetLite0()
    net.load_state_dict(package_state_dict, strict=True)
    n_params = sum(p.numel() for p in net.parameters())
    assert round(n_params / 1e6, 2) == 4.65
    # Same order as the file, so positional mapping to other layouts is meaningful.
    assert list(net.state_dict()) == list(package_state_dict)


def test_factory_returns_eval_model(model: EfficientNetLite0) -> None:
    assert not model.training
    assert LITE0_INPUT_SIZE == 224
    assert LITE0_MEAN == LITE0_STD == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("size", [64, 224, 225, 300])
def test_any_input_size(model: EfficientNetLite0, size: int) -> None:
    with torch.no_grad():
        out = model(torch.zeros(1, 3, size, size))
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()


def test_parity_with_timm(model: EfficientNetLite0, package_state_dict: dict[str, torch.Tensor]) -> None:
    pytest.importorskip("timm")
    ref = timm_lite0()
    ref_sd = ref.state_dict()
    assert len(ref_sd) == len(package_state_dict) == 296
    for (ref_key, ref_tensor), (key, tensor) in zip(ref_sd.items(), package_state_dict.items(), strict=True):
        assert torch.equal(ref_tensor, tensor), (ref_key, key)
    assert not ref.training
    model.eval()

    gen = torch.Generator().manual_seed(0)
    for shape in [(1, 3, 224, 224), (2, 3, 225, 193)]:
        x = torch.rand(shape, generator=gen) * 2 - 1
        with torch.no_grad():
            ours = model(x)
            theirs = ref(x)
        assert ours.shape == theirs.shape == (shape[0], 1000)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_relu6_modules_are_distinct(model: EfficientNetLite0) -> None:
    # CAM hooks and guided backprop patch each activation; shared or in-place
    # modules would corrupt saved activations or double-apply hooks.
    acts = [m for m in model.modules() if isinstance(m, nn.ReLU6)]
    assert len(acts) == 1 + 1 + 2 * 15 + 1
    assert len({id(m) for m in acts}) == len(acts)
    assert all(not m.inplace for m in acts)
    # Each activation also appears exactly once in the named module tree.
    named = [name for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.ReLU6)]
    assert len(named) == len(acts)
