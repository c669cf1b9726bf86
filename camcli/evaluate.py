"""`camcli evaluate`: the metrics of `explain --metrics` over a folder, as means per method.

The per-image records come from the explain pipeline (so outputs and resumption are
the same); this module only averages them and writes the table as CSV and JSON.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from camcli.io import atomic_write, json_bytes
from camcli.metrics import METRIC_NAMES as TORCH_METRICS

# The torch metrics, then the localisation IoU the writer computes from --box-threshold boxes:
# the largest box of the thresholded map against the best-matching labelled box (Grad-CAM, sec. 4.1).
METRIC_NAMES = (*TORCH_METRICS, "localisation_iou")

# (metric, table heading, scale): the Grad-CAM++ pair shown in per cent, as in the paper.
COLUMNS = (
    ("pointing_game", "pointing game ↑", 1.0),
    ("energy_in_box", "energy in box ↑", 1.0),
    ("localisation_iou", "loc. IoU ↑", 1.0),
    ("deletion_auc", "deletion AUC ↓", 1.0),
    ("insertion_auc", "insertion AUC ↑", 1.0),
    ("average_drop", "avg drop % ↓", 100.0),
    ("increase_in_confidence", "increase % ↑", 100.0),
    ("road_morf", "ROAD MoRF ↓", 1.0),
    ("road_lerf", "ROAD LeRF ↑", 1.0),
)


@dataclass
class MethodSummary:
    method: str
    images: int  # images explained with this method
    means: dict[str, float | None]  # metric -> mean over images that have it (None: none have it)
    counts: dict[str, int]  # metric -> how many images have it (box metrics: images with boxes)
    hits: int  # pointing-game hits

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "images": self.images,
            "pointing_game_hits": self.hits,
            **{name: self.means[name] for name in METRIC_NAMES},
            "counts": self.counts,
        }


def summarise(records: Iterable[dict[str, Any]], methods: Sequence[str]) -> list[MethodSummary]:
    """Mean of every metric per method over the records' explanations (failed images
    have none); booleans count as 0/1, missing (null) values are left out."""
    values: dict[str, dict[str, list[float]]] = {m: {n: [] for n in METRIC_NAMES} for m in methods}
    images = dict.fromkeys(methods, 0)
    for record in records:
        for entry in record.get("explanations", []):
            method, metrics = entry.get("method"), entry.get("metrics")
            if method not in values or not isinstance(metrics, dict):
                continue
            images[method] += 1
            for name in METRIC_NAMES:
                if metrics.get(name) is not None:
                    values[method][name].append(float(metrics[name]))
    summaries = []
    for method in methods:
        per = values[method]
        summaries.append(
            MethodSummary(
                method=method,
                images=images[method],
                means={n: (math.fsum(v) / len(v) if v else None) for n, v in per.items()},
                counts={n: len(v) for n, v in per.items()},
                hits=int(sum(per["pointing_game"])),
            )
        )
    return summaries


def table(summaries: Sequence[MethodSummary], title: str) -> Table:
    """The rich table `camcli evaluate` prints."""
    out = Table(title=title)
    out.add_column("method", no_wrap=True)
    out.add_column("images", justify="right")
    columns = [c for c in COLUMNS if not c[0].startswith("road_") or any(s.means[c[0]] is not None for s in summaries)]
    for _, heading, _ in columns:
        out.add_column(heading, justify="right")
    for s in summaries:
        cells = []
        for name, _, scale in columns:
            mean = s.means[name]
            if mean is None:
                cells.append("-")
            elif name == "pointing_game":
                cells.append(f"{s.hits}/{s.counts[name]}")
            else:
                cells.append(f"{mean * scale:.3f}" if scale == 1.0 else f"{mean * scale:.1f}")
        out.add_row(s.method, str(s.images), *cells)
    return out


def write_summary(out_dir: Path, summaries: Sequence[MethodSummary], request: dict[str, Any]) -> tuple[Path, Path]:
    """summary.csv (one row per method, means as fractions) and summary.json in out_dir."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "images", "pointing_game_hits", *METRIC_NAMES])
    for s in summaries:
        means = ["" if s.means[n] is None else f"{s.means[n]:.6g}" for n in METRIC_NAMES]
        writer.writerow([s.method, s.images, s.hits, *means])
    csv_path, json_path = out_dir / "summary.csv", out_dir / "summary.json"
    atomic_write(csv_path, buffer.getvalue().encode())
    atomic_write(json_path, json_bytes({"request": request, "methods": [s.to_json() for s in summaries]}))
    return csv_path, json_path
