"""The model zoo: one small source per family, asked in order which one serves a `--model`.

Adding a family means one module in `camcli/models/sources/` with a `ModelSource`
subclass decorated with `@register_source`, and its name in `_SOURCES` below. The last
source (torchvision) takes every name no earlier source claimed.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from camcli.errors import UsageError
from camcli.models.spec import InputSpec, LoadedModel, read_labels

if TYPE_CHECKING:
    from torch import nn


class ModelSource:
    """A family of models `--model` can name: which names it claims and how it builds them."""

    name: ClassVar[str]  # shown by `camcli models`
    catch_all: ClassVar[bool] = False  # asked last: takes every name the others leave
    runs_remote_code: ClassVar[bool] = False  # may run a model's own code (--trust-remote-code)

    def claims(self, model: str) -> bool:
        """True if `model` (the `--model` string) belongs to this family."""
        raise NotImplementedError

    def load(self, model: str, weights: str | None) -> LoadedModel:
        """Build `model` with `weights` (``None`` = the family's default) on the CPU.

        A source that can run a model's own code (Hugging Face) sets `runs_remote_code`
        and takes ``trust_remote_code=True`` as a keyword."""
        raise NotImplementedError

    def adapt_input_size(self, model: nn.Module, native: int, size: int) -> str | None:
        """Make `model` (built for `native` px) take `size` px, where the family has a way
        (timm's `set_input_size` resamples a ViT's position embeddings), and say what was
        changed; None where nothing needs changing (a CNN takes any size). A model that
        cannot take the size at all is refused by the traced forward, with its own reason."""
        return None

    def categories(self, model: str, weights: str | None) -> list[str] | None:
        """The class names `load` will give, read from metadata without building the model
        (so a bad `--target` name is refused before anything is loaded or created); None
        where only the built model can tell."""
        return None

    def names(self) -> list[str]:
        """The names `camcli models` lists for this family (may be empty)."""
        return []


_REGISTRY: list[ModelSource] = []


def register_source(cls: type[ModelSource]) -> type[ModelSource]:
    """Class decorator adding a source; sources are asked in registration order."""
    if any(type(source) is cls for source in _REGISTRY):
        raise RuntimeError(f"model source {cls.__name__} is registered twice")
    _REGISTRY.append(cls())
    return cls


# Order matters: prefixes and factory specs first, the torchvision catch-all last.
_SOURCES = ("hf", "timm", "factory", "lite0", "torchvision")


def sources() -> list[ModelSource]:
    """The registered sources in the order they are asked, imported on first use (no
    import-time cost); the catch-all comes last."""
    for module in _SOURCES:
        importlib.import_module(f"camcli.models.sources.{module}")
    return sorted(_REGISTRY, key=lambda source: source.catch_all)


def source_for(model: str) -> ModelSource:
    """The first source claiming `model`. Modules are imported one at a time and asked as
    they come, so the embedded default never imports torchvision's source (and torchvision)."""
    for module in _SOURCES:
        importlib.import_module(f"camcli.models.sources.{module}")
        for source in _REGISTRY:
            if not source.catch_all and source.claims(model):
                return source
    for source in sources():
        if source.claims(model):
            return source
    raise UsageError(f"unknown model {model!r}; `camcli models` lists them")  # pragma: no cover - catch-all


def known_categories(name: str, weights: str | None) -> list[str] | None:
    """`ModelSource.categories` of the source serving `name` (None: known once loaded)."""
    return source_for(name).categories(name, weights)


def list_models() -> list[str]:
    """Every model name `--model` accepts (besides `package.module:factory`), family by family."""
    return [name for source in sources() for name in source.names()]


def load_model(
    name: str | None = None,
    weights: str | None = None,
    *,
    input_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    labels: str | Path | Sequence[str] | None = None,
    channels: int | None = None,
    output_key: str | int | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Build `name` with `weights` (enum member, ``none`` or a file) in eval mode on the CPU.

    ``weights=None`` means the default: the pretrained weights for zoo models (for
    ``timm:NAME`` only from the local cache), the factory's own initialisation for
    ``package.module:factory``. `labels` (a list, or a file read by `read_labels`)
    names the classes of a model that has its own; `check_labels` compares the count
    once the model's class count is known. The input channels come from the model's
    first convolution (`channels` overrides); `output_key` is `--output-key`;
    `trust_remote_code` lets a Hugging Face folder run its own code.
    """
    from camcli.models.layers import input_channels
    from camcli.models.spec import DEFAULT_MODEL

    name = name or DEFAULT_MODEL
    source = source_for(name)
    if trust_remote_code and not getattr(source, "runs_remote_code", False):
        raise UsageError("--trust-remote-code applies to --model hf:... only")
    loaded = source.load(name, weights, trust_remote_code=True) if trust_remote_code else source.load(name, weights)
    loaded.model.eval()
    loaded.output_key = output_key
    loaded.random_weights = loaded.random_weights or (weights or "").lower() == "none"
    spec = loaded.input
    if input_size is not None and input_size != spec.size:
        loaded.adapted = source.adapt_input_size(loaded.model, spec.size, input_size)
    if input_size is not None or mean is not None or std is not None:
        spec = InputSpec(
            size=input_size or spec.size,
            mean=mean or spec.mean,
            std=std or spec.std,
            interpolation=spec.interpolation,
            channels=spec.channels,
            channel_order=spec.channel_order,
        )
    wanted = channels or input_channels(loaded.model) or spec.channels
    if wanted != spec.channels or len(spec.mean) != wanted or len(spec.std) != wanted:
        if mean is not None and len(mean) != wanted or std is not None and len(std) != wanted:
            raise UsageError(f"--mean and --std need {wanted} values for a {wanted}-channel input")
        spec = spec.with_channels(wanted)
    loaded.input = spec
    if labels is not None:
        loaded.categories = read_labels(Path(labels)) if isinstance(labels, (str, Path)) else list(labels)
    return loaded
