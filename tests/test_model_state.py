"""A library call leaves no trace: the caller's model and process are as they were,
after every API call and after an exception inside one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from camcli import explain, load_model
from camcli.engine import Explainer, TargetSpec
from camcli.errors import OptionError, UsageError
from camcli.methods import parse_methods
from camcli.models import resolve_layer, trace_forward

ROOT = Path(__file__).resolve().parent.parent


class Net(nn.Module):
    """A small CNN with a BatchNorm buffer, one frozen parameter and a half-trained mode."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("boom")
        return self.fc(self.pool(self.features(x)).flatten(1))


def snapshot(model: nn.Module) -> dict:
    """Everything a call could change: values, storage, strides, flags, hooks."""
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks")
    return {
        "tensors": {
            name: (t.data_ptr(), t.stride(), t.dtype, t.device, t.requires_grad, t.grad is None, t.detach().clone())
            for name, t in [*model.named_parameters(), *model.named_buffers()]
        },
        "training": {name: m.training for name, m in model.named_modules()},
        "hooks": {name: tuple(len(getattr(m, d, {})) for d in hook_dicts) for name, m in model.named_modules()},
        "global_hooks": tuple(len(d) for d in (nn.modules.module._global_forward_hooks,)),
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"] and before["global_hooks"] == after["global_hooks"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for name, old in before["tensors"].items():
        new = after["tensors"][name]
        assert old[:6] == new[:6], name  # same storage, strides (memory format), flags
        assert torch.equal(old[6], new[6]), name


@pytest.fixture
def model() -> Net:
    torch.manual_seed(0)
    net = Net()
    net.train()
    net.features[1].eval()  # mixed modes: one global model.train(x) would lose this
    net.features[0].bias.requires_grad_(False)
    return net


def _loaded(net: nn.Module):
    loaded = load_model("torch.nn:Identity", labels=["a", "b", "c", "d"], input_size=32)
    loaded.model = net
    return loaded


def test_api_and_engine_calls_leave_the_model_as_it_was(model: Net) -> None:
    image = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    before = snapshot(model)
    explain(image, "gradcam,scorecam,guided-backprop,occlusion", model=_loaded(model), device="cpu")
    assert_same(before, snapshot(model))
    trace_forward(model, _loaded(model).input, torch.device("cpu"))
    assert_same(before, snapshot(model))
    info = resolve_layer(model, "auto", _loaded(model).input, torch.device("cpu"))
    explainer = Explainer(model, info, parse_methods("gradcam++,smoothgrad"))
    explainer.explain(torch.randn(2, 3, 32, 32), TargetSpec())
    assert_same(before, snapshot(model))


def test_an_exception_inside_a_call_leaves_the_model_as_it_was(model: Net) -> None:
    info = resolve_layer(model, "auto", _loaded(model).input, torch.device("cpu"))
    explainer = Explainer(model, info, parse_methods("gradcam,saliency"))
    before = snapshot(model)
    model.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        explainer.explain(torch.randn(1, 3, 32, 32), TargetSpec())
    with pytest.raises(UsageError, match=r"cannot run a 3x32x32 input \(RuntimeError: boom\)"):
        trace_forward(model, _loaded(model).input, torch.device("cpu"))  # the CLI's one line
    model.fail = False
    assert_same(before, snapshot(model))


def test_a_read_only_array_gives_no_warning(model: Net, recwarn) -> None:
    image = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    image.setflags(write=False)  # what np.asarray(PIL.Image.open(...)) gives
    explain(image, "gradcam", model=_loaded(model), device="cpu")
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_errors_name_the_keyword_for_the_api_and_the_flag_for_the_cli(model: Net) -> None:
    with pytest.raises(UsageError, match=r"^smoothgrad\.samples \(--samples\) must be at least 1, not 0"):
        parse_methods("smoothgrad", {"samples": 0})  # a setting names its keyword and its flag
    with pytest.raises(OptionError, match="^topk must be between 1 and 4"):
        explain(np.zeros((8, 8, 3), np.uint8), "gradcam", model=_loaded(model), topk=9)
    from camcli.metrics import MetricOptions

    with pytest.raises(UsageError, match="^steps must be at least 1"):
        MetricOptions(steps=0)
    with pytest.raises(UsageError, match="per-sample targets for a batch of 2"):
        TargetSpec(per_sample=(1,)).resolve(torch.zeros(2, 4))


def test_importing_camcli_changes_no_process_state(tmp_path: Path) -> None:
    """Pillow's bomb guard, OpenCV's log level, the umask and sys.path, before and after
    importing camcli and loading a factory model (in a fresh interpreter)."""
    (tmp_path / "mynet.py").write_text("import torch\ndef build():\n    return torch.nn.Conv2d(3, 2, 1)\n")
    code = """
import os, sys
import cv2
from PIL import Image
def state():
    mask = os.umask(0o22); os.umask(mask)
    return (Image.MAX_IMAGE_PIXELS, cv2.utils.logging.getLogLevel(), mask, list(sys.path))
before = state()
import camcli, camcli.io, camcli.api, camcli.run.local
from camcli import load_model
load_model("mynet:build")
camcli.io.decode_image(camcli.io.Path(sys.argv[1]))
assert state() == before, (state(), before)
print("same")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "samples" / "skimage_chelsea.png")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip() == "same", proc.stderr
