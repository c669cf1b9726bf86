"""A user's own model: `--model package.module:factory`, a callable returning an nn.Module."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from torch import nn

from camcli.errors import UsageError
from camcli.models.spec import LoadedModel, default_input
from camcli.models.weights import apply_state_dict, read_weights_file
from camcli.models.zoo import ModelSource, register_source


@register_source
class FactorySource(ModelSource):
    name = "factory"

    def claims(self, model: str) -> bool:
        return ":" in model and not os.path.exists(model)

    def load(self, model: str, weights: str | None) -> LoadedModel:
        module_name, _, attr = model.partition(":")
        if not module_name or not attr:
            raise UsageError(f"--model {model!r}: expected package.module:factory")
        here = os.getcwd()
        added = here not in sys.path  # the user's own modules live where they run camcli
        if added:  # for this import only: the caller's sys.path is left as it was
            sys.path.insert(0, here)
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UsageError(f"--model {model}: cannot import ({exc})") from None
        finally:
            if added and here in sys.path:
                sys.path.remove(here)
        try:
            net = factory()
        except Exception as exc:  # noqa: BLE001 - the user's code: report, don't crash
            raise UsageError(f"--model {model}: the factory raised {type(exc).__name__}: {exc}") from None
        if not isinstance(net, nn.Module):
            raise UsageError(f"--model {model}: the factory returned {type(net).__name__}, not a Module")
        label = "factory"
        if weights and weights.lower() != "none":
            apply_state_dict(net, read_weights_file(Path(weights)), weights)
            label = weights
        return LoadedModel(net, model, label, default_input(), None)
