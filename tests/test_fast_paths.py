"""Speed-ups are exact: every fast path gives the result of its plain definition."""

from __future__ import annotations

import copy
import io
import json

import cv2
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from typer.testing import CliRunner

from camcli.cli import app
from camcli.engine import Explainer, TargetSpec, stack_to_device
from camcli.io import OVERLAY_FORMATS, decode_image, encode_image
from camcli.methods import parse_methods
from camcli.models import InputSpec, resolve_layer
from camcli.render import colormap_lut, comparison_grid, heatmap_at_size, overlay, tile_grid

CPU = torch.device("cpu")
GRADIENT_METHODS = "cam,gradcam,gradcam++,guided-backprop,guided-gradcam"


@pytest.mark.parametrize(
    ("name", "size", "layer", "methods", "topk"),
    [
        ("resnet18", 64, "auto", GRADIENT_METHODS, 2),
        ("mobilenet_v2", 64, "auto", GRADIENT_METHODS, 1),
        ("resnet18", 32, "layer3", "scorecam", 1),  # 256 channels: 2 x 256 masked forwards
    ],
)
def test_channels_last_changes_no_map(name: str, size: int, layer: str, methods: str, topk: int) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    spec = InputSpec(size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    info = resolve_layer(model, layer, spec, CPU)
    x = torch.randn(2, 3, size, size)
    fast = Explainer(copy.deepcopy(model), info, parse_methods(methods), chunk_size=128, channels_last=True)
    plain = Explainer(copy.deepcopy(model), info, parse_methods(methods), chunk_size=128, channels_last=False)
    with fast.session():  # channels_last only while the engine runs: the model is the caller's
        assert next(fast.model.parameters()).is_contiguous(memory_format=torch.channels_last)
        ours = fast.explain(x, TargetSpec(topk=topk))
    assert not next(fast.model.parameters()).is_contiguous(memory_format=torch.channels_last)
    reference = plain.explain(x, TargetSpec(topk=topk))
    torch.testing.assert_close(ours.logits, reference.logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(ours.explanations, reference.explanations, strict=True):
        assert (a.method, a.rank) == (b.method, b.rank)
        assert torch.equal(a.targets, b.targets)
        scale = b.maps.abs().amax().clamp(min=1e-12)
        torch.testing.assert_close(a.maps / scale, b.maps / scale, atol=1e-4, rtol=0, msg=a.method)


def _tiny_torchvision_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=10).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises it
    return model


def _mobilenet_with_trained_like_norms() -> torch.nn.Module:
    """A fresh BatchNorm is the identity (mean 0, var 1, weight 1, bias 0): give it statistics."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize(
    ("build", "size", "layer", "methods"),
    [
        (_tiny_torchvision_vit, 32, "auto", "gradcam,gradcam++,layercam,smoothgradcam++"),  # MHA after the layer
        (_mobilenet_with_trained_like_norms, 64, "fine", "gradcam,gradcam++,layercam"),
    ],
    ids=["vit-mha", "mobilenet-bn-fine"],
)
def test_the_lean_graph_changes_no_map(monkeypatch, build, size, layer, methods) -> None:
    """The graph from the layer on runs eval BN as a multiply-add and MHA's in-projection as
    one matmul (`_LeanGraph`); the maps are those of plain autograd on the model as it is."""
    import contextlib

    import camcli.engine as engine
    from camcli.models import resolve_layers

    model = build()
    spec = InputSpec(size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    layers = resolve_layers(model, layer, spec, CPU)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    lean = Explainer(model, layers, parse_methods(methods)).explain(x, TargetSpec(topk=2))
    with monkeypatch.context() as patch:
        patch.setattr(engine, "lean_graph_from", lambda modules, folds=None: contextlib.nullcontext())
        plain = Explainer(model, layers, parse_methods(methods)).explain(x, TargetSpec(topk=2))
    torch.testing.assert_close(lean.logits, plain.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(lean.explanations, plain.explanations, strict=True):
        assert (a.method, a.rank) == (b.method, b.rank) and torch.equal(a.targets, b.targets)
        assert not bool(b.flat.all()), a.method
        torch.testing.assert_close(a.maps, b.maps, atol=1e-4, rtol=0, msg=a.method)


@pytest.mark.parametrize("colormap", ["jet", "gray", "viridis"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_overlay_equals_the_float_blend(colormap: str, alpha: float) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    heat = rng.random((37, 53), dtype=np.float32)
    heat[0, :3] = [0.0, 1.0, 0.5]
    index = np.clip(np.rint(heat * 255.0), 0, 255).astype(np.uint8)
    definition = (1.0 - alpha) * image + alpha * colormap_lut(colormap)[index].astype(np.float64)
    ours = overlay(image, heat, colormap, alpha)
    assert ours.dtype == np.uint8 and ours.shape == image.shape
    assert np.abs(ours - definition).max() <= 0.5 + 1e-6  # rounding to nearest, ties either way


@pytest.mark.parametrize("fmt", sorted(OVERLAY_FORMATS))
def test_overlay_format(tmp_path, samples_dir, fmt: str) -> None:
    image = samples_dir / "skimage_coffee.png"
    args = ["explain", str(image), "-o", str(tmp_path), "-q", "--overlay-format", fmt]
    args += ["--model", "resnet18", "--weights", "none", "--input-size", "64"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["skimage_coffee.png.gradcam." + fmt, "skimage_coffee.png.json"]
    picture = cv2.imread(str(tmp_path / written[0]))
    assert picture.shape == (400, 600, 3)
    expected = {"png": b"\x89PNG", "jpg": b"\xff\xd8\xff", "webp": b"RIFF"}[fmt]
    assert (tmp_path / written[0]).read_bytes().startswith(expected)


def test_png_overlays_are_lossless(samples_dir) -> None:
    """The fast PNG encoder (fpng) loses nothing, on a photo overlay, a grid with flat
    gutters, flat tiles and a 1x1 picture; two independent decoders (libpng through cv2,
    Pillow, which checks every chunk's CRC) read back the same pixels."""
    photo = cv2.resize(decode_image(samples_dir / "skimage_chelsea.png"), (640, 480))
    heat = heatmap_at_size(np.random.default_rng(0).random((7, 7), dtype=np.float32), 640, 480)
    picture = overlay(photo, heat)
    tiles = np.random.default_rng(1).integers(0, 256, (16, 7, 7, 3), dtype=np.uint8)
    grid = comparison_grid([[(photo, "image", ""), (picture, "gradcam", "0.5")]])
    for image in (picture, grid, tile_grid(tiles), picture[::7, ::5], tiles[0, :1, :1]):
        data = encode_image(image)
        assert data.startswith(b"\x89PNG")
        back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert np.array_equal(cv2.cvtColor(back, cv2.COLOR_BGR2RGB), image)
        with Image.open(io.BytesIO(data)) as decoded:
            decoded.verify()
        with Image.open(io.BytesIO(data)) as decoded:
            assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), image)


def test_stack_to_device_on_the_cpu_is_a_plain_stack() -> None:
    tensors = [torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    batch = stack_to_device(tensors, CPU)
    assert torch.equal(batch, torch.stack(tensors)) and batch.device == CPU and not batch.is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_stack_to_device_on_cuda_pins_and_copies_the_same_values() -> None:
    tensors = [torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    batch = stack_to_device(tensors, torch.device("cuda"))
    assert batch.is_cuda and torch.equal(batch.cpu(), torch.stack(tensors))


def test_scorecam_top_scores_only_the_strongest_channels() -> None:
    """--scorecam-top N: N >= K gives the exact map; N = 1 gives the one channel with the
    largest mean activation, weighted by its own masked score (a map proportional to it)."""
    from camcli.methods.scorecam import ScoreCAM

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    spec = InputSpec(size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    info = resolve_layer(model, "layer2", spec, CPU)  # 128 channels at 4x4
    x = torch.randn(2, 3, 32, 32)

    def maps(top: int | None) -> torch.Tensor:
        explainer = Explainer(copy.deepcopy(model), info, [ScoreCAM(top=top)], chunk_size=256)
        return explainer.explain(x, TargetSpec()).explanations[0].maps

    torch.testing.assert_close(maps(128), maps(None))
    acts = {}
    handle = dict(model.named_modules())["layer2"].register_forward_hook(lambda _m, _i, o: acts.setdefault("a", o))
    with torch.inference_mode():
        model(x)
    handle.remove()
    strongest = acts["a"].mean((2, 3)).argmax(1)
    expected = acts["a"][torch.arange(2), strongest]
    lo, hi = expected.amin((1, 2), keepdim=True), expected.amax((1, 2), keepdim=True)
    torch.testing.assert_close(maps(1), (expected - lo) / (hi - lo), atol=1e-5, rtol=0)


def test_scorecam_top_option_reaches_the_method_and_the_request(tmp_path, samples_dir) -> None:
    args = ["explain", str(samples_dir / "skimage_coffee.png"), "-o", str(tmp_path), "-q", "-m", "scorecam"]
    args += ["--model", "resnet18", "--weights", "none", "--input-size", "64", "--scorecam-top", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "skimage_coffee.png.json").read_text())
    assert record["request"]["method_options"] == {"scorecam.top": 3}
    again = CliRunner().invoke(app, args[:-1] + ["4"])  # another N: the image is redone, not skipped
    assert again.exit_code == 0, again.output
    record = json.loads((tmp_path / "skimage_coffee.png.json").read_text())
    assert record["request"]["method_options"] == {"scorecam.top": 4}
