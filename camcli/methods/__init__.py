"""Method registry: one small module per method, registered by its CLI name.

Adding a method: write `camcli/methods/mymethod.py` with a subclass of one of the
bases in `camcli.methods.base` decorated with `@register`, and import it below.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from typing import Any

from camcli.errors import UsageError
from camcli.methods.base import (
    CamContext,
    CamMethod,
    CombinedMethod,
    InputGradientMethod,
    LayerImageMethod,
    Method,
    ModelContext,
    PerturbationMethod,
)

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method under `cls.name`; duplicates are a bug."""
    if cls.name in _REGISTRY:
        raise RuntimeError(f"method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Names of all registered methods, in registration order."""
    return list(_REGISTRY)


def method_classes() -> list[type[Method]]:
    """The registered method classes (their metadata), in registration order."""
    return list(_REGISTRY.values())


def get_method(name: str, settings: Mapping[str, Any] | None = None) -> Method:
    """An instance of the method called `name`, or a usage error with suggestions.

    `settings` are option values (e.g. from `--samples`); each method takes those named
    in its `settings` class attribute and ignores the rest.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"unknown method {name!r}{hint}; available: {', '.join(_REGISTRY)}") from None
    return cls(**{key: value for key, value in (settings or {}).items() if key in cls.settings})


def parse_methods(spec: str, settings: Mapping[str, Any] | None = None) -> list[Method]:
    """Parse `-m a,b` (or `all`) into method instances, keeping order, dropping repeats."""
    names = [part.strip().lower() for part in spec.split(",") if part.strip()]
    if not names:
        raise UsageError("no method given")
    if "all" in names:
        at = names.index("all")
        every = [name for name, cls in _REGISTRY.items() if cls.in_all]
        names = names[:at] + every + names[at + 1 :]
    return [get_method(name, settings) for name in dict.fromkeys(names)]


# Registration order is the order of `all` and of `camcli methods`.
_MODULES = (
    "cam",
    "gradcam",
    "gradcampp",
    "scorecam",
    "guided_backprop",
    "guided_gradcam",
    "layercam",
    "xgradcam",
    "hirescam",
    "eigencam",
    "finercam",
    "saliency",
    "smoothgrad",
    "deconvnet",
    "occlusion",
    "activations",
    "center",
)
for _module in _MODULES:
    importlib.import_module(f"camcli.methods.{_module}")

__all__ = [
    "CamContext",
    "CamMethod",
    "CombinedMethod",
    "InputGradientMethod",
    "LayerImageMethod",
    "Method",
    "ModelContext",
    "PerturbationMethod",
    "get_method",
    "list_methods",
    "method_classes",
    "parse_methods",
    "register",
]
