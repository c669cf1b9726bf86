"""What a loaded model is: its input recipe, its class names, the constants they default to.

Kept free of torch so light commands (help, listings) can read it cheaply.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from camcli.errors import UsageError

if TYPE_CHECKING:
    from torch import nn

DEFAULT_MODEL = "efficientnet_lite0"
TIMM_PREFIX = "timm:"  # --model timm:NAME[.TAG]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OutputKey = str | int | None  # --output-key: a name or an index of the model's output (camcli.models.outputs)
WEIGHT_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt", ".safetensors"}


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the model's input: the whole image resized to size x size,
    as RGB (3 channels) or luminance (1 channel), normalised per channel."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"  # "bilinear" | "bicubic" | "nearest"
    channels: int = 3  # 3: RGB; 1: luminance (ITU-R BT.601, as Pillow's convert("L"))
    channel_order: str = "rgb"  # "bgr" for models trained on BGR (transformers' MobileViT)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"size": [self.size, self.size], "mean": list(self.mean), "std": list(self.std)}
        if self.channels != 3:
            out["channels"] = self.channels
        if self.channel_order != "rgb":
            out["channel_order"] = self.channel_order
        return out

    def with_channels(self, channels: int) -> InputSpec:
        """The same recipe for `channels` input channels: 3 -> 1 averages mean and std
        (the luminance of a grey image keeps its value); a length that fits is kept."""
        if channels not in (1, 3):
            raise UsageError(
                f"the model's first convolution takes {channels} channels; camcli feeds 1 (luminance) "
                "or 3 (RGB): pass --channels 1 or 3 if that is what it was trained on"
            )
        mean, std = self.mean, self.std
        if len(mean) != channels:
            mean = (sum(mean) / len(mean),) * channels
        if len(std) != channels:
            std = (sum(std) / len(std),) * channels
        return InputSpec(self.size, mean, std, self.interpolation, channels, self.channel_order)


@dataclass
class LoadedModel:
    """A model ready to explain, with what the outputs need to say about it."""

    model: nn.Module
    name: str
    weights: str  # what was loaded, for the JSON and for resume checks
    input: InputSpec
    categories: list[str] | None  # class names, or None for unnamed classes
    output_key: str | int | None = None  # --output-key: which entry of the output holds the logits
    random_weights: bool = False  # nothing was loaded: predictions and maps come from random weights
    adapted: str | None = None  # what was changed so the model takes --input-size (ViT position embeddings)

    def label(self, index: int) -> str:
        if self.categories is not None and 0 <= index < len(self.categories):
            return self.categories[index]
        return f"class {index}"


@cache
def _imagenet_categories() -> tuple[str, ...]:
    data = files("camcli.models").joinpath("data/imagenet_categories.json").read_text(encoding="utf-8")
    return tuple(json.loads(data)["categories"])


def imagenet_categories() -> list[str]:
    """The 1,000 ImageNet class names in torchvision's order, from the copy shipped in
    camcli (data/imagenet_categories.json, BSD-3-Clause): no torchvision import."""
    return list(_imagenet_categories())


def default_input() -> InputSpec:
    """The ImageNet recipe most CNNs are trained with: 224 px, ImageNet mean and std."""
    return InputSpec(224, IMAGENET_MEAN, IMAGENET_STD, "bilinear")


def is_weights_path(weights: str) -> bool:
    """True if `--weights` names a file rather than a named set of weights."""
    return os.sep in weights or Path(weights).suffix.lower() in WEIGHT_SUFFIXES or Path(weights).is_file()


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


def class_by_name(name: str, names: Sequence[str]) -> int:
    """The index of class `name` in `names`: an exact match, else a unique case-insensitive
    one; ambiguous or unknown refuses (torch-free: a re-run resolves names before loading)."""
    for matches in (
        [i for i, n in enumerate(names) if n == name],
        [i for i, n in enumerate(names) if n.lower() == name.lower()],
    ):
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            listed = ", ".join(f"{i} ({names[i]})" for i in matches)
            raise UsageError(f"class name {name!r} is ambiguous: {listed}; give the index")
    similar = [n for n in names if name.lower() in n.lower()]
    similar = similar or difflib.get_close_matches(name, list(names), n=5, cutoff=0.6)
    hint = f"; candidates: {', '.join(similar[:8])}" if similar else ""
    raise UsageError(f"unknown class name {name!r}{hint}")


def check_labels(loaded: LoadedModel, num_classes: int, source: str = "--labels") -> None:
    """Refuse class names whose count differs from the model's outputs (every index must have a name)."""
    if loaded.categories is not None and len(loaded.categories) != num_classes:
        raise UsageError(f"{source}: {len(loaded.categories)} class names for a model with {num_classes} outputs")


def parse_output_key(value: str | None) -> OutputKey:
    """`--output-key`: an index for a tuple/list when it is a digit string, else a name."""
    if value is None or value == "":
        return None
    return int(value) if value.isdigit() else value
