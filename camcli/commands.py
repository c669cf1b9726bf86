"""What the discovery commands print: `camcli methods`, `models`, `layers`, `version`.

Each command has one function that gathers the facts as plain data (what `--json`
prints) and one that formats them for a terminal; the CLI only picks between them.
"""

from __future__ import annotations

import fnmatch
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from camcli import __version__
from camcli.methods import method_class, method_classes
from camcli.models.spec import DEFAULT_MODEL, TIMM_PREFIX, InputSpec

if TYPE_CHECKING:  # torch and the model sources load inside the commands that need them
    import torch
    from torch import nn

    from camcli.models import FineLayers

# --- methods ----------------------------------------------------------------------------------


def method_rows(name: str | None = None) -> list[dict[str, Any]]:
    """Every registered method's metadata (methods added later appear by registering),
    or only that of `name` (a usage error with suggestions if there is none)."""
    classes = [method_class(name)] if name else method_classes()
    return [
        {
            "name": cls.name,
            "title": cls.title,
            "paper": cls.paper,
            "url": cls.url,
            "needs": cls.needs,
            "cost": cls.cost,
            "in_all": cls.in_all,
            "settings": [setting.to_json() for setting in cls.settings],
        }
        for cls in classes
    ]


def short_paper(paper: str) -> str:
    """'Zhou, Khosla, ..., CVPR 2016' -> 'Zhou et al., CVPR 2016'; two authors stay
    both ('Zeiler & Fergus, ECCV 2014'); one author is left as written."""
    parts = [p.strip() for p in paper.split(",")]
    if len(parts) <= 2:
        return paper
    authors, venue = parts[:-1], parts[-1]
    lead = f"{authors[0]} & {authors[1]}" if len(authors) == 2 else f"{authors[0]} et al."
    return f"{lead}, {venue}"


def format_methods(rows: list[dict[str, Any]]) -> str:
    table = [
        (r["name"] + ("" if r["in_all"] else " (not in all)"), short_paper(r["paper"]), r["needs"], r["cost"])
        for r in rows
    ]
    return _table(("method", "paper", "needs", "cost"), table)


def format_method(row: dict[str, Any]) -> str:
    """One method: what it is, then its settings as `--set` takes them."""
    lines = [
        f"{row['name']}: {row['title']}" + ("" if row["in_all"] else " (not in all)"),
        f"paper: {row['paper']} {row['url']}",
        f"needs: {row['needs']}; cost: {row['cost']}",
    ]
    if not row["settings"]:
        return "\n".join([*lines, "settings: none"])
    table = [
        (
            f"{row['name']}.{s['name']}",
            " | ".join(s["choices"]) or s["type"],
            "-" if s["default"] is None else str(s["default"]),
            s["help"] + (f" (also {s['alias']})" if s["alias"] else ""),
        )
        for s in row["settings"]
    ]
    return "\n".join([*lines, "settings (--set NAME=VALUE):", _table(("name", "type", "default", "meaning"), table)])


# --- models -----------------------------------------------------------------------------------


@dataclass
class ModelEntry:
    name: str  # what --model takes
    source: str  # embedded | torchvision | timm
    weights: list[dict[str, Any]] = field(default_factory=list)  # {name, default, cached}
    note: str | None = None


def _checkpoint_cached(url: str) -> bool:
    import torch

    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)).is_file()


def model_entries(pattern: str | None = None) -> list[ModelEntry]:
    """The models `--model` accepts, filtered by a glob on the name (like torchvision's
    `list_models(include=...)`); cache status is read from disk, nothing is downloaded."""
    import torchvision

    from camcli.models import timm_cached_weights
    from camcli.models.sources.timm import timm_available
    from camcli.models.sources.torchvision import torchvision_model_names

    def wanted(name: str, prefix: str = "") -> bool:
        return pattern is None or fnmatch.fnmatch(name, pattern) or (prefix and fnmatch.fnmatch(prefix + name, pattern))

    entries = []
    if wanted(DEFAULT_MODEL):
        entries.append(ModelEntry(DEFAULT_MODEL, "embedded", [{"name": "IMAGENET1K", "default": True, "cached": True}]))
    for name in torchvision_model_names():
        if not wanted(name):
            continue
        enum = torchvision.models.get_model_weights(name)
        default = enum.DEFAULT
        weights = [
            {"name": member.name, "default": member is default, "cached": _checkpoint_cached(member.url)}
            for member in enum
        ]
        entries.append(ModelEntry(name, "torchvision", weights))
    if timm_available():
        import timm

        tags: dict[str, list[str]] = {}
        for pretrained in timm.list_pretrained():  # "arch.tag": --model timm:arch.tag picks one
            arch, _, tag = pretrained.partition(".")
            tags.setdefault(arch, []).append(tag)
        for name in timm.list_models():
            if not wanted(name, TIMM_PREFIX):
                continue
            cfg = timm.models.get_pretrained_cfg(name)
            default = cfg.tag if cfg is not None else None
            weights = [
                {"name": tag, "default": tag == default, "cached": timm_cached_weights(f"{name}.{tag}") is not None}
                for tag in tags.get(name, [])
            ]
            entries.append(ModelEntry(TIMM_PREFIX + name, "timm", weights))
    return entries


def format_models(entries: list[ModelEntry], width: int | None = None) -> str:
    """The table of `camcli models`; with `width` (a terminal's), long weight lists are cut to fit."""
    from camcli.models.sources.timm import timm_available

    rows = []
    for entry in entries:
        names = [w["name"] + ("*" if w["default"] and len(entry.weights) > 1 else "") for w in entry.weights]
        cached = [w["name"] for w in entry.weights if w["cached"]]
        cache = "bundled" if entry.source == "embedded" else (", ".join(cached) if cached else "-")
        rows.append((entry.name, entry.source, " ".join(names), cache, entry.note or ""))
    footer = (
        "\n* = DEFAULT (timm: --model timm:NAME.TAG picks a tag); cached = already on this machine\n"
        "(torchvision: $TORCH_HOME/hub/checkpoints, timm: its Hugging Face or torch hub cache).\n"
        "Every model also takes --weights none or a weights file."
    )
    if not timm_available():
        footer += "\ntimm models are listed when timm is installed (pip install 'camcli[timm]')."
    if width is not None:
        footer += "\n~ = cut to fit the terminal: --wide or --json shows every weight."
    return _table(("model", "source", "weights", "cached", ""), rows, width, shrink=(2, 3, 4)) + footer


def models_json(entries: list[ModelEntry]) -> list[dict[str, Any]]:
    return [asdict(entry) for entry in entries]


# --- layers -----------------------------------------------------------------------------------


@dataclass
class LayerRow:
    name: str  # dotted module name, what --layer takes
    type: str
    depth: int
    shape: list[int] | None  # output of the last call; None: not called or not one tensor
    calls: int
    auto: bool  # the layer `--layer auto` picks
    layout: str | None = None  # how its output reads as a map ("NHWC 7x7", "tokens 1+196 -> 14x14"); None: no map
    fine: bool = False  # the finer stage `--layer fine` fuses with the auto layer


def layer_rows(
    model: nn.Module, spec: InputSpec, device: torch.device
) -> tuple[list[LayerRow], str, list[int], FineLayers]:
    """Every named module with its output shape from one dry forward, the auto layer and
    what `--layer fine` fuses.

    The same trace feeds `resolve_layer` and `resolve_fine`, so the marked layers are the
    ones `explain` uses.
    """
    from camcli.models import resolve_fine, resolve_layer, trace_forward
    from camcli.models.layouts import Layout

    trace = trace_forward(model, spec, device)
    auto = resolve_layer(model, "auto", spec, device, trace=trace).name
    fine = resolve_fine(model, spec, device, trace=trace)
    shapes: dict[str, list[int]] = {}
    calls: dict[str, int] = {}
    layouts: dict[str, str | None] = {}
    for (name, output, _), layout in zip(trace.calls, trace.layouts, strict=True):
        shapes[name] = list(output.shape)
        calls[name] = calls.get(name, 0) + 1
        layouts[name] = layout.describe() if isinstance(layout, Layout) else None
    rows = [
        LayerRow(
            name,
            type(module).__name__,
            name.count("."),
            shapes.get(name),
            calls.get(name, 0),
            name == auto,
            layouts.get(name),
            name == fine.partner,
        )
        for name, module in model.named_modules()
        if name
    ]
    return rows, auto, list(trace.logits.shape), fine


def fine_text(fine: FineLayers) -> str:
    """`--layer fine = a + b`, or why it is the auto layer alone."""
    if fine.partner is None:
        return f"--layer fine = {fine.auto} alone ({fine.reason})"
    return f"--layer fine = {fine.partner} + {fine.auto}"


def fine_json(fine: FineLayers) -> dict[str, Any]:
    return {"layers": fine.names, "reason": fine.reason}


def format_layers(
    rows: list[LayerRow],
    auto: str,
    logits: list[int],
    model_name: str,
    max_depth: int | None = None,
    fine: FineLayers | None = None,
) -> str:
    shown = [r for r in rows if max_depth is None or r.depth < max_depth or r.auto or r.fine]
    width = max((2 * r.depth + len(r.name) for r in shown), default=10)
    type_width = max((len(r.type) for r in shown), default=4)
    shape_width = max(
        (len(_shape(r.shape) + (f" x{r.calls}" if r.calls > 1 else "")) for r in shown if r.shape), default=1
    )
    header = f"{model_name}: logits {_shape(logits)}; --layer auto = {auto}"
    lines = [header if fine is None else f"{header}; {fine_text(fine)}"]
    for r in shown:
        shape = (_shape(r.shape) if r.shape is not None else "-") + (f" x{r.calls}" if r.calls > 1 else "")
        mark = "  <- auto" if r.auto else "  <- fine" if r.fine else ""
        read = f"  {r.layout}" if r.layout else ""
        line = f"{'  ' * r.depth + r.name:<{width}}  {r.type:<{type_width}}  {shape:<{shape_width}}{read}{mark}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def _shape(shape: list[int]) -> str:
    return "(" + ", ".join(str(v) for v in shape) + ")"


# --- version ----------------------------------------------------------------------------------


def version_info() -> dict[str, Any]:
    """Versions of what camcli runs on, and the devices `--device auto` could use."""
    import cv2
    import torch
    import torchvision

    from camcli.models.sources.timm import timm_available

    info: dict[str, Any] = {
        "camcli": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "opencv": cv2.__version__,
        "numpy": __import__("numpy").__version__,
        "timm": None,
        "cuda": None,
        "cuda_devices": [],
        "mps": bool(torch.backends.mps.is_available()),
        "cpu_threads": torch.get_num_threads(),
    }
    if timm_available():
        import timm

        info["timm"] = timm.__version__
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def format_version(info: dict[str, Any]) -> str:
    devices = ", ".join(f"cuda:{i} {name}" for i, name in enumerate(info["cuda_devices"]))
    auto = "cuda" if info["cuda_devices"] else "mps" if info["mps"] else "cpu"
    rows = [
        ("camcli", info["camcli"]),
        ("python", f"{info['python']} ({sys.executable})"),
        ("platform", info["platform"]),
        ("torch", info["torch"] + (f" (CUDA {info['cuda']})" if info["cuda"] else "")),
        ("torchvision", info["torchvision"]),
        ("opencv", info["opencv"]),
        ("numpy", info["numpy"]),
        ("timm", info["timm"] or "not installed"),
        ("devices", f"cpu ({info['cpu_threads']} threads)" + (f", {devices}" if devices else "")),
        ("mps", "available" if info["mps"] else "no"),
        ("--device auto", auto),
    ]
    return "\n".join(f"{key:<14}{value}" for key, value in rows)


# --- shared -----------------------------------------------------------------------------------


def _table(
    header: tuple[str, ...], rows: list[tuple[str, ...]], width: int | None = None, shrink: tuple[int, ...] = ()
) -> str:
    """Left-aligned columns; with `width`, the `shrink` columns are cut (ending in '~')
    until each line fits, widest first."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    while width is not None and shrink and sum(widths) + 2 * (len(widths) - 1) > width:
        widest = max(shrink, key=lambda i: widths[i])
        if widths[widest] <= max(len(header[widest]), 8):
            break
        widths[widest] -= 1

    def cell(value: str, w: int) -> str:
        value = str(value)
        return f"{value[: w - 1]}~" if len(value) > w else f"{value:<{w}}"

    lines = ["  ".join(cell(c, w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)
