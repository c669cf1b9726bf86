"""`--model hf:...`: real transformers models from small configs, saved with save_pretrained (no network).

CNN families (ResNet, ConvNeXt, EfficientNet, MobileViT's conv head) are explained end to end
and compared with a Grad-CAM written here. The token families (ViT, DeiT, Swin, DINOv2) load,
preprocess, name their classes and predict like transformers itself; their maps need the
token layouts of camcli.models.layouts (until then camcli refuses them, tested below).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from camcli.api import explain  # noqa: E402
from camcli.cli import app  # noqa: E402
from camcli.errors import UsageError  # noqa: E402
from camcli.models import load_model  # noqa: E402
from camcli.models.outputs import select_logits  # noqa: E402
from camcli.run.stages import preprocess  # noqa: E402

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
LABELS = {0: "cat", 1: "dog", 2: "bird"}
HAS_LAYOUTS = importlib.util.find_spec("camcli.models.layouts") is not None
needs_layouts = pytest.mark.skipif(not HAS_LAYOUTS, reason="needs issue 11's layouts")


def _families() -> dict:
    T = transformers
    square = {"height": 32, "width": 32}
    vit = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    vit["intermediate_size"] = 64
    return {
        "vit": (
            T.ViTConfig(**vit),
            T.ViTForImageClassification,
            T.ViTImageProcessor(size=square),
        ),
        "deit": (
            T.DeiTConfig(**vit),
            T.DeiTForImageClassification,
            T.DeiTImageProcessor(size=square, crop_size=square),
        ),
        "swin": (
            T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4),
            T.SwinForImageClassification,
            T.ViTImageProcessor(size=square),
        ),
        "dinov2": (
            T.Dinov2Config(
                image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2
            ),
            T.Dinov2ForImageClassification,
            T.BitImageProcessor(size={"shortest_edge": 32}, crop_size=square),
        ),
        "resnet": (
            T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
            T.ResNetForImageClassification,
            T.ConvNextImageProcessor(size={"shortest_edge": 64}),
        ),
        "convnext": (
            T.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=64),
            T.ConvNextForImageClassification,
            T.ConvNextImageProcessor(size={"shortest_edge": 64}),
        ),
        "efficientnet": (
            T.EfficientNetConfig(image_size=64, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320),
            T.EfficientNetForImageClassification,
            T.EfficientNetImageProcessor(size={"height": 64, "width": 64}),
        ),
        "mobilevit": (
            T.MobileViTConfig(image_size=64, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64]),
            T.MobileViTForImageClassification,
            T.MobileViTImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
        ),
    }


CNN = ("resnet", "convnext", "efficientnet", "mobilevit")
TOKENS = ("vit", "deit", "swin", "dinov2")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Every family saved with save_pretrained (config.json, model.safetensors, preprocessor_config.json)."""
    root = tmp_path_factory.mktemp("hf")
    folders = {}
    for name, (config, cls, processor) in _families().items():
        config.num_labels = 3
        config.id2label, config.label2id = dict(LABELS), {v: k for k, v in LABELS.items()}
        torch.manual_seed(0)
        model = cls(config).eval()
        with torch.no_grad():  # transformers zero-initialises some heads: make every class differ
            for pname, param in model.named_parameters():  # no layer left at zero (zero-init norms: flat maps)
                if pname.endswith("weight") and param.abs().max() == 0:
                    param.normal_(1.0 if param.ndim == 1 else 0.0, 0.1)
            for module in model.modules():
                if isinstance(module, torch.nn.Linear) and module.out_features == 3:
                    module.weight.normal_(0, 0.5)
                    module.bias.normal_(0, 0.1)
        _calibrate_batch_norm(model, config)
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def _calibrate_batch_norm(model: torch.nn.Module, config) -> None:
    """Running statistics from random batches, as training would leave them: with the default
    (0, 1) statistics random deep nets saturate (EfficientNet's SiLUs reach -inf) and give flat maps."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    side = getattr(config, "image_size", 64)
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    generator = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(4, 3, side, side, generator=generator) * 2 - 1)
    model.eval()


def _image(side: int) -> np.ndarray:
    photo = cv2.cvtColor(cv2.imread(str(ROOT / "samples" / "skimage_chelsea.png")), cv2.COLOR_BGR2RGB)
    return cv2.resize(photo, (side, side), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("family", CNN + TOKENS)
def test_preprocessing_labels_and_predictions_match_transformers(saved, family) -> None:
    loaded = load_model(f"hf:{saved[family]}")
    assert loaded.categories == ["cat", "dog", "bird"]
    assert loaded.weights.endswith("(model.safetensors)") and not loaded.random_weights
    processor = transformers.AutoImageProcessor.from_pretrained(saved[family], local_files_only=True)
    image = _image(loaded.input.size)  # at the model's size: resizing is the identity for both
    theirs = processor(image, do_resize=False, do_center_crop=False, return_tensors="pt")["pixel_values"]
    ours = preprocess(image, loaded.input)[None]
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
    reference = transformers.AutoModelForImageClassification.from_pretrained(saved[family], local_files_only=True)
    with torch.no_grad():
        torch.testing.assert_close(select_logits(loaded.model(ours)), reference(pixel_values=theirs).logits)
    assert loaded.input.channel_order == ("bgr" if family == "mobilevit" else "rgb")


def _gradcam_reference(net: torch.nn.Module, layer: str, x: torch.Tensor, target: int) -> np.ndarray:
    """Grad-CAM (sum_k mean(g_k) A_k) read by the layer's real layout: NCHW, channels-last or tokens."""
    store = {}
    module = dict(net.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o[0] if isinstance(o, tuple) else o))
    try:
        out = net(x)
    finally:
        handle.remove()
    acts = store["a"]
    grad = torch.autograd.grad(out.logits[0, target], acts)[0]
    if acts.ndim == 3:  # tokens (B, prefix + h*w, C)
        n = acts.shape[1]
        side = int(np.sqrt(n))
        prefix = n - side * side
        acts, grad = (t[:, prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2) for t in (acts, grad))
    elif acts.shape[-1] != acts.shape[-2] and acts.shape[1] == acts.shape[2]:  # (B, H, W, C)
        acts, grad = (t.permute(0, 3, 1, 2) for t in (acts, grad))
    return (grad.mean((2, 3), keepdim=True) * acts).sum(1)[0].detach().numpy()  # before ReLU and min-max


def _compare_map(folder: Path, tmp_path: Path) -> None:
    loaded = load_model(f"hf:{folder}")
    image = _image(97)
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["explain", str(path), "--model", f"hf:{folder}", "-o", str(out), "--jsonl", "--save-heatmap", "raw"]
    )
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout.splitlines()[0])
    (e,) = record["explanations"]
    assert e["target"]["label"] in LABELS.values()
    assert [p["label"] for p in record["predictions"]] == [LABELS[p["index"]] for p in record["predictions"]]
    x = preprocess(image, loaded.input)[None]
    expected = _gradcam_reference(loaded.model, e["layer"], x, e["target"]["index"])
    raw = np.load(out / e["raw_heatmap"])
    assert raw.shape == expected.shape and np.abs(expected).max() > 0
    np.testing.assert_allclose(raw, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("family", CNN)
def test_cnn_families_explained_end_to_end(saved, tmp_path, family) -> None:
    _compare_map(saved[family], tmp_path)


@needs_layouts
@pytest.mark.parametrize("family", TOKENS)
def test_token_families_maps_read_by_their_layout(saved, tmp_path, family) -> None:
    _compare_map(saved[family], tmp_path)


@pytest.mark.skipif(HAS_LAYOUTS, reason="with layouts, token models are explained (test above)")
@pytest.mark.parametrize("family", TOKENS)
def test_token_families_refused_until_layouts_land(saved, tmp_path, family) -> None:
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), _image(40))
    result = runner.invoke(app, ["explain", str(path), "--model", f"hf:{saved[family]}", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "token" in result.stderr
    assert not (tmp_path / "o" / "img.png.json").exists()


@pytest.mark.skipif(HAS_LAYOUTS, reason="with layouts, token models are explained (test above)")
def test_swin_position_bias_named_explicitly_is_refused(saved, tmp_path) -> None:
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), _image(40))
    layer = "swin.encoder.layers.1.blocks.0.attention.relative_position_bias"  # (1, heads, N, N): no image map
    result = runner.invoke(app, ["explain", str(path), "--model", f"hf:{saved['swin']}", "--layer", layer])
    assert result.exit_code == 2 and "token" in result.stderr


def test_channels_last_output_named_explicitly_is_read_as_nhwc(saved, tmp_path) -> None:
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), _image(40))
    layer = "convnext.encoder.stages.1.layers.0.pwconv2"  # nn.Linear on (B, H, W, C)
    out = tmp_path / "out"
    args = ["explain", str(path), "--model", f"hf:{saved['convnext']}", "--layer", layer, "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (explanation,) = json.loads((out / "img.png.json").read_text())["explanations"]
    assert explanation["layout"].startswith("NHWC")


def _cache(saved: dict[str, Path], hf_home: Path) -> None:
    """The cache layout huggingface_hub writes: hub/models--ORG--NAME/snapshots/REV and refs/main."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / "models--acme--tiny-resnet"
    shutil.copytree(saved["resnet"], repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def test_explained_from_the_hf_cache_by_id(saved, tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    _cache(saved, tmp_path / "hf_home")
    # what HF_HOME=tmp/hf_home gives huggingface_hub at import (the slow test below sets the variable itself)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    image = tmp_path / "img.png"
    cv2.imwrite(str(image), _image(70))
    result = runner.invoke(
        app, ["explain", str(image), "--model", "hf:acme/tiny-resnet", "-o", str(tmp_path / "o"), "--jsonl", "-q"]
    )
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout.splitlines()[0])
    assert record["model"] == "hf:acme/tiny-resnet" and record["weights"].endswith("(model.safetensors)")
    assert record["predictions"][0]["label"] in LABELS.values()
    missing = runner.invoke(app, ["explain", str(image), "--model", "hf:acme/absent", "-o", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "never downloads" in missing.stderr


@pytest.mark.slow
def test_explained_from_a_temp_hf_home_by_id_in_a_fresh_process(saved, tmp_path) -> None:
    _cache(saved, tmp_path / "hf_home")
    image = tmp_path / "img.png"
    cv2.imwrite(str(image), _image(70))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "camcli",
            "explain",
            str(image),
            "--model",
            "hf:acme/tiny-resnet",
            "-o",
            str(tmp_path / "o"),
            "--jsonl",
            "-q",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[0])["predictions"][0]["label"] in LABELS.values()


def test_pickle_weights_only_as_tensors(saved, tmp_path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(saved["resnet"], folder)
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")  # tensors only: read with weights_only=True
    pickled = load_model(f"hf:{folder}")
    safe = load_model(f"hf:{saved['resnet']}")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(pickled.model(x).logits, safe.model(x).logits)
    torch.save({"state": state, "optimizer": torch.optim.SGD([torch.zeros(1)], lr=0.1)}, folder / "pytorch_model.bin")
    with pytest.raises(UsageError, match="refused to load"):
        load_model(f"hf:{folder}")
    (folder / "pytorch_model.bin").unlink()
    (folder / "tf_model.h5").write_bytes(b"\x89HDF")
    with pytest.raises(UsageError, match="no model.safetensors or pytorch_model.bin"):
        load_model(f"hf:{folder}")


def test_remote_code_refused_without_the_flag(saved, tmp_path) -> None:
    folder = tmp_path / "remote"
    shutil.copytree(saved["resnet"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageClassification": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    result = runner.invoke(
        app, ["explain", str(ROOT / "samples"), "--model", f"hf:{folder}", "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "--trust-remote-code" in result.stderr
    result = runner.invoke(app, ["explain", str(ROOT / "samples"), "--model", "resnet18", "--trust-remote-code"])
    assert result.exit_code == 2 and "hf:" in result.stderr


def test_weights_none_builds_random_and_says_so(saved, tmp_path) -> None:
    loaded = load_model(f"hf:{saved['resnet']}", "none")
    assert loaded.random_weights and loaded.weights == "none"
    with pytest.raises(UsageError, match="use DEFAULT"):
        load_model(f"hf:{saved['resnet']}", "IMAGENET1K_V1")


def test_without_transformers_hf_says_how_to_install(monkeypatch) -> None:
    from camcli.models.sources import hf

    monkeypatch.setattr(hf, "hf_available", lambda: False)
    with pytest.raises(UsageError, match=r"pip install 'camcli\[hf\]'"):
        load_model("hf:anything")


def test_api_explains_an_hf_model(saved) -> None:
    (result,) = explain(_image(80), "gradcam,cam", model=load_model(f"hf:{saved['resnet']}"))
    assert {e.method for e in result.explanations} == {"gradcam", "cam"}
    np.testing.assert_allclose(result.heatmap("cam"), result.heatmap("gradcam"), atol=1e-4)  # GAP + linear head
