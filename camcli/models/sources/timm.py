"""timm's models (the optional `timm` extra): weights from a user file or timm's local cache only."""

from __future__ import annotations

import difflib
import importlib.util
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from camcli.errors import UsageError
from camcli.models.spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TIMM_PREFIX,
    InputSpec,
    LoadedModel,
    imagenet_categories,
    is_weights_path,
)
from camcli.models.weights import apply_state_dict, head_classes, read_weights_file, timm_cached_weights
from camcli.models.zoo import ModelSource, register_source

if TYPE_CHECKING:
    from torch import nn


def timm_available() -> bool:
    """timm is optional (the `timm` extra)."""
    return importlib.util.find_spec("timm") is not None


@register_source
class TimmSource(ModelSource):
    name = "timm"

    def claims(self, model: str) -> bool:
        return model.startswith(TIMM_PREFIX)

    def load(self, model: str, weights: str | None) -> LoadedModel:
        """A timm model: weights from a user file or timm's local cache, never downloaded."""
        name = model.removeprefix(TIMM_PREFIX)
        if not timm_available():
            raise UsageError("--model timm:...: timm is not installed (pip install 'camcli[timm]')")
        import timm

        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UsageError(f"unknown timm model {name!r}{hint}; `camcli models 'PATTERN'` lists them")
        choice = weights or "DEFAULT"
        if choice.lower() == "none":
            net, label = timm.create_model(name, pretrained=False), "none"
        elif is_weights_path(choice) or choice.upper() != "DEFAULT":
            state = read_weights_file(Path(choice))
            net = timm.create_model(name, pretrained=False)
            classes = head_classes(net, state)
            if classes is not None:
                net = timm.create_model(name, pretrained=False, num_classes=classes)
            apply_state_dict(net, state, choice)
            label = choice
        else:
            cached = timm_cached_weights(name)
            if cached is None:
                raise UsageError(
                    f"timm weights for {name!r} are not in the local cache and camcli never downloads them: "
                    "pass --weights FILE (.pth or .safetensors) or --weights none"
                )
            # timm's own loader adapts the checkpoint to the model (its filter functions)
            net = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"state_dict": read_weights_file(cached)}
            )
            label = f"timm {name} ({cached.name})"
        cfg = net.pretrained_cfg
        spec = InputSpec(
            size=int(cfg.get("input_size", (3, 224, 224))[-1]),
            mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
            std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
            interpolation="bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear",
        )
        classes = getattr(net, "num_classes", None)
        categories = imagenet_categories() if classes == 1000 else None
        return LoadedModel(net, model, label, spec, categories)

    def adapt_input_size(self, model: nn.Module, native: int, size: int) -> str | None:
        """timm's own `set_input_size` (ViT, DeiT, BEiT, EVA, Swin, MaxViT...): position
        embeddings (and Swin's windows) resampled to the new token grid, as timm does for
        fine-tuning at another resolution. Models without it are left as built."""
        resize = getattr(model, "set_input_size", None)
        if resize is None:
            return None
        embed = getattr(model, "patch_embed", None)
        before = tuple(getattr(embed, "grid_size", ()) or ())
        try:
            with warnings.catch_warnings():  # torch's deprecation notes from timm's interpolation code
                warnings.simplefilter("ignore", UserWarning)
                resize(img_size=(size, size))
        except (ValueError, AssertionError, RuntimeError, TypeError) as exc:
            raise UsageError(f"timm cannot make this model take {size} px (--input-size): {exc}") from exc
        after = tuple(getattr(embed, "grid_size", ()) or ())
        grids = (
            f": token grid {before[0]}x{before[1]} -> {after[0]}x{after[1]}" if len(before) == len(after) == 2 else ""
        )
        return (
            f"built for {native} px, resized to {size} px by timm's set_input_size{grids} "
            "(position embeddings or windows resampled: the model is no longer exactly the one trained)"
        )
