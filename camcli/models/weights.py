"""Reading and caching state dicts safely: nothing is ever unpickled beyond tensors.

Every checkpoint is read with ``weights_only=True`` or from safetensors; torchvision's
cache is read through its own URL logic but with the same safe loader.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from camcli.errors import UsageError

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum


def cached_state_dict(member: WeightsEnum) -> dict[str, Tensor]:
    """The state dict of a torchvision Weights member, from the torch hub cache.

    Goes through torchvision's own `get_state_dict` (cache under TORCH_HOME, download
    when missing) but with ``weights_only=True``: torchvision would unpickle the cache
    file with ``weights_only=False``. Its download message goes to stderr, not stdout,
    so `--jsonl` output stays clean.
    """
    filename = os.path.basename(urlparse(member.url).path)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return member.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UsageError(_refusal(cache, exc)) from None
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise UsageError(
            f"weights {member} are not in the cache ({cache}) and could not be downloaded "
            f"({exc}); copy the file there or pass --weights FILE"
        ) from None


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from a checkpoint file, never executing code from it.

    Accepts a plain state dict, one nested under ``state_dict`` or ``model``, and
    ``module.`` prefixes left by DataParallel.
    """
    if not path.is_file():
        raise UsageError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UsageError(_refusal(path, exc)) from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear line
        raise UsageError(f"{path}: not a readable torch checkpoint ({exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UsageError(f"{path}: does not hold a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def _refusal(path: Path, exc: Exception) -> str:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"{path}: refused to load: it is not a plain tensor state dict and camcli never "
        f"unpickles arbitrary objects (weights_only=True: {reason})"
    )


def apply_state_dict(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load `state` strictly, or raise one error listing the first mismatches."""
    expected = model.state_dict()
    # BatchNorm fills in num_batches_tracked itself for checkpoints older than it.
    problems = [f"missing {k}" for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise UsageError(f"{source}: state dict does not fit the model: {'; '.join(problems[:5])}{more}")
    model.load_state_dict(state)


def head_classes(model: nn.Module, state: dict[str, Tensor]) -> int | None:
    """The class count of a checkpoint whose final linear layer differs from the model's."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    name, head = linears[-1]
    weight = state.get(f"{name}.weight")
    if weight is None or weight.ndim != 2 or weight.shape[0] == head.out_features:
        return None
    return int(weight.shape[0])


_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def rename_legacy_densenet_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision's DenseNet checkpoints use 'norm.1'-style keys; its loader renames them."""
    renamed = {}
    for key, value in state.items():
        match = _DENSENET_LEGACY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def read_weights_file(path: Path) -> dict[str, Tensor]:
    """A state dict from a .safetensors file (a safe format) or a torch checkpoint."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear line
            raise UsageError(f"{path}: not a readable safetensors file ({exc})") from None
    return read_state_dict(path)


def timm_cached_weights(name: str) -> Path | None:
    """The local file of timm's default pretrained weights for `name`, if already cached.

    Looks where timm itself caches (the Hugging Face hub cache, then torch hub's
    checkpoints folder) without touching the network.
    """
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return Path(found)
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return path
    return None
