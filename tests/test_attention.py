"""The attention methods (LeGrad, attention rollout, gradient-weighted rollout) against
torchcam 0.5.0's LeGrad and against maps computed by hand in this file: each tiny ViT is
run block by block from its own weights (q, k, v, softmax written out here, not camcli's
capture), the attentions and their gradients taken from that hand forward. Also: the model
is exactly as before after a call (hooks, flags, forward attributes), also after an
exception; per-sample targets in a batch; refusals by name; non-square grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torchvision.models import VisionTransformer

from camcli.attention import capture_attention, find_transformer
from camcli.engine import Explainer, TargetSpec, normalise
from camcli.errors import MethodNotApplicable
from camcli.methods import get_method, list_methods, parse_methods
from camcli.methods.rollout import Rollout
from camcli.models import LayerInfo

timm = pytest.importorskip("timm")
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

METHODS = ("legrad", "rollout", "grad-rollout")


def pearson(a: Tensor, b: Tensor) -> float:
    x, y = a.double().flatten().numpy(), b.double().flatten().numpy()
    assert x.std() > 0 and y.std() > 0
    return float(np.corrcoef(x, y)[0, 1])


def randomise_heads(model: nn.Module) -> nn.Module:
    """torchvision zero-initialises the classifier (every gradient would vanish)."""
    torch.manual_seed(1)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith(("heads", "head")):
            nn.init.normal_(module.weight, std=0.5)
    return model.eval()


def tv_vit(image: int = 32, patch: int = 8, layers: int = 2, heads: int = 2, dim: int = 16) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(image, patch, layers, heads, dim, 2 * dim, num_classes=10)
    return randomise_heads(model)


def timm_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    cls = kwargs.pop("cls", TimmViT)
    args = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10)
    return randomise_heads(cls(**{**args, **kwargs}))


def explainer(model: nn.Module, methods: str) -> Explainer:
    """The attention methods read no layer; the Explainer is given one (any module) as for saliency."""
    name = next(n for n, _ in model.named_modules() if n)
    info = LayerInfo(name, False, 1, (1, 1), 10, None)
    return Explainer(model, info, parse_methods(methods), channels_last=False)


def maps_of(result, method: str, rank: int = 0) -> Tensor:
    (found,) = [e for e in result.explanations if e.method == method and e.rank == rank]
    assert found.layer is None
    return found.maps


# --- the hand forward: attention from the module weights -------------------------------------------


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    probs = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    return probs, probs @ v


def by_hand_torchvision(model: VisionTransformer, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """logits, per-block attentions and per-block outputs of a torchvision ViT, written out."""
    n = x.shape[0]
    tokens = model.conv_proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.class_token.expand(n, -1, -1), tokens], 1) + model.encoder.pos_embedding
    attentions, outputs = [], []
    for block in model.encoder.layers:
        mha = block.self_attention
        h = block.ln_1(tokens)
        dim, heads = h.shape[-1], mha.num_heads
        q, k, v = (
            (h @ w.T + b).view(n, -1, heads, dim // heads).transpose(1, 2)
            for w, b in zip(mha.in_proj_weight.split(dim), mha.in_proj_bias.split(dim), strict=True)
        )
        probs, mixed = _attend(q, k, v, 1 / math.sqrt(dim // heads))
        attentions.append(probs)
        tokens = tokens + mha.out_proj(mixed.transpose(1, 2).reshape(n, -1, dim))
        tokens = tokens + block.mlp(block.ln_2(tokens))
        outputs.append(tokens)
    logits = model.heads(model.encoder.ln(tokens)[:, 0])
    return logits, attentions, outputs


def by_hand_timm(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The same for timm's ViT / DeiT (embedding and head by timm, every block written out)."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    attentions, outputs = [], []
    for block in model.blocks:
        attn = block.attn
        h = block.norm1(tokens)
        n, count, dim = h.shape
        q, k, v = attn.qkv(h).view(n, count, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        probs, mixed = _attend(attn.q_norm(q), attn.k_norm(k), v, attn.head_dim**-0.5)
        attentions.append(probs)
        tokens = tokens + block.ls1(attn.proj(attn.norm(mixed.transpose(1, 2).reshape(n, count, dim))))
        tokens = tokens + block.ls2(block.mlp(block.norm2(tokens)))
        outputs.append(tokens)
    logits = model.forward_head(model.norm(tokens))
    return logits, attentions, outputs


def rollout_by_hand(attentions: list[Tensor], prefix: int, grid: tuple[int, int]) -> Tensor:
    """Abnar & Zuidema in float64, one sample at a time: R = prod (0.5 mean_h A + 0.5 I), row 0."""
    maps = []
    for b in range(attentions[0].shape[0]):
        rolled = np.eye(attentions[0].shape[-1])
        for probs in attentions:
            w = 0.5 * probs[b].detach().double().numpy().mean(0) + 0.5 * np.eye(rolled.shape[0])
            rolled = (w / w.sum(1, keepdims=True)) @ rolled
        maps.append(torch.from_numpy(rolled[0, prefix:]).view(grid))
    return torch.stack(maps)


def grad_rollout_by_hand(
    attentions: list[Tensor], gradients: list[Tensor], prefix: int, grid: tuple[int, int]
) -> Tensor:
    """Chefer et al. in float64: R = I; R += mean_h (grad * A)^+ R per block; row 0."""
    maps = []
    for b in range(attentions[0].shape[0]):
        relevance = np.eye(attentions[0].shape[-1])
        for probs, grad in zip(attentions, gradients, strict=True):
            a, g = probs[b].detach().double().numpy(), grad[b].double().numpy()
            relevance = relevance + np.clip(g * a, 0, None).mean(0) @ relevance
        maps.append(torch.from_numpy(relevance[0, prefix:]).view(grid))
    return torch.stack(maps)


def legrad_by_hand(
    outputs: list[Tensor], attentions: list[Tensor], score, targets: Tensor, prefix: int, grid: tuple[int, int]
) -> Tensor:
    """LeGrad: for each block, d(own score)/d(own attention), relu, mean over heads and queries."""
    per_block = []
    for tokens, probs in zip(outputs, attentions, strict=True):
        (grad,) = torch.autograd.grad(score(tokens).gather(1, targets[:, None]).sum(), probs, retain_graph=True)
        per_block.append(grad.clamp(min=0).mean(dim=(1, 2))[:, prefix:])
    return torch.stack(per_block).mean(0).view(-1, *grid)


def hand_maps(model: nn.Module, x: Tensor, family: str) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """logits and the three maps, min-max normalised as the engine does, for top-1 targets."""
    forward = by_hand_torchvision if family == "torchvision" else by_hand_timm
    logits, attentions, outputs = forward(model, x)
    prefix = 1 if family == "torchvision" else model.num_prefix_tokens
    patch = model.patch_size if family == "torchvision" else model.patch_embed.patch_size[0]
    grid = (x.shape[-2] // patch, x.shape[-1] // patch)
    targets = logits.argmax(1)
    if family == "torchvision":

        def score(tokens: Tensor) -> Tensor:
            return model.heads(model.encoder.ln(tokens.mean(1)))
    else:

        def score(tokens: Tensor) -> Tensor:
            pooled = model.fc_norm(model.norm(tokens.mean(1)))
            if isinstance(model, VisionTransformerDistilled):
                return (model.head(pooled) + model.head_dist(pooled)) / 2
            return model.head(pooled)

    legrad = legrad_by_hand(outputs, attentions, score, targets, prefix, grid)
    gradients = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), attentions)
    maps = {
        "legrad": legrad,
        "rollout": rollout_by_hand(attentions, prefix, grid),
        "grad-rollout": grad_rollout_by_hand(attentions, list(gradients), prefix, grid),
    }
    return logits.detach(), {name: normalise(m.float())[0] for name, m in maps.items()}, targets


# --- against the hand computation and torchcam ------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "build", "size"),
    [
        ("torchvision", lambda: tv_vit(), (32, 32)),
        ("timm", lambda: timm_vit(), (32, 32)),
        ("timm", lambda: timm_vit(img_size=(32, 48), reg_tokens=2), (32, 48)),  # registers, non-square
        ("timm", lambda: timm_vit(cls=VisionTransformerDistilled), (32, 32)),  # DeiT: class + distillation
        ("timm", lambda: timm_vit(qk_norm=True, init_values=0.1, no_embed_class=True), (32, 32)),
    ],
    ids=["torchvision", "timm-vit", "timm-registers-32x48", "deit-distilled", "timm-qknorm-layerscale"],
)
def test_maps_equal_the_hand_computation(family: str, build, size: tuple[int, int]) -> None:
    model = build()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    logits, expected, targets = hand_maps(model, x, family)
    with torch.no_grad():
        assert torch.allclose(model(x), logits, atol=1e-5)  # the hand forward is the model's
    result = explainer(model, ",".join(METHODS)).explain(x, TargetSpec())
    assert torch.allclose(result.logits, logits, atol=1e-5)
    assert torch.equal(result.explanations[0].targets, targets)
    for method in METHODS:
        got = maps_of(result, method)
        assert got.shape == expected[method].shape == (2, size[0] // 8, size[1] // 8)
        assert torch.allclose(got, expected[method], atol=1e-4), method
        assert not torch.allclose(got[0], got[1])


def _torchcam_legrad(model: VisionTransformer, x: Tensor, targets: list[int]) -> Tensor:
    from torchcam.methods import LeGrad

    with LeGrad(model, list(model.encoder.layers)) as extractor:
        scores = model(x)
        return extractor(targets, scores)[0]


def _compare_with_torchcam(model: VisionTransformer, x: Tensor) -> None:
    result = explainer(model, "legrad").explain(x, TargetSpec())
    targets = result.explanations[0].targets.tolist()
    reference = _torchcam_legrad(model, x, targets)
    ours = maps_of(result, "legrad")
    assert reference.shape == ours.shape
    for sample in range(x.shape[0]):
        assert pearson(ours[sample], reference[sample]) >= 0.99


def test_legrad_matches_torchcam() -> None:
    model = tv_vit(image=64, patch=16, layers=3, heads=4, dim=32)
    _compare_with_torchcam(model, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)))


@pytest.mark.slow
def test_legrad_matches_torchcam_on_vit_b_16() -> None:
    from torchvision.models import vit_b_16

    torch.manual_seed(0)
    model = randomise_heads(vit_b_16(weights=None))
    _compare_with_torchcam(model, torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5)))


def test_per_sample_targets_in_a_batch_of_two() -> None:
    model = tv_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    methods = ",".join(METHODS)
    batch = explainer(model, methods).explain(x, TargetSpec(per_sample=(3, 8)))
    for sample, target in enumerate((3, 8)):
        alone = explainer(model, methods).explain(x[sample : sample + 1], TargetSpec(index=target))
        for method in METHODS:
            assert torch.allclose(maps_of(batch, method)[sample], maps_of(alone, method)[0], atol=1e-5), method
    other = explainer(model, methods).explain(x, TargetSpec(per_sample=(8, 3)))
    for method in ("legrad", "grad-rollout"):  # class-specific: another class, another map
        assert not torch.allclose(maps_of(batch, method)[0], maps_of(other, method)[0], atol=1e-4)
    assert torch.allclose(maps_of(batch, "rollout"), maps_of(other, "rollout"))  # class-agnostic


def test_topk_ranks_each_get_their_gradients() -> None:
    model = tv_vit()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    result = explainer(model, "legrad,grad-rollout").explain(x, TargetSpec(topk=2))
    second = int(result.explanations[-1].targets[0])
    alone = explainer(model, "legrad,grad-rollout").explain(x, TargetSpec(index=second))
    for method in ("legrad", "grad-rollout"):
        assert torch.allclose(maps_of(result, method, rank=1), maps_of(alone, method), atol=1e-5)


# --- the model is left exactly as it was -------------------------------------------------------------

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def snapshot(model: nn.Module) -> list:
    state = []
    for name, module in model.named_modules():
        hooks = tuple(tuple(getattr(module, d).items()) for d in _HOOK_DICTS)
        own = {k: v for k, v in vars(module).items() if not k.startswith("_")}
        state.append((name, type(module), module.training, hooks, sorted(own), own.get("fused_attn")))
    state.append([(n, p.requires_grad, p.grad) for n, p in model.named_parameters()])
    return state


class Boom(Rollout):
    name = "boom"

    def attribute(self, ctx):
        raise RuntimeError("method failed")


@pytest.mark.parametrize("family", ["torchvision", "timm"])
def test_model_is_unchanged_after_a_call_and_after_an_exception(family: str) -> None:
    model = tv_vit() if family == "torchvision" else timm_vit()
    if family == "timm":
        for block in model.blocks:
            block.attn.fused_attn = True  # what the method must switch off, and back on
    model.train()
    before = snapshot(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model.eval()(x)
    model.train()
    explainer(model, ",".join(METHODS)).explain(x, TargetSpec())
    assert snapshot(model) == before

    with pytest.raises(RuntimeError, match="method failed"):  # a method raises after the capture
        Explainer(
            model,
            LayerInfo("encoder" if family == "torchvision" else "blocks", False, 1, (1, 1), 10, None),
            [Boom()],
            channels_last=False,
        ).explain(x, TargetSpec())
    assert snapshot(model) == before

    def fail(*_):
        raise RuntimeError("forward failed")

    last = model.encoder.layers[-1] if family == "torchvision" else model.blocks[-1]
    handle = last.register_forward_hook(fail)
    during = snapshot(model)
    with pytest.raises(RuntimeError, match="forward failed"):  # the forward raises inside the capture
        explainer(model, ",".join(METHODS)).explain(x, TargetSpec())
    assert snapshot(model) == during
    handle.remove()
    assert snapshot(model) == before
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain)


def test_capture_is_exact_and_restores_forward() -> None:
    model = tv_vit()
    transformer = find_transformer(model, "rollout")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        with capture_attention(transformer, track_grad=False, keep_tokens=True) as captured:
            captured_out = model(x)
    assert torch.allclose(plain, captured_out, atol=1e-5)
    assert len(captured.attentions) == len(captured.tokens) == 2
    assert all("forward" not in vars(block.self_attention) for block in model.encoder.layers)
    _, by_hand, _ = by_hand_torchvision(model, x)
    for got, expected in zip(captured.attentions, by_hand, strict=True):
        assert got.shape == (2, 2, 17, 17)
        assert torch.allclose(got, expected, atol=1e-6)


# --- what does not apply is refused by name ----------------------------------------------------------


def test_cnn_is_refused_by_name() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    info = LayerInfo("0", False, 4, (2, 2), 2, None)
    for method in METHODS:
        with pytest.raises(MethodNotApplicable, match=f"^{method} reads the attention.*Sequential"):
            Explainer(model, info, [get_method(method)])


def test_vit_without_class_token_and_attention_pooled_heads() -> None:
    gap = timm_vit(class_token=False, global_pool="avg")
    for method in ("rollout", "grad-rollout"):
        with pytest.raises(MethodNotApplicable, match=f"{method} follows the class token"):
            explainer(gap, method)
    x = torch.randn(1, 3, 32, 32)
    assert maps_of(explainer(gap, "legrad").explain(x, TargetSpec()), "legrad").shape == (1, 4, 4)
    pooled = timm_vit(class_token=False, global_pool="map")
    with pytest.raises(MethodNotApplicable, match="legrad cannot score.*global_pool='map'"):
        explainer(pooled, "legrad")


def test_other_timm_transformers_are_refused_by_name() -> None:
    from timm.models.vision_transformer import ResPostBlock

    model = timm_vit(block_fn=ResPostBlock)
    with pytest.raises(MethodNotApplicable, match="rollout: blocks.0 is a ResPostBlock"):
        explainer(model, "rollout")
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, img_size=32, window_size=2
    )
    with pytest.raises(MethodNotApplicable, match="legrad reads the attention.*SwinTransformer"):
        explainer(swin, "legrad")


def test_grid_follows_the_input_not_a_fixed_size() -> None:
    model = timm_vit(img_size=(40, 24), patch_size=8, dynamic_img_size=True)
    for size in ((40, 24), (16, 32)):
        result = explainer(model, "rollout").explain(torch.randn(1, 3, *size), TargetSpec())
        assert maps_of(result, "rollout").shape == (1, size[0] // 8, size[1] // 8)


def all_methods(model: nn.Module, size: int) -> Explainer:
    """`-m all` at the auto layer, as the command line builds it."""
    from camcli.methods import added_by_all
    from camcli.models import InputSpec, resolve_layer

    info = resolve_layer(model, "auto", InputSpec(size, (0.5,) * 3, (0.5,) * 3), torch.device("cpu"))
    return Explainer(model, info, parse_methods("all"), optional=added_by_all("all"), channels_last=False)


def test_all_runs_them_on_a_vit_and_skips_them_on_a_cnn_with_the_reason() -> None:
    assert set(METHODS) <= set(list_methods())
    assert set(METHODS) <= {m.name for m in parse_methods("all")}
    vit = all_methods(timm_vit(), 32)
    assert not set(METHODS) & {name for name, _ in vit.skipped}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    together = vit.explain(x, TargetSpec())
    for method in METHODS:  # the same maps as the method asked alone
        alone = explainer(vit.model, method).explain(x, TargetSpec())
        torch.testing.assert_close(maps_of(together, method), maps_of(alone, method), rtol=1e-5, atol=1e-6)
    from torchvision.models import resnet18

    cnn = all_methods(resnet18(weights=None, num_classes=10).eval(), 32)
    skipped = dict(cnn.skipped)
    for method in METHODS:
        assert skipped[method].startswith(f"{method} reads the attention of a vision transformer; ResNet is not")
    assert not set(METHODS) & {m.name for m in cnn.methods}
    gap = all_methods(timm_vit(class_token=False, global_pool="avg"), 32)  # no class token to follow
    assert {"rollout", "grad-rollout"} <= {name for name, _ in gap.skipped}
    assert "follows the class token" in dict(gap.skipped)["rollout"]
    assert "legrad" in [m.name for m in gap.methods]


def test_cli_writes_the_maps_and_a_valid_record(tmp_path, monkeypatch, samples_dir, validate_record) -> None:
    import json

    from typer.testing import CliRunner

    from camcli.cli import app

    (tmp_path / "vitfactory.py").write_text(
        "import torch\nfrom torchvision.models import VisionTransformer\n\n\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    model = VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=10)\n"
        "    torch.nn.init.normal_(model.heads.head.weight, std=0.5)\n"
        "    return model\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    args = ["explain", str(samples_dir / "skimage_chelsea.png"), "--model", "vitfactory:build", "--input-size", "32"]
    result = CliRunner().invoke(app, [*args, "-m", ",".join(METHODS), "-o", str(out), "--save-heatmap"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "skimage_chelsea.png.json").read_text())
    validate_record(record)
    assert [(e["method"], e["layer"]) for e in record["explanations"]] == [(m, None) for m in METHODS]
    for method in METHODS:
        assert (out / f"skimage_chelsea.png.{method}.png").exists()
    tiny_cnn = ["--model", "tiny_models:brightness", "--input-size", "32"]
    refused = CliRunner().invoke(app, [*args[:2], *tiny_cnn, "-m", "rollout", "-o", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "rollout reads the attention" in refused.output
    assert not list((tmp_path / "x").glob("**/*.*"))  # nothing written
