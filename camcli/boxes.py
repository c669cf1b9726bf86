"""`--boxes FILE`: object boxes per image, for the pointing game and energy in the box.

Two JSON layouts are read:

* an object: image file name (or path relative to the input folder) -> list of boxes,
  each ``[x0, y0, x1, y1]``, ``[x0, y0, x1, y1, class]`` or
  ``{"bbox": [x0, y0, x1, y1], "class": c}``;
* a list of entries ``{"file": ..., "bbox": [...], "extra_boxes": [[...], ...],
  "class_index": c}`` (the layout of samples/labels.json).

Boxes are in original-image pixels, corners inclusive. An image's target class is its
first classed box's class (else --target, default top-1), and only boxes of that class
or without a class count for it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from camcli.errors import UsageError
from camcli.io import InputItem
from camcli.metrics import Box


@dataclass(frozen=True)
class ImageBoxes:
    """One image's boxes for its target, and that target when a box names it."""

    boxes: tuple[Box, ...]
    target: int | None


@dataclass(frozen=True)
class _Labelled:
    box: Box
    cls: int | None


class BoxIndex:
    """Boxes looked up by an input's path below its folder, else by its file name."""

    def __init__(self, entries: dict[str, list[_Labelled]], source: str) -> None:
        self.source = source
        self._by_key = {_normal(key): boxes for key, boxes in entries.items()}
        by_name: dict[str, list[list[_Labelled]]] = {}
        for key, boxes in self._by_key.items():
            by_name.setdefault(PurePosixPath(key).name, []).append(boxes)
        self._by_name = {name: found[0] for name, found in by_name.items() if len(found) == 1}

    def __len__(self) -> int:
        return len(self._by_key)

    def lookup(self, item: InputItem) -> ImageBoxes | None:
        """The boxes of `item` (its key, its path as given, or its file name), if listed."""
        for key in (item.key, item.path.as_posix()):
            if _normal(key) in self._by_key:
                return _for_target(self._by_key[_normal(key)])
        found = self._by_name.get(item.path.name)
        return _for_target(found) if found is not None else None

    def targets(self, items: Sequence[InputItem]) -> tuple[int | None, ...]:
        """Per-item target class from the boxes (None: none given)."""
        return tuple(b.target if b is not None else None for b in map(self.lookup, items))


def _for_target(labelled: list[_Labelled]) -> ImageBoxes:
    target = next((lb.cls for lb in labelled if lb.cls is not None), None)
    boxes = tuple(lb.box for lb in labelled if lb.cls is None or lb.cls == target)
    return ImageBoxes(boxes, target)


def _normal(key: str) -> str:
    return PurePosixPath(key.replace("\\", "/")).as_posix().removeprefix("./")


def load_boxes(path: Path) -> BoxIndex:
    """Read a boxes file in either layout; a malformed one is a usage error naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"{path}: cannot read boxes: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not a JSON boxes file: {exc}") from None
    try:
        if isinstance(data, dict):
            entries = {str(name): [_box(b) for b in _list(boxes)] for name, boxes in data.items()}
        elif isinstance(data, list):
            entries = {}
            for entry in data:
                if not isinstance(entry, dict) or "file" not in entry:
                    raise ValueError("each list entry needs a 'file'")
                cls = _class(entry.get("class_index"))
                raw = ([entry["bbox"]] if entry.get("bbox") is not None else []) + _list(entry.get("extra_boxes") or [])
                boxes = [_box(b, cls) for b in raw]
                entries.setdefault(str(entry["file"]), []).extend(boxes)
        else:
            raise ValueError("expected an object (file -> boxes) or a list of labelled entries")
    except ValueError as exc:
        raise UsageError(f"{path}: bad boxes file: {exc}") from None
    return BoxIndex(entries, str(path))


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of boxes, not {value!r}")
    return value


def _class(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a class must be a non-negative integer, not {value!r}")
    return value


def _box(value: Any, cls: int | None = None) -> _Labelled:
    if isinstance(value, dict):
        return _box(value.get("bbox", value.get("box")), _class(value.get("class", value.get("class_index", cls))))
    if not isinstance(value, list) or len(value) not in (4, 5):
        raise ValueError(f"a box is [x0, y0, x1, y1] or [x0, y0, x1, y1, class], not {value!r}")
    if len(value) == 5:
        cls = _class(value[4])
    coords = value[:4]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in coords):
        raise ValueError(f"box coordinates must be numbers, not {value!r}")
    x0, y0, x1, y1 = (float(v) for v in coords)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box {value!r} has x1 < x0 or y1 < y0")
    return _Labelled((x0, y0, x1, y1), cls)


def map_boxes(heatmap: Any, threshold: float) -> list[list[int]]:
    """Boxes around the parts of a map at or above `threshold` x its maximum (the Grad-CAM
    paper's localisation rule, 0.15 there): one per 8-connected component, largest area
    first, as inclusive ``[x0, y0, x1, y1]`` in the map's pixels (the original image's
    when the map is at its size). A flat (all-zero) map has none."""
    import cv2
    import numpy as np

    peak = float(heatmap.max()) if heatmap.size else 0.0
    if peak <= 0.0:
        return []
    mask = (heatmap >= threshold * peak).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    found = sorted((stats[k] for k in range(1, count)), key=lambda s: (-int(s[cv2.CC_STAT_AREA]), int(s[1]), int(s[0])))
    return [[int(x), int(y), int(x + w - 1), int(y + h - 1)] for x, y, w, h, _ in found]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two inclusive pixel boxes ``[x0, y0, x1, y1]``."""
    width = min(a[2], b[2]) - max(a[0], b[0]) + 1
    height = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(0.0, width) * max(0.0, height)
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return float(inter / (area_a + area_b - inter))
