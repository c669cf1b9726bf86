"""Layouts (NCHW, NHWC, tokens) detected from shapes, and every architecture read by its real layout.

Each model's map is compared with a Grad-CAM written here that reads the chosen layer by
the layout this file states for the family (not by camcli's detection), so a misread
tensor cannot pass. Random weights; small inputs where the model allows.
"""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import Tensor, nn
from typer.testing import CliRunner

from camcli.cli import app
from camcli.engine import Explainer, TargetSpec
from camcli.errors import MethodNotApplicable, UsageError
from camcli.methods import added_by_all, parse_methods
from camcli.models import InputSpec, resolve_layer
from camcli.models.layers import skipped_by_auto
from camcli.models.layouts import Hints, Layout, detect

CPU = torch.device("cpu")
timm = pytest.importorskip("timm")


# --- 1: detection from shapes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "size", "hints", "module", "expected"),
    [
        ((1, 512, 7, 7), (224, 224), Hints(), None, "NCHW 7x7"),
        ((1, 7, 7, 768), (224, 224), Hints(), None, "NHWC 7x7"),
        ((1, 197, 768), (224, 224), Hints(prefix=1, patch=16), None, "tokens 1+196 -> 14x14"),
        ((1, 197, 768), (224, 224), Hints(), None, "tokens 1+196 -> 14x14"),
        ((1, 198, 192), (224, 224), Hints(prefix=2), None, "tokens 2+196 -> 14x14"),
        ((1, 261, 384), (224, 224), Hints(prefix=5, patch=14), None, "tokens 5+256 -> 16x16"),
        ((1, 577, 768), (384, 384), Hints(prefix=1, patch=16), None, "tokens 1+576 -> 24x24"),  # ViT-B/16 at 384
        ((1, 141, 192), (224, 160), Hints(prefix=1, patch=16), None, "tokens 1+140 -> 14x10"),  # non-square
        ((1, 2048, 8, 8), (299, 299), Hints(), None, "NCHW 8x8"),  # Inception: border lost by unpadded convs
        ((1, 7, 7, 7), (224, 224), Hints(), nn.Conv2d(7, 7, 1), "NCHW 7x7"),  # ambiguous shape, the module decides
        ((1, 7, 7, 7), (224, 224), Hints(), nn.Linear(7, 7), "NHWC 7x7"),
    ],
)
def test_detect_reads_the_layout(shape, size, hints, module, expected) -> None:
    layout = detect(shape, size, 1, hints, module)
    assert isinstance(layout, Layout), layout
    assert layout.describe() == expected


@pytest.mark.parametrize(
    ("shape", "why"),
    [
        ((1, 6, 197, 64), "attention internal"),  # (B, heads, N, d)
        ((1, 6, 197, 197), "attention internal"),  # attention probabilities
        ((1, 1000), "vector"),
        ((64, 49, 96), "not the batch"),  # Swin's window batch
        ((1, 7, 7, 7), "refused rather than guessed"),  # C == H == W, nothing tells
        ((1, 3, 768), "no grid"),
    ],
)
def test_detect_refuses_what_is_no_map(shape, why) -> None:
    reason = detect(shape, (224, 224), 1, Hints(), nn.Identity())
    assert isinstance(reason, str) and why in reason


def test_token_layout_regrids_at_another_input_size() -> None:
    layout = detect((1, 197, 8), (224, 224), 1, Hints(prefix=1, patch=16))
    assert isinstance(layout, Layout)
    tokens = torch.arange(1 * 577 * 8, dtype=torch.float32).view(1, 577, 8)
    as_map = layout.to_map(tokens, (384, 384))
    assert as_map.shape == (1, 8, 24, 24)
    assert torch.equal(as_map[0, :, 0, 1], tokens[0, 2])  # token 1 of the grid is row 0, column 1


# --- 2: a Grad-CAM written here, reading the layer by the layout stated per family ----------------


def reference_gradcam(model: nn.Module, layer: str, x: Tensor, kind: str, prefix: int, grid: tuple[int, int]) -> Tensor:
    """relu(sum_k mean_ij(dy/dA_k) A_k) for the top class, the layer read as `kind` by hand."""
    store: dict[str, Tensor] = {}

    def hook(_: nn.Module, __: object, out: Tensor) -> None:
        out.retain_grad()
        store["a"] = out

    handle = dict(model.named_modules())[layer].register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    logits[0, logits[0].argmax()].backward()
    a, g = store["a"].detach(), store["a"].grad
    h, w = grid
    if kind == "NHWC":
        a, g = a.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
    elif kind == "tokens":
        a = a[:, prefix:].reshape(1, h, w, -1).permute(0, 3, 1, 2)
        g = g[:, prefix:].reshape(1, h, w, -1).permute(0, 3, 1, 2)
    weights = g.mean(dim=(2, 3), keepdim=True)
    return (weights * a).sum(1)[0].relu()


def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def check_model(model: nn.Module, size: int, kind: str, prefix: int) -> None:
    """camcli's auto layer has the stated layout and its Grad-CAM equals the hand-read one."""
    model.eval()
    for module in model.modules():  # a fresh torchvision ViT's head is all zeros: no gradient at all
        if isinstance(module, nn.Linear) and not module.weight.any():
            nn.init.normal_(module.weight, std=0.02, generator=torch.Generator().manual_seed(0))
    spec = InputSpec(size, (0.5,) * 3, (0.5,) * 3)
    info = resolve_layer(model, "auto", spec, CPU)
    modules = dict(model.named_modules())
    assert not skipped_by_auto(info.name, modules) and not isinstance(modules[info.name], nn.AdaptiveAvgPool2d)
    assert (info.layout.kind, info.layout.prefix) == (kind, prefix), info.layout.describe()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.enable_grad():
        expected = reference_gradcam(model, info.name, x, kind, prefix, info.spatial)
    explainer = Explainer(model, info, parse_methods("gradcam"), channels_last=False)
    (result,) = explainer.explain(x, TargetSpec()).explanations
    assert result.maps.shape[-2:] == expected.shape
    assert expected.amax() > 0, "reference map is flat"
    assert pearson(result.maps[0], expected) >= 0.98


# (timm name, create_model kwargs, input size, layout, prefix): small variants, small inputs where allowed
TIMM_FAST = [
    ("resnet18", {}, 64, "NCHW", 0),
    ("vit_tiny_patch16_224", {"img_size": 64}, 64, "tokens", 1),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64}, 64, "tokens", 2),
    ("mambaout_femto", {}, 64, "NHWC", 0),
]
TIMM_SLOW = [
    ("efficientnet_b0", {}, 224, "NCHW", 0),
    ("convnext_atto", {}, 224, "NCHW", 0),
    ("mobilevit_xxs", {}, 256, "NCHW", 0),  # hybrid
    ("vit_tiny_r_s16_p8_224", {}, 224, "tokens", 1),  # ResNet-ViT hybrid
    ("vit_small_patch14_reg4_dinov2", {"img_size": 224}, 224, "tokens", 5),  # class + 4 registers
    ("eva02_tiny_patch14_224", {}, 224, "tokens", 1),
    ("vit_tiny_patch16_224", {"global_pool": "avg"}, 224, "tokens", 1),  # ViT-GAP
    ("beit_base_patch16_224", {}, 224, "tokens", 1),
    ("swin_tiny_patch4_window7_224", {}, 224, "NHWC", 0),
    ("nest_tiny", {}, 224, "NHWC", 0),
    ("maxvit_nano_rw_256", {}, 256, "NCHW", 0),
    ("coatnet_nano_rw_224", {}, 224, "NCHW", 0),
    ("pit_ti_224", {}, 224, "tokens", 1),
    ("pit_ti_distilled_224", {}, 224, "tokens", 2),
    ("xcit_nano_12_p16_224", {}, 224, "tokens", 1),
    ("crossvit_tiny_240", {}, 240, "tokens", 1),
    ("cait_xxs24_224", {}, 224, "tokens", 1),
    ("hiera_tiny_224", {}, 224, "tokens", 0),  # only its last stage is in raster order
]


@pytest.mark.parametrize(("name", "kwargs", "size", "kind", "prefix"), TIMM_FAST, ids=[r[0] for r in TIMM_FAST])
def test_timm_family_fast(name, kwargs, size, kind, prefix) -> None:
    check_model(timm.create_model(name, pretrained=False, **kwargs), size, kind, prefix)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kwargs", "size", "kind", "prefix"), TIMM_SLOW, ids=[r[0] for r in TIMM_SLOW])
def test_timm_family(name, kwargs, size, kind, prefix) -> None:
    check_model(timm.create_model(name, pretrained=False, **kwargs), size, kind, prefix)


def _torchvision_cases() -> list:
    cases = []
    for name in sorted(torchvision.models.list_models(module=torchvision.models)):
        kwargs: dict = {}
        size, kind, prefix = 64, "NCHW", 0
        if name.startswith("vit_"):
            size, kind, prefix = (56 if name.endswith("14") else 64), "tokens", 1
            kwargs = {"image_size": size}
        elif name.startswith("maxvit"):
            size = 224  # its 7x7 partitions need 224
        elif name in {"googlenet", "inception_v3"}:
            kwargs = {"aux_logits": False, "init_weights": True}
            size = 75 if name == "inception_v3" else 128
        if name.startswith("shufflenet") or name == "googlenet":
            size = 128  # at 64 px their random-weight 2x2 Grad-CAM is all zero after the ReLU: nothing to compare
        case = (name, kwargs, size, kind, prefix)  # swin: torchvision permutes its NHWC norm to NCHW to pool
        fast = name in {"resnet18", "mobilenet_v3_small"}  # vit_b_16, swin_t: the -m all tests below
        cases.append(pytest.param(*case, id=name, marks=() if fast else pytest.mark.slow))
    return cases


@pytest.mark.parametrize(("name", "kwargs", "size", "kind", "prefix"), _torchvision_cases())
def test_torchvision_model(name, kwargs, size, kind, prefix) -> None:
    check_model(torchvision.models.get_model(name, weights=None, **kwargs), size, kind, prefix)


@pytest.mark.slow
def test_levit_auto_layer_is_its_last_token_stage() -> None:
    """LeViT: the layout only. With random weights its Grad-CAM, camcli's and the hand-read one
    alike, is constant over the 4x4 grid, so a Pearson comparison is undefined there."""
    model = timm.create_model("levit_128s", pretrained=False).eval()
    info = resolve_layer(model, "auto", InputSpec(224, (0.5,) * 3, (0.5,) * 3), CPU)
    assert (info.layout.kind, info.layout.prefix, info.spatial) == ("tokens", 0, (4, 4)), info.layout.describe()
    assert not skipped_by_auto(info.name, dict(model.named_modules()))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "size", "grid"), [("vit_base_patch16_224", 224, 14), ("vit_base_patch16_384", 384, 24)]
)
def test_vit_b16_at_224_and_384(name, size, grid) -> None:
    model = timm.create_model(name, pretrained=False)
    info = resolve_layer(model.eval(), "auto", InputSpec(size, (0.5,) * 3, (0.5,) * 3), CPU)
    assert info.spatial == (grid, grid) and info.name == "blocks.11.norm1"
    check_model(model, size, "tokens", 1)


@pytest.mark.parametrize(
    ("name", "kwargs", "size"),
    [("vit_tiny_patch16_224", {"img_size": 64}, 64), ("mambaout_femto", {}, 128)],
    ids=["tokens", "NHWC"],
)
def test_gradients_at_extra_inputs_are_read_by_the_layout(name, kwargs, size) -> None:
    """Smooth Grad-CAM++ takes the layer's gradients at noisy copies (a second hooked pass):
    with no noise its copies are the image, so its map is Grad-CAM++'s, on any layout."""
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    info = resolve_layer(model, "auto", InputSpec(size, (0.5,) * 3, (0.5,) * 3), CPU)
    assert info.layout.kind != "NCHW"
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    methods = parse_methods("gradcam++,smoothgradcam++", {"smoothgradcam++.samples": 2, "smoothgradcam++.noise": 0.0})
    plain, smooth = Explainer(model, info, methods, channels_last=False).explain(x, TargetSpec()).explanations
    assert not bool(plain.flat.any())
    torch.testing.assert_close(smooth.maps, plain.maps, rtol=1e-4, atol=1e-5)


# --- 3: a class-token ViT: after its last attention the map is flat, and auto avoids it ----------


def test_class_token_vit_layers_after_last_attention_are_flat() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    spec = InputSpec(64, (0.5,) * 3, (0.5,) * 3)
    auto = resolve_layer(model, "auto", spec, CPU)
    assert auto.name == "blocks.11.norm1"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for late in ("blocks.11.attn", "blocks.11.norm2", "blocks.11", "norm"):
        info = resolve_layer(model, late, spec, CPU)
        (result,) = Explainer(model, info, parse_methods("gradcam")).explain(x, TargetSpec()).explanations
        assert bool(result.flat.all()), f"{late}: only the class token gets gradient, the map must be flat"
    (result,) = Explainer(model, auto, parse_methods("gradcam")).explain(x, TargetSpec()).explanations
    assert not bool(result.flat.any())


def test_named_attention_internal_is_refused() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    with pytest.raises(UsageError, match="attention internal"):
        resolve_layer(model, "blocks.11.attn.k_norm", InputSpec(64, (0.5,) * 3, (0.5,) * 3), CPU)


# --- 4: -m all skips what does not apply; a method named explicitly still refuses ----------------


def test_all_skips_methods_that_do_not_apply() -> None:
    model = torchvision.models.vit_b_16(weights=None, image_size=32).eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)  # fresh: all zeros
    info = resolve_layer(model, "auto", InputSpec(32, (0.5,) * 3, (0.5,) * 3), CPU)
    explainer = Explainer(model, info, parse_methods("all"), optional=added_by_all("all"))
    skipped = dict(explainer.skipped)
    assert set(skipped) == {"cam", "guided-backprop", "guided-gradcam", "deconvnet"}
    assert "GELU" in skipped["guided-backprop"]
    assert "gradcam" in [m.name for m in explainer.methods]
    with pytest.raises(MethodNotApplicable, match="GELU"):
        Explainer(model, info, parse_methods("all,guided-backprop"), optional=added_by_all("all,guided-backprop"))


def test_cli_all_on_a_transformer_records_skips_grid_and_layout(tmp_path, samples_dir) -> None:
    result = CliRunner().invoke(
        app,
        ["explain", str(samples_dir / "skimage_chelsea.png"), "--model", "swin_t", "--weights", "none"]
        + ["--input-size", "64", "-m", "all", "-o", str(tmp_path), "-q"],
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("-m all: skipped") == 1
    record = json.loads((tmp_path / "skimage_chelsea.png.json").read_text())
    assert {s["method"] for s in record["request"]["skipped_methods"]} == {
        "guided-backprop",
        "guided-gradcam",
        "deconvnet",
        "legrad",  # the attention methods read ViT/DeiT blocks; Swin's windows are not read
        "rollout",
        "grad-rollout",
    }
    gradcam = next(e for e in record["explanations"] if e["method"] == "gradcam")
    assert gradcam["grid"] == [2, 2] and gradcam["layout"] == "NCHW 2x2"
    refused = CliRunner().invoke(
        app,
        ["explain", str(samples_dir / "skimage_chelsea.png"), "--model", "swin_t", "--weights", "none"]
        + ["--input-size", "64", "-m", "guided-backprop", "-o", str(tmp_path / "b")],
    )
    assert refused.exit_code == 2


# --- 5: Hugging Face transformers' shapes (tiny models built from a config) ------------------------


class _Logits(nn.Module):
    """A transformers classifier returning its logits tensor (what issue 12's `hf:` source adapts)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.config = net.config

    def forward(self, x: Tensor) -> Tensor:
        return self.net(pixel_values=x).logits


def test_hugging_face_vit_and_swin_layouts() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=5,
        )
    )
    check_model(_Logits(vit), 32, "tokens", 1)
    info = resolve_layer(_Logits(vit).eval(), "auto", InputSpec(32, (0.5,) * 3, (0.5,) * 3), CPU)
    assert info.name.endswith(".1.layernorm_before"), info.name  # the last layer's first norm
    swin = transformers.SwinForImageClassification(
        transformers.SwinConfig(
            image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=2, num_labels=5
        )
    )
    check_model(_Logits(swin), 32, "tokens", 0)
