"""Issue 18: `--fuse product` against pytorch-grad-cam's RefineCAM and by hand, and the
`--layer fine` stage finder on CNN, Swin (NHWC) and plain ViT (token) layouts."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typer.testing import CliRunner

from camcli.cli import app
from camcli.engine import Explainer, TargetSpec, _fuse, normalise
from camcli.errors import UsageError
from camcli.methods import parse_methods
from camcli.models import (
    InputSpec,
    find_fine_partner,
    grid_sequence,
    load_model,
    resolve_fine,
    resolve_layer,
    resolve_layers,
    trace_forward,
)

CPU = torch.device("cpu")


def pearson(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    assert x.std() > 0 and y.std() > 0
    return float(np.corrcoef(x, y)[0, 1])


def upsample(maps: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, Tensor, InputSpec]:
    # 128 px: layer3 8x8, layer4 4x4. camcli multiplies at the finest layer's grid, RefineCAM
    # after resizing each map to the input; on a 4x4/2x2 pair (64 px) that alone costs ~2 %
    # of Pearson, from 8x8 on it is below 0.5 % (0.996 at 128 px, 0.999 at 224 px).
    torch.manual_seed(0)
    loaded = load_model("resnet18", "none", input_size=128)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    return loaded.model, x, loaded.input


# --- --fuse ------------------------------------------------------------------------------------


def test_product_fusion_by_hand() -> None:
    coarse = torch.tensor([[[0.0, 1.0], [0.5, 0.25]]])
    fine = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0))
    fine = (fine - fine.min()) / (fine.max() - fine.min())
    flat = torch.zeros(1, dtype=torch.bool)
    fused, is_flat = _fuse([(coarse, flat), (fine, flat)], "product")
    expected = upsample(coarse, (4, 4)) * fine
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    torch.testing.assert_close(fused, expected)
    assert not is_flat.any()
    mean, _ = _fuse([(coarse, flat), (fine, flat)], "mean")
    torch.testing.assert_close(mean, normalise((upsample(coarse, (4, 4)) + fine) / 2)[0])


def test_product_with_a_flat_layer_is_flat() -> None:
    zeros, ones = torch.zeros(1, 2, 2), torch.rand(1, 4, 4)
    fused, flat = _fuse(
        [(zeros, torch.ones(1, dtype=torch.bool)), (normalise(ones)[0], torch.zeros(1, dtype=torch.bool))], "product"
    )
    assert flat.all() and (fused == 0).all()


@pytest.mark.parametrize(("method", "reference"), [("gradcam++", "GradCAMPlusPlus"), ("layercam", "LayerCAM")])
def test_product_fusion_matches_refinecam(resnet, method: str, reference: str) -> None:
    """RefineCAM (pytorch-grad-cam 1.5.7, arXiv 2605.14641): per layer the base method's map,
    relu, min-max and resized to the input; their product, min-max again."""
    grad_cam = pytest.importorskip("pytorch_grad_cam")
    if not hasattr(grad_cam, "RefineCAM"):
        pytest.skip("this pytorch-grad-cam has no RefineCAM")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, x, spec = resnet
    infos = [resolve_layer(model, name, spec, CPU) for name in ("layer3", "layer4")]
    result = Explainer(model, infos, parse_methods(method), fuse="product").explain(x, TargetSpec())
    (explanation,) = result.explanations
    assert explanation.layer == "layer3,layer4"
    mine = upsample(explanation.maps, x.shape[-2:])
    copied = copy.deepcopy(model)
    refine = grad_cam.RefineCAM(copied, [copied.layer3, copied.layer4], base_method=getattr(grad_cam, reference))
    targets = [ClassifierOutputTarget(int(c)) for c in explanation.targets]
    theirs = refine(input_tensor=x.clone(), targets=targets)
    for i in range(2):
        assert pearson(mine[i], theirs[i]) >= 0.99, (method, i)
    # and it is not the mean: the two rules differ on these maps
    mean = Explainer(model, infos, parse_methods(method), fuse="mean").explain(x, TargetSpec()).explanations[0]
    assert not torch.allclose(mean.maps, explanation.maps, atol=1e-3)


def test_unknown_fusion_is_refused(resnet) -> None:
    model, _, spec = resnet
    with pytest.raises(UsageError, match="unknown fusion"):
        Explainer(model, resolve_layer(model, "layer4", spec, CPU), parse_methods("gradcam"), fuse="max")


# --- the stage finder ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "auto", "partner"),
    [
        ("efficientnet_lite0", "_head_act", "_blocks.10"),  # _blocks.11's expand conv is 14x14 too: mid-block
        ("resnet50", "layer4", "layer3"),  # layer4.0.conv1 (1x1, stride 1) is 14x14: mid-block
        ("efficientnet_b0", "features", "features.5"),  # stages nested inside the auto layer
    ],
)
def test_fine_finds_the_stage_of_twice_the_resolution(model: str, auto: str, partner: str) -> None:
    loaded = load_model(model, None if model == "efficientnet_lite0" else "none", input_size=96)
    fine = resolve_fine(loaded.model, loaded.input, CPU)
    assert (fine.auto, fine.partner, fine.reason) == (auto, partner, None)
    trace = trace_forward(loaded.model, loaded.input, CPU)
    grids = dict(grid_sequence(trace, dict(loaded.model.named_modules())))
    assert grids[partner] == (6, 6) and grids[auto] == (3, 3)
    infos = resolve_layers(loaded.model, "fine", loaded.input, CPU)
    assert [i.name for i in infos] == [partner, auto]
    assert [i.name for i in resolve_layers(loaded.model, f"fine,{auto},auto", loaded.input, CPU)] == [partner, auto]


@pytest.mark.parametrize(
    ("model", "auto", "partner"), [("efficientnet_lite0", "_head_act", "_blocks.10"), ("resnet18", "layer4", "layer3")]
)
def test_fine_at_an_input_size_whose_stages_round_up(model: str, auto: str, partner: str) -> None:
    """At 80 px the stride-16 stage is 5x5 and the last one ceil(5 / 2) = 3x3 (Lite0 at 240 px:
    15 and 8): the finer stage is 2n - 1, not 2n, and fine must still find it."""
    loaded = load_model(model, None if model == "efficientnet_lite0" else "none", input_size=80)
    fine = resolve_fine(loaded.model, loaded.input, CPU)
    assert (fine.auto, fine.partner, fine.reason) == (auto, partner, None)
    grids = dict(grid_sequence(trace_forward(loaded.model, loaded.input, CPU), dict(loaded.model.named_modules())))
    assert grids[partner] == (5, 5) and grids[auto] == (3, 3)


def test_fine_accepts_a_side_halved_either_way_and_nothing_else() -> None:
    # 2x2 patch merging floors (7 -> 3), "SAME" rounds up (15 -> 8); each axis on its own
    assert find_fine_partner([("s3", (7, 16)), ("s4", (3, 8))], "s4") == ("s3", None)
    assert find_fine_partner([("s3", (15, 20)), ("s4", (8, 10))], "s4") == ("s3", None)
    for far in [(18, 20), (14, 10), (9, 10)]:  # 2n + 2, the same side, and a stage of 1.1x
        partner, reason = find_fine_partner([("s3", far), ("s4", (8, 10))], "s4")
        assert partner is None and "16x20 grid" in reason, far


def test_fine_on_swin_stages_read_as_nhwc() -> None:
    """timm's Swin stages output (B, H, W, C); read that way, the finder picks the third stage
    (PatchMerging at the start of stage 4 belongs to the 7x7 stage)."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 1, 1, 1)
    )
    trace = trace_forward(model, InputSpec(224, (0.5,) * 3, (0.5,) * 3), CPU)

    def nhwc(name: str, output: Tensor) -> tuple[int, int] | None:
        return (int(output.shape[1]), int(output.shape[2])) if output.ndim == 4 and name.startswith("layers") else None

    grids = grid_sequence(trace, dict(model.named_modules()), nhwc)
    assert dict(grids)["layers.3"] == (7, 7)
    assert find_fine_partner(grids, "layers.3") == ("layers.2", None)


def test_fine_on_a_plain_vit_says_there_is_no_finer_stage() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3)
    trace = trace_forward(model, InputSpec(224, (0.5,) * 3, (0.5,) * 3), CPU)
    grid = tuple(model.patch_embed.grid_size)
    prefix = model.num_prefix_tokens

    def tokens(name: str, output: Tensor) -> tuple[int, int] | None:
        if output.ndim == 4:  # the patch embedding's convolution
            return (int(output.shape[2]), int(output.shape[3])) if name == "patch_embed.proj" else None
        return grid if output.ndim == 3 and output.shape[1] == prefix + grid[0] * grid[1] else None

    grids = grid_sequence(trace, dict(model.named_modules()), tokens)
    assert {g for _, g in grids} == {(14, 14)} and "blocks.2" in dict(grids)
    partner, reason = find_fine_partner(grids, "blocks.2")
    assert partner is None and "same 14x14 grid" in reason


def test_fine_without_a_finer_stage() -> None:
    grids = [("a", (28, 28)), ("b", (7, 7))]
    partner, reason = find_fine_partner(grids, "b")
    assert partner is None and "14x14" in reason


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_fine_product_and_layers(tmp_path, samples_dir) -> None:
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "explain",
            str(samples_dir / "skimage_coffee.png"),
            "--layer",
            "fine",
            "--fuse",
            "product",
            "-o",
            str(out),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "skimage_coffee.png.json").read_text())
    assert record["explanations"][0]["layer"] == "_blocks.10,_head_act"
    assert record["request"]["fuse"] == "product"
    bad = runner.invoke(app, ["explain", str(samples_dir), "--fuse", "max", "-o", str(out)])
    assert bad.exit_code == 2 and "--fuse" in bad.output
    listing = runner.invoke(app, ["layers", "--depth", "1"])
    assert listing.exit_code == 0
    assert "--layer fine = _blocks.10 + _head_act" in listing.output
    assert any(
        line.strip().startswith("_blocks.10") and line.endswith("<- fine") for line in listing.output.splitlines()
    )
    data = json.loads(runner.invoke(app, ["layers", "--json"]).output)
    assert data["fine"] == {"layers": ["_blocks.10", "_head_act"], "reason": None}
    assert [r["name"] for r in data["layers"] if r["fine"]] == ["_blocks.10"]


@pytest.mark.parametrize(
    ("name", "size", "expected"),
    [
        ("swin_t", 224, ("features.5", "permute")),  # NHWC stages, a direct child of a Sequential of stages
        ("convnext_tiny", 64, ("features.5", "features")),  # not the norm that opens the next downsample
        ("resnet18", 64, ("layer3", "layer4")),
    ],
)
def test_fine_finds_the_stage_output_in_torchvision_families(name: str, size: int, expected: tuple[str, str]) -> None:
    import torchvision

    from camcli.models import InputSpec, resolve_fine

    model = torchvision.models.get_model(name, weights=None).eval()
    fine = resolve_fine(model, InputSpec(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), torch.device("cpu"))
    assert tuple(fine.names) == expected
