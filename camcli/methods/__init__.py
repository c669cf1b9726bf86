"""Method registry: one small module per method, registered by its CLI name.

Adding a method: write `camcli/methods/mymethod.py` with a subclass of one of the
bases in `camcli.methods.base` decorated with `@register`, and import it below. Its
options are `Setting`s on the class: the CLI offers them as `--set METHOD.NAME=VALUE`
without any edit of its own.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from camcli.errors import UsageError
from camcli.methods.base import (
    AttentionContext,
    AttentionMethod,
    CamContext,
    CamMethod,
    CombinedMethod,
    GradientContext,
    InputGradientMethod,
    LayerImageMethod,
    Method,
    ModelContext,
    PerturbationMethod,
    Setting,
    settings_of,
)

if TYPE_CHECKING:
    from camcli.models.spec import InputSpec

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


def get_method(name: str, settings: Mapping[str, Any] | None = None, input_spec: InputSpec | None = None) -> Method:
    """An instance of the method called `name`, or a usage error with suggestions.

    `settings` maps a setting's name (`samples`, taken by every method that has it) or
    `method.name` (that method's only) to a value. Text (from the command line) is
    parsed and validated by the method's own `Setting`; a colour given as text is
    converted with `input_spec` (dropped while it is None: checked now, applied once the
    model is loaded). Other values are validated and used as they are.
    """
    cls = method_class(name)
    declared = settings_of(cls)
    given: dict[str, Any] = {}
    for key, value in (settings or {}).items():
        owner, _, short = key.rpartition(".")
        if (not owner or owner == name) and short in declared and value is not None:
            given[short] = value
    kwargs: dict[str, Any] = {}
    for short, setting in declared.items():
        if short not in given and setting.to_input is None:
            continue  # the constructor's own default
        value = given.get(short, setting.default)
        text = isinstance(value, str) and (setting.type is not str or setting.parse is not None or setting.choices)
        value = setting.from_text(name, value) if text else setting.validate(name, value)
        if setting.to_input is not None and (text or short not in given):  # other values: input units already
            if input_spec is not None:
                value = setting.to_input(value, input_spec)
            elif not isinstance(value, str):  # a colour: checked now, converted once the model is known
                continue
        kwargs[short] = value
    return cls(**kwargs)


def method_class(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"unknown method {name!r}{hint}; available: {', '.join(_REGISTRY)}") from None


def method_names(spec: str) -> list[str]:
    """`-m a,b` (or `all`) as method names, keeping order, dropping repeats."""
    names = [part.strip().lower() for part in spec.split(",") if part.strip()]
    if not names:
        raise UsageError("no method given")
    if "all" in names:
        at = names.index("all")
        every = [name for name, cls in _REGISTRY.items() if cls.in_all]
        names = names[:at] + every + names[at + 1 :]
    return list(dict.fromkeys(names))


def parse_methods(
    spec: str, settings: Mapping[str, Any] | None = None, input_spec: InputSpec | None = None
) -> list[Method]:
    """Parse `-m a,b` (or `all`) into method instances, keeping order, dropping repeats."""
    return [get_method(name, settings, input_spec) for name in method_names(spec)]


def cli_settings(names: Sequence[str], sets: Sequence[str], aliases: Mapping[str, Any]) -> dict[str, Any]:
    """`--set METHOD.NAME=VALUE` items and older options (`{"--samples": 3}`, None when not
    given) as `{"method.name": value}` for the methods `names`; what is explicitly set,
    so it can go into the request (a changed setting redoes the images)."""
    chosen: dict[str, Any] = {}
    for name in names:
        for setting in method_class(name).settings:
            if setting.alias is not None and aliases.get(setting.alias) is not None:
                chosen[f"{name}.{setting.name}"] = aliases[setting.alias]
    for item in sets:
        key, equals, text = item.partition("=")
        method, dot, short = key.strip().rpartition(".")
        if not equals or not dot or not method or not short:
            raise UsageError(f"--set expects METHOD.NAME=VALUE (e.g. rise.masks=500), not {item!r}")
        method = method.lower()
        declared = settings_of(method_class(method))
        if short not in declared:
            known = ", ".join(declared) or "none"
            close = difflib.get_close_matches(short, declared, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(f"--set {key}: {method} has no setting {short!r}{hint}; its settings: {known}")
        if method not in names:
            raise UsageError(f"--set {key}: {method} is not among the methods asked for (-m {','.join(names)})")
        chosen[f"{method}.{short}"] = text.strip()
    return chosen


def added_by_all(spec: str) -> set[str]:
    """The methods in `-m` that only `all` brought in: skipped, not refused, where they do not apply."""
    names = [part.strip().lower() for part in spec.split(",") if part.strip()]
    if "all" not in names:
        return set()
    return {name for name, cls in _REGISTRY.items() if cls.in_all} - set(names)


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
    "legrad",
    "rollout",
    "gradrollout",
    "input_x_gradient",
    "integrated_gradients",
    "gradient_shap",
    "ablationcam",
    "eigengradcam",
    "kpca_cam",
    "fullgrad",
    "sscam",
    "iscam",
    "smoothgradcampp",
    "rise",
)
for _module in _MODULES:
    importlib.import_module(f"camcli.methods.{_module}")

__all__ = [
    "AttentionContext",
    "AttentionMethod",
    "CamContext",
    "CamMethod",
    "CombinedMethod",
    "GradientContext",
    "InputGradientMethod",
    "LayerImageMethod",
    "Method",
    "ModelContext",
    "PerturbationMethod",
    "added_by_all",
    "Setting",
    "cli_settings",
    "get_method",
    "list_methods",
    "method_class",
    "method_names",
    "method_classes",
    "parse_methods",
    "register",
]
