"""--precision and the fused inference copy: reduced precision stays close to fp32, the
copy's logits equal the model's, and neither touches the user's model."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from camcli.cli import app
from camcli.engine import Explainer, TargetSpec
from camcli.errors import UsageError
from camcli.fused import inference_copy
from camcli.methods import parse_methods
from camcli.models import load_model, resolve_layer
from camcli.precision import autocast_dtype
from camcli.run.stages import preprocess

CPU = torch.device("cpu")


def _has_cpu_bf16() -> bool:
    try:
        autocast_dtype("bf16", CPU)
    except UsageError:
        return False
    return True


needs_bf16 = pytest.mark.skipif(not _has_cpu_bf16(), reason="this CPU has neither AVX512-BF16 nor AMX")


def _random_norms(model: nn.Module) -> nn.Module:
    """Batch-norm statistics far from the identity, so a wrong fold would show."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
    return model.eval()


@pytest.mark.parametrize(
    ("name", "folded_at_least"),
    [("efficientnet_lite0", 49), ("resnet18", 20), ("mobilenet_v3_small", 34), ("densenet121", 59)],
)
def test_fused_copy_logits_equal_the_model(name: str, folded_at_least: int) -> None:
    loaded = load_model(name, None if name == "efficientnet_lite0" else "none")
    model = loaded.model if name == "efficientnet_lite0" else _random_norms(loaded.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    fused, folded = inference_copy(model, probe)
    assert fused is not model and folded >= folded_at_least
    inputs = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = model(inputs), fused(inputs)
    assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()), rtol=1e-4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the user's model untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


class _SharedConvOutput(nn.Module):
    """A conv output read by its norm and by a residual: folding the norm would change the
    residual, so the fold must be refused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.norm(y) + y
        return self.head(z.mean((2, 3)))


def test_a_conv_output_read_twice_is_not_folded() -> None:
    model = _random_norms(_SharedConvOutput())
    fused, folded = inference_copy(model, torch.randn(2, 3, 16, 16))
    assert folded == 0
    inputs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(fused(inputs), model(inputs), atol=1e-6)


class _ActivationAfterSharedConv(nn.Module):
    """A conv output read by a ReLU and by a residual: the ReLU must not overwrite it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head((self.act(y) + y).mean((2, 3)))


def test_an_activation_is_in_place_only_where_it_alone_reads_the_conv_output() -> None:
    shared = _ActivationAfterSharedConv().eval()
    copy_shared, _ = inference_copy(shared, torch.randn(2, 3, 16, 16))
    assert not copy_shared.act.inplace
    inputs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(copy_shared(inputs), shared(inputs), atol=1e-6)
    lite0 = load_model().model
    fused, _ = inference_copy(lite0, torch.randn(2, 3, 64, 64))
    switched = [m for m in fused.modules() if isinstance(m, nn.ReLU6) and m.inplace]
    assert len(switched) == 33  # every ReLU6 of Lite0 follows a folded conv
    assert not any(m.inplace for m in lite0.modules() if isinstance(m, nn.ReLU6))  # the user's model untouched


@pytest.mark.parametrize("size", [64, 97, 224])
def test_static_same_padding_is_built_into_the_copy_where_symmetric(size: int) -> None:
    """Lite0's stride-1 TF-"SAME" convs become plain convs with their padding built in; the
    stride-2 ones (padding depends on the size, lopsided at even sizes) stay dynamic."""
    from camcli.lite0 import Conv2dSame

    model = load_model().model
    fused, _ = inference_copy(model, torch.randn(2, 3, 64, 64))
    dynamic = [m for m in fused.modules() if type(m) is Conv2dSame]
    assert dynamic and all(m.stride == (2, 2) for m in dynamic)
    assert (
        sum(isinstance(m, nn.Conv2d) and m.padding != (0, 0) for m in fused.modules()) == 12
    )  # 16 depthwise, 4 of stride 2
    inputs = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        want, got = model(inputs), fused(inputs)
    assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()), rtol=1e-4)


def test_scorecam_on_the_fused_copy_equals_the_plain_model() -> None:
    """The engine runs Score-CAM's masked forwards on the fused copy: same map as on the
    model itself (an Explainer whose inference copy is the model)."""
    model = _random_norms(torchvision.models.resnet18(weights=None))
    from camcli.models import InputSpec

    spec = InputSpec(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    info = resolve_layer(model, "auto", spec, CPU)
    inputs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    fast = Explainer(model, info, parse_methods("scorecam"))
    plain = Explainer(model, info, parse_methods("scorecam"))
    plain._inference_model = model  # the definition: every forward on the model itself
    a = fast.explain(inputs, TargetSpec()).explanations[0].maps
    b = plain.explain(inputs, TargetSpec()).explanations[0].maps
    assert fast._inference_model is not model
    assert torch.allclose(a, b, atol=1e-4)


def _sample_batch(samples_dir, spec) -> torch.Tensor:
    files = sorted(samples_dir.glob("*.png"))
    return torch.stack([preprocess(np.array(Image.open(f).convert("RGB")), spec) for f in files])


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


FAST_METHODS = "cam,gradcam,gradcam++,layercam,xgradcam,hirescam,eigencam,saliency,guided-backprop,occlusion"
ALL_METHODS = FAST_METHODS + ",scorecam,guided-gradcam,smoothgrad,deconvnet,activations"


def _bf16_against_fp32(samples_dir, methods: str, settings: dict | None = None) -> dict[str, float]:
    loaded = load_model()
    info = resolve_layer(loaded.model, "auto", loaded.input, CPU)
    batch = _sample_batch(samples_dir, loaded.input)
    results = {}
    for precision in ("fp32", "bf16"):
        explainer = Explainer(loaded.model, info, parse_methods(methods, settings), precision=precision)
        results[precision] = explainer.explain(batch, TargetSpec())
    exact, reduced = results["fp32"], results["bf16"]
    assert torch.equal(exact.logits.argmax(1), reduced.logits.argmax(1))  # top-1 unchanged
    worst: dict[str, float] = {}
    for e32, e16 in zip(exact.explanations, reduced.explanations, strict=True):
        for i in range(batch.shape[0]):
            worst[e32.method] = min(worst.get(e32.method, 1.0), _pearson(e32.maps[i], e16.maps[i]))
    return worst


@needs_bf16
def test_bf16_maps_follow_fp32_on_the_samples(samples_dir) -> None:
    worst = _bf16_against_fp32(samples_dir, FAST_METHODS, {"patch": 64})
    assert min(worst.values()) >= 0.99, worst


@needs_bf16
@pytest.mark.slow
def test_bf16_maps_follow_fp32_for_every_method(samples_dir) -> None:
    worst = _bf16_against_fp32(samples_dir, ALL_METHODS, {"scorecam_top": 64, "samples": 8})
    assert min(worst.values()) >= 0.99, worst


@needs_bf16
def test_methods_that_drift_run_in_fp32_and_are_named() -> None:
    loaded = load_model()
    info = resolve_layer(loaded.model, "auto", loaded.input, CPU)
    explainer = Explainer(loaded.model, info, parse_methods("gradcam,saliency,occlusion"), precision="bf16")
    assert explainer.fp32_methods == ["saliency", "occlusion"]
    assert Explainer(loaded.model, info, parse_methods("gradcam,saliency")).fp32_methods == []


def test_unknown_or_unsupported_precision_is_refused() -> None:
    with pytest.raises(UsageError, match="unknown precision"):
        autocast_dtype("int8", CPU)
    if not torch.cpu._is_amx_fp16_supported():
        with pytest.raises(UsageError, match="AMX-FP16") as refused:
            autocast_dtype("fp16", CPU)
        try:  # the refusal offers only what this processor runs
            autocast_dtype("bf16", CPU)
            assert "use bf16 or fp32" in str(refused.value)
        except UsageError:
            assert str(refused.value).endswith("use fp32")


def test_cli_records_the_precision_and_refuses_before_writing(tmp_path, samples_dir) -> None:
    image = str(samples_dir / "skimage_chelsea.png")
    out = tmp_path / "refused"
    result = CliRunner().invoke(app, ["explain", image, "--precision", "int8", "-o", str(out)])
    assert result.exit_code == 2 and "unknown precision" in result.output
    assert not out.exists()
    if not _has_cpu_bf16():
        return
    out = tmp_path / "bf16"
    result = CliRunner().invoke(app, ["explain", image, "--precision", "bf16", "-m", "gradcam", "-o", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "skimage_chelsea.png.json").read_text())
    assert record["request"]["precision"] == "bf16"


def test_explainer_leaves_the_model_as_it_was() -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    reference = copy.deepcopy(model)
    from camcli.models import InputSpec

    spec = InputSpec(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    info = resolve_layer(model, "auto", spec, CPU)
    Explainer(model, info, parse_methods("scorecam"), channels_last=False).explain(
        torch.randn(1, 3, 64, 64), TargetSpec()
    )
    pairs = zip(model.state_dict().items(), reference.state_dict().items(), strict=True)
    assert all(ka == kb and torch.equal(a, b) for (ka, a), (kb, b) in pairs)
    norms = [type(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 20  # none folded away in the user's own model


def test_metrics_run_on_the_fused_copy_and_equal_the_models(samples_dir) -> None:
    """--metrics' deletion/insertion forwards need logits only: they run on the inference
    copy (the user's model sees just the explain pass's forward) and give its scores."""
    from camcli import explain
    from camcli.metrics import MetricOptions, evaluate_batch

    loaded = load_model("resnet18", "none", input_size=64)
    _random_norms(loaded.model)
    calls: dict[bool, list[nn.Module]] = {False: [], True: []}
    for metrics in calls:
        hook = loaded.model.register_forward_hook(lambda module, *_, m=metrics: calls[m].append(module))
        try:
            (result,) = explain(samples_dir / "skimage_coffee.png", "gradcam", model=loaded, metrics=metrics, steps=5)
        finally:
            hook.remove()
    on_model = {metrics: [m for m in modules if m is loaded.model] for metrics, modules in calls.items()}
    assert len(on_model[True]) == len(on_model[False])  # no curve's forward on the model itself
    assert len(calls[True]) > len(calls[False])  # ... but on its copy (a deep copy keeps the hook)
    got = result.explanations[0].metrics
    image = np.array(Image.open(samples_dir / "skimage_coffee.png").convert("RGB"))
    inputs = preprocess(image, loaded.input)[None]
    explanation = Explainer(
        loaded.model, resolve_layer(loaded.model, "auto", loaded.input, CPU), parse_methods("gradcam")
    )
    explained = explanation.explain(inputs, TargetSpec()).explanations[0]
    options = MetricOptions(steps=5, substrate="zero", chunk_size=32, road=False)
    (want,) = evaluate_batch(loaded.model, inputs, [explained], [image.shape[:2]], None, options)
    for name in ("deletion_auc", "insertion_auc", "average_drop"):
        assert got[name] == pytest.approx(float(want[name][0]), abs=1e-4), name
