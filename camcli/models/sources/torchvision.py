"""torchvision's classification builders: weights through its Weights API and cache, read safely."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from camcli.errors import UsageError
from camcli.models.spec import DEFAULT_MODEL, InputSpec, LoadedModel, default_input, is_weights_path
from camcli.models.weights import (
    apply_state_dict,
    cached_state_dict,
    head_classes,
    read_weights_file,
    rename_legacy_densenet_keys,
)
from camcli.models.zoo import ModelSource, register_source

_AUX_MODELS = {"googlenet", "inception_v3"}


def torchvision_model_names() -> list[str]:
    """torchvision's image-classification builders (not detection, video, ...)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


@register_source
class TorchvisionSource(ModelSource):
    name = "torchvision"
    catch_all = True

    def claims(self, model: str) -> bool:
        return True  # the catch-all: an unknown name is refused here, with suggestions

    def names(self) -> list[str]:
        return torchvision_model_names()

    def categories(self, model: str, weights: str | None) -> list[str] | None:
        choice = weights or "DEFAULT"
        if model not in torchvision_model_names() or is_weights_path(choice):
            return None  # an unknown name fails in load; a file may bring its own head
        enum = torchvision.models.get_model_weights(model)
        member = enum.DEFAULT if choice.lower() == "none" else _weights_member(enum, choice)
        return list(member.meta["categories"])

    def load(self, model: str, weights: str | None) -> LoadedModel:
        known = torchvision_model_names()
        if model not in known:
            close = difflib.get_close_matches(model, [DEFAULT_MODEL, *known], n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UsageError(f"unknown model {model!r}{hint}; `camcli models` lists them")
        enum = torchvision.models.get_model_weights(model)
        choice = weights or "DEFAULT"
        if choice.lower() == "none" or is_weights_path(choice):
            return _from_file_or_none(model, enum, choice)
        member = _weights_member(enum, choice)
        kwargs: dict[str, Any] = {"num_classes": len(member.meta["categories"])}
        if model in _AUX_MODELS:  # the builder arguments torchvision sets for these weights
            kwargs |= {"transform_input": True, "aux_logits": True, "init_weights": False}
        net = torchvision.models.get_model(model, weights=None, **kwargs)
        state = cached_state_dict(member)
        if model.startswith("densenet"):
            state = rename_legacy_densenet_keys(state)
        apply_state_dict(net, state, str(member))
        if model == "inception_v3":
            net.aux_logits, net.AuxLogits = False, None
        elif model == "googlenet":
            net.aux_logits, net.aux1, net.aux2 = False, None, None
        transforms = member.transforms()
        spec = InputSpec(
            size=int(transforms.crop_size[0]),
            mean=tuple(transforms.mean),
            std=tuple(transforms.std),
            interpolation=transforms.interpolation.value,
        )
        return LoadedModel(net, model, str(member), spec, list(member.meta["categories"]))

    def adapt_input_size(self, model: nn.Module, native: int, size: int) -> str | None:
        """torchvision's ViTs assert their image size: the position embeddings are resampled
        by torchvision's own `interpolate_embeddings` (bicubic, as for fine-tuning at another
        resolution) and the size the model checks is set. Other models are left as built."""
        from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

        if not isinstance(model, VisionTransformer) or size == model.image_size:
            return None
        if size < model.patch_size:
            raise UsageError(f"--input-size {size} is smaller than this ViT's {model.patch_size} px patch")
        before = model.image_size // model.patch_size
        key = "encoder.pos_embedding"
        state = interpolate_embeddings(size, model.patch_size, {key: model.encoder.pos_embedding.detach()})
        model.encoder.pos_embedding = nn.Parameter(state[key], requires_grad=model.encoder.pos_embedding.requires_grad)
        model.image_size = size
        after = size // model.patch_size
        return (
            f"built for {native} px, resized to {size} px: token grid {before}x{before} -> {after}x{after} "
            "(position embeddings resampled by torchvision's interpolate_embeddings: the model is no longer "
            "exactly the one trained)"
        )


def _from_file_or_none(model: str, enum: type[WeightsEnum], choice: str) -> LoadedModel:
    kwargs: dict[str, Any] = {}
    if model in _AUX_MODELS:
        kwargs = {"aux_logits": False, "init_weights": True}
    net = torchvision.models.get_model(model, weights=None, **kwargs)
    categories: list[str] | None = list(enum.DEFAULT.meta["categories"])
    if choice.lower() == "none":
        return LoadedModel(net, model, "none", default_input(), categories)
    state = read_weights_file(Path(choice))
    classes = head_classes(net, state)
    if classes is not None:
        net = torchvision.models.get_model(model, weights=None, num_classes=classes, **kwargs)
        categories = None
    apply_state_dict(net, state, choice)
    return LoadedModel(net, model, choice, default_input(), categories)


def _weights_member(enum: type[WeightsEnum], choice: str) -> WeightsEnum:
    """An enum member by name, case-insensitively (``imagenet1k_v2``, ``ResNet50_Weights.DEFAULT``)."""
    member_name = choice.rsplit(".", 1)[-1]
    if member_name.upper() == "DEFAULT":
        return enum.DEFAULT
    by_upper = {name.upper(): member for name, member in enum.__members__.items()}
    if member_name.upper() in by_upper:
        return by_upper[member_name.upper()]
    names = dict.fromkeys(["DEFAULT", *enum.__members__, "none", "a .pth/.safetensors file"])  # each once
    raise UsageError(f"unknown weights {choice!r} for {enum.__name__}: use {', '.join(names)}")
