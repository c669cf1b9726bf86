"""What a model returns, read as (B, classes) logits: the one rule every forward goes through.

Models return a tensor, a tuple or list (auxiliary heads, features), a dict, or an
object with ``.logits`` (Hugging Face's ``ImageClassifierOutput``). camcli reads:

1. ``output.logits`` when the object has that attribute and it is a tensor;
2. else ``output["logits"]`` for a mapping;
3. else the first tensor (a tuple's first element, a dict's first value in order).

``--output-key NAME|INDEX`` picks another entry: a digit string indexes a tuple or
list, anything else is an attribute or key. A (B,) or (B, 1) output is a binary
model's single logit z, read as two classes ``[-z, z]``: class 1 is the logit and
class 0 its negation (``-t 1`` / ``-t 0``), so each column's sigmoid is that class's
probability and gradients stay gradients of the logit (or its negation).

`LogitsModel` wraps the user's module for calling only: it adds no hook, changes no
attribute, and layers are still looked up on the user's module by their own names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from camcli.errors import UsageError
from camcli.models.spec import OutputKey, parse_output_key  # noqa: F401 - torch-free, re-exported


def select_logits(output: Any, key: OutputKey = None) -> Tensor:
    """The (B, classes) logits in `output` by the rule above (binary: (B, 2) = [-z, z])."""
    logits = raw_output(output, key)
    if logits.ndim == 1:
        logits = logits[:, None]
    if logits.ndim != 2:
        raise UsageError(
            f"the model's output {_describe(output)} gives a {tuple(logits.shape)} tensor, not (batch, classes) "
            "logits; choose another with --output-key NAME|INDEX"
        )
    if logits.shape[1] == 1:  # one logit: class 1 is z, class 0 is -z
        logits = torch.cat([-logits, logits], dim=1)
    return logits


def raw_output(output: Any, key: OutputKey = None) -> Tensor:
    """The tensor the rule selects, as the model returned it."""
    if key is not None:
        try:
            if isinstance(key, int):
                if isinstance(output, Mapping):
                    found = list(output.values())[key]
                else:
                    found = output[key]
            elif isinstance(output, Mapping) and key in output:
                found = output[key]
            else:
                found = getattr(output, key)
        except (AttributeError, IndexError, KeyError, TypeError):
            message = f"--output-key {key!r}: the model's output {_describe(output)} has no such entry"
            raise UsageError(message) from None
        if not isinstance(found, Tensor):
            raise UsageError(f"--output-key {key!r} selects a {type(found).__name__}, not a tensor of logits")
        return found
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), Tensor):
            return output["logits"]
        values: Sequence[Any] = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = output
    else:
        values = list(output.values()) if hasattr(output, "values") else []
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise UsageError(f"the model returned {_describe(output)}: no tensor of logits in it (--output-key chooses one)")


def _describe(output: Any) -> str:
    if isinstance(output, Tensor):
        return f"a tensor {tuple(output.shape)}"
    if isinstance(output, Mapping) or hasattr(output, "keys"):
        return f"a {type(output).__name__} with keys {list(output.keys())}"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {len(output)}"
    return f"a {type(output).__name__}"


class LogitsModel(nn.Module):
    """Calls the user's model and returns its logits by `select_logits`; nothing else."""

    def __init__(self, net: nn.Module, key: OutputKey = None) -> None:
        super().__init__()
        self.net = net
        self.key = key

    def forward(self, x: Tensor) -> Tensor:
        return select_logits(self.net(x), self.key)


def logits_model(net: nn.Module, key: OutputKey = None) -> LogitsModel:
    """`net` wrapped once (an already wrapped model is returned as is)."""
    if isinstance(net, LogitsModel):
        return net
    return LogitsModel(net, key)
