"""Models: the zoo of families (`zoo`, `sources/`), safe weights (`weights`), input
recipes and class names (`spec`), and target-layer resolution (`layers`).

This module re-exports the names the rest of camcli uses, so callers need not know
which file holds what. The re-exports are resolved on first use (PEP 562): importing
`camcli.models.spec` for a constant does not import torch through `layers`/`weights`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from camcli.models.layers import (
        POOLING_MODULES,
        FineLayers,
        ForwardTrace,
        LayerInfo,
        find_fine_partner,
        grid_sequence,
        resolve_fine,
        resolve_layer,
        resolve_layers,
        trace_forward,
    )
    from camcli.models.spec import (
        DEFAULT_MODEL,
        IMAGENET_MEAN,
        IMAGENET_STD,
        TIMM_PREFIX,
        InputSpec,
        LoadedModel,
        check_labels,
        default_input,
        imagenet_categories,
        read_labels,
    )
    from camcli.models.weights import (
        apply_state_dict,
        cached_state_dict,
        read_state_dict,
        read_weights_file,
        timm_cached_weights,
    )
    from camcli.models.zoo import ModelSource, list_models, load_model, register_source

_WHERE = {
    "layers": (
        "POOLING_MODULES",
        "FineLayers",
        "ForwardTrace",
        "LayerInfo",
        "find_fine_partner",
        "grid_sequence",
        "resolve_fine",
        "resolve_layer",
        "resolve_layers",
        "trace_forward",
    ),
    "spec": (
        "DEFAULT_MODEL",
        "IMAGENET_MEAN",
        "IMAGENET_STD",
        "TIMM_PREFIX",
        "InputSpec",
        "LoadedModel",
        "check_labels",
        "default_input",
        "imagenet_categories",
        "read_labels",
    ),
    "weights": ("apply_state_dict", "cached_state_dict", "read_state_dict", "read_weights_file", "timm_cached_weights"),
    "zoo": ("ModelSource", "list_models", "load_model", "register_source"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = [
    "DEFAULT_MODEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "POOLING_MODULES",
    "TIMM_PREFIX",
    "FineLayers",
    "ForwardTrace",
    "InputSpec",
    "LayerInfo",
    "LoadedModel",
    "ModelSource",
    "apply_state_dict",
    "cached_state_dict",
    "check_labels",
    "default_input",
    "find_fine_partner",
    "grid_sequence",
    "imagenet_categories",
    "list_models",
    "load_model",
    "read_labels",
    "read_state_dict",
    "read_weights_file",
    "register_source",
    "resolve_fine",
    "resolve_layer",
    "resolve_layers",
    "timm_cached_weights",
    "trace_forward",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'camcli.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"camcli.models.{module}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value
