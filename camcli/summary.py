"""`--summary FILE.csv`: one row per image x explanation, for spreadsheets.

Built from the same per-image records as the JSON files, so the two never disagree.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from camcli.io import InputItem

COLUMNS = ("image", "model", "method", "layer", "target", "label", "score", "overlay", "error")


class SummaryTable:
    """Collects rows while a run emits records; `to_csv` renders them once at the end."""

    def __init__(self, items: Sequence[InputItem], out_dir: Path) -> None:
        # records name their image by path; map back to the item to know where its files are
        self._folders = {str(item.path): (out_dir / item.key).parent for item in items}
        self.rows: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> None:
        self.rows.extend(summary_rows(record, self._folders.get(record["image"])))

    def to_csv(self) -> bytes:
        return csv_bytes(self.rows)


def summary_rows(record: dict[str, Any], folder: Path | None) -> list[dict[str, Any]]:
    """The rows of one image: one per explanation, or a single row carrying its error."""
    base = {"image": record["image"], "model": record["model"]}
    if not record.get("explanations"):
        return [{**base, "error": record.get("error") or "no explanation"}]
    rows = []
    for e in record["explanations"]:
        overlay = e["overlay"] if folder is None else str(folder / e["overlay"])
        rows.append(
            {
                **base,
                "method": e["method"],
                "layer": e["layer"] or "",
                "target": e["target"]["index"],
                "label": e["target"]["label"],
                "score": f"{e['target']['score']:.6g}",
                "overlay": overlay,
                "error": "",
            }
        )
    return rows


def csv_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()
