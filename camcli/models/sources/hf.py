"""Hugging Face `transformers` image classifiers: `--model hf:FOLDER` or `hf:ORG/NAME` (the `hf` extra).

A folder written by ``save_pretrained`` (``config.json``, ``model.safetensors``,
``preprocessor_config.json``), or a model id already in the local Hugging Face cache
(``$HF_HOME/hub/models--ORG--NAME/snapshots/REV``). camcli never downloads
(``local_files_only=True``), never runs a model's own code unless
``--trust-remote-code`` is given, and reads weights only from safetensors or from a
``pytorch_model.bin`` that holds nothing but tensors (``weights_only=True``).

Preprocessing comes from the image processor's config: the side the model sees (the
crop size when the processor crops, else ``size``: ``{"height", "width"}``,
``{"shortest_edge"}`` or a number), the resampling filter, ``image_mean`` and
``image_std`` (0 and 1 when it does not normalise) and MobileViT's BGR channel order.
camcli still feeds the whole image resized to that side, so the map covers all of it.
Class names come from ``config.id2label`` (transformers' ``LABEL_N`` placeholders
count as unnamed).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from camcli.errors import UsageError
from camcli.models.spec import IMAGENET_MEAN, IMAGENET_STD, InputSpec, LoadedModel
from camcli.models.weights import read_state_dict
from camcli.models.zoo import ModelSource, register_source

HF_PREFIX = "hf:"
INSTALL = "pip install 'camcli[hf]'"
# PIL's resampling codes, as image processors store them
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}
_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_WEIGHTS = ("pytorch_model.bin",)


def hf_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


@register_source
class HuggingFaceSource(ModelSource):
    name = "hf"
    runs_remote_code = True

    def claims(self, model: str) -> bool:
        return model.startswith(HF_PREFIX)

    def load(self, model: str, weights: str | None, trust_remote_code: bool = False) -> LoadedModel:
        where = model.removeprefix(HF_PREFIX)
        if not where:
            raise UsageError(f"--model {model!r}: expected hf:FOLDER or hf:ORG/NAME")
        if not hf_available():
            raise UsageError(f"--model hf:...: transformers is not installed ({INSTALL})")
        folder = _local_folder(where)
        config_data = _read_json(folder / "config.json", required=True)
        if "auto_map" in config_data and not trust_remote_code:
            raise UsageError(
                f"--model {model}: config.json asks to run the model's own code (auto_map); camcli runs it "
                "only with --trust-remote-code, after you have read it"
            )
        from transformers import AutoConfig, AutoModelForImageClassification

        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
        except (ValueError, KeyError, OSError) as exc:
            message = f"--model {model}: transformers cannot read its config.json ({_first_line(exc)})"
            raise UsageError(message) from None
        choice = (weights or "DEFAULT").lower()
        random = choice == "none"
        if random:
            net = AutoModelForImageClassification.from_config(config, trust_remote_code=trust_remote_code)
            label = "none"
        elif choice != "default":
            raise UsageError(f"unknown weights {weights!r} for {model}: use DEFAULT (the folder's own) or none")
        else:
            net, label = _pretrained(folder, config, trust_remote_code, model)
        net.eval()
        spec = _input_spec(folder, config, trust_remote_code)
        return LoadedModel(net, model, label, spec, _categories(config), random_weights=random)


def _local_folder(where: str) -> Path:
    """A folder given by path, else the newest snapshot of the id in the local cache."""
    path = Path(where).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UsageError(f"--model hf:{where}: not a folder (save the model with save_pretrained)")
    if where.startswith((".", "/", "~")) or where.count("/") > 1:  # a path, not an ORG/NAME id
        raise UsageError(f"--model hf:{where}: no such folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(where, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise UsageError(
            f"--model hf:{where}: not a folder and not in the local Hugging Face cache ({_first_line(exc)}); "
            "camcli never downloads: save it with save_pretrained, or fetch it once with `hf download`"
        ) from None


def _pretrained(folder: Path, config: Any, trust_remote_code: bool, model: str) -> tuple[Any, str]:
    """The model with the folder's weights: safetensors, or a tensors-only pickle."""
    from transformers import AutoModelForImageClassification

    safe = [name for name in _SAFE_WEIGHTS if (folder / name).is_file()]
    pickled = [name for name in _PICKLE_WEIGHTS if (folder / name).is_file()]
    if not safe and not pickled:
        present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise UsageError(
            f"--model {model}: no model.safetensors or pytorch_model.bin in {folder} (found: {present}); "
            "camcli reads weights only from those"
        )
    if not safe:  # refused here, with camcli's line, if it holds anything but tensors
        read_state_dict(folder / pickled[0])
    common = {"config": config, "local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        if safe:
            net = AutoModelForImageClassification.from_pretrained(folder, use_safetensors=True, **common)
        else:
            net = AutoModelForImageClassification.from_pretrained(
                folder, use_safetensors=False, weights_only=True, **common
            )
    except (ValueError, OSError, RuntimeError) as exc:
        raise UsageError(f"--model {model}: transformers cannot load its weights ({_first_line(exc)})") from None
    return net, f"{model} ({safe[0] if safe else pickled[0]})"


def _input_spec(folder: Path, config: Any, trust_remote_code: bool) -> InputSpec:
    """The image processor's recipe as camcli's: one square side, filter, mean, std, channel order.

    Read from the processor transformers builds from the folder's config (so its class
    defaults apply, e.g. MobileViT's: no normalisation, BGR), without a config the ImageNet
    recipe at ``config.image_size``."""
    default_side = getattr(config, "image_size", 224)
    if isinstance(default_side, (list, tuple)):
        default_side = default_side[-1]
    if not (folder / "preprocessor_config.json").is_file():
        return InputSpec(int(default_side), IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError, ImportError) as exc:
        message = f"{folder / 'preprocessor_config.json'}: transformers cannot read it ({_first_line(exc)})"
        raise UsageError(message) from None
    crop = getattr(proc, "do_center_crop", None) and getattr(proc, "crop_size", None)
    side = _side(crop or getattr(proc, "size", None), int(default_side))
    if getattr(proc, "do_normalize", None):
        mean = tuple(float(v) for v in proc.image_mean)
        std = tuple(float(v) for v in proc.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if getattr(proc, "do_normalize", None) and getattr(proc, "include_top", False):  # EfficientNet divides twice
        std = tuple(v * v for v in std)
    if getattr(proc, "rescale_offset", False):  # pixels to [-1, 1] before normalising: fold it into mean, std
        mean = tuple((1.0 + m) / 2.0 for m in mean)
        std = tuple(v / 2.0 for v in std)
    if (
        getattr(proc, "do_rescale", True) is False
        or abs(float(getattr(proc, "rescale_factor", 1 / 255)) - 1 / 255) > 1e-9
    ):
        raise UsageError(
            f"{folder / 'preprocessor_config.json'}: the model expects pixels not rescaled by 1/255; "
            "camcli feeds [0, 1] pixels"
        )
    interpolation = _RESAMPLE.get(int(getattr(proc, "resample", 2)), "bilinear")
    order = "bgr" if getattr(proc, "do_flip_channel_order", False) else "rgb"
    return InputSpec(side, mean, std, interpolation, channel_order=order)


def _side(size: Any, default: int) -> int:
    """A processor size as one square side: {"height", "width"}, {"shortest_edge"}, or a number."""
    if size is None:
        return default
    if isinstance(size, (int, float)):
        return int(size)
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    height, width, shortest = get("height"), get("width"), get("shortest_edge")
    if height is not None and width is not None:
        if height != width:
            raise UsageError(
                f"the image processor's size is {height}x{width}; camcli feeds a square input: pass --input-size"
            )
        return int(height)
    if shortest is not None:
        return int(shortest)
    raise UsageError(f"cannot read the image processor's size {size!r}; pass --input-size")


def _categories(config: Any) -> list[str] | None:
    """Class names from id2label; transformers' LABEL_0 ... placeholders are no names."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    count = int(getattr(config, "num_labels", len(id2label)))
    names = [id2label.get(i, f"LABEL_{i}") for i in range(count)]
    if count == 1:  # a binary model's one logit: camcli's class 1, its negation class 0
        return None if names[0] == "LABEL_0" else [f"not {names[0]}", names[0]]
    if all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return None
    return names


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise UsageError(f"{path.parent}: no config.json (not a transformers model folder)")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not readable JSON ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
