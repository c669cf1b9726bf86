"""What an earlier run left in --out, and what a re-run must still do (torch-free, so a
re-run with nothing left to do never loads torch or the model)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from camcli.io import InputItem, read_json

# Request keys known only once the model is loaded; "asked" records the options as given,
# so a re-run can tell before loading whether anything is left to do.
_RESOLVED_KEYS = frozenset({"model", "weights", "layer", "input"})


@dataclass(frozen=True)
class Prior:
    """What an earlier run left for one image."""

    record: dict[str, Any] | None  # its JSON, whatever it holds (its files are removed if replaced)
    reusable: bool  # same request (methods aside), no error, every file it names is there
    missing: tuple[str, ...]  # requested methods it lacks (all of them when not reusable)

    @property
    def finished(self) -> bool:
        return self.reusable and not self.missing


def prior_result(
    out_dir: Path, item: InputItem, request: dict[str, Any], loaded: bool = True, optional: Collection[str] = ()
) -> Prior:
    """The earlier run's record of `item` in `out_dir` and which requested methods it lacks.

    Before the model is loaded (`loaded=False`) the options as given (``request["asked"]``)
    stand in for what loading resolves (model, weights, layer, input recipe), and the
    methods that only `-m all` brought in (`optional`) and that the earlier run skipped as
    not applying to that same model (its ``skipped_methods``) count as done: they would be
    skipped again. A method named explicitly is never taken as done that way (it refuses).
    """
    methods = tuple(request["methods"])
    path = out_dir / f"{item.key}.json"
    record = read_json(path)
    if record is None or record.get("error") is not None or not isinstance(record.get("request"), dict):
        return Prior(record, False, methods)
    ignore = {"methods", "skipped_methods", *_RESOLVED_KEYS} if not loaded else {"methods", "asked"}
    old = record["request"]

    def key(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in r.items() if k not in ignore}

    if key(old) != key(request) or not all((path.parent / name).is_file() for name in output_files(record)):
        return Prior(record, False, methods)
    done = set(old.get("methods", ()))
    if not loaded:
        skipped = {s.get("method") for s in old.get("skipped_methods", ()) if isinstance(s, dict)}
        done |= skipped & set(optional)
    missing = tuple(m for m in methods if m not in done)
    if missing and "grid" in request:  # a grid shows every method: made anew with all of them
        return Prior(record, False, methods)
    return Prior(record, True, missing)


def output_files(record: dict[str, Any] | None) -> list[str]:
    """The files (relative to the JSON's folder) a record names."""
    if record is None:
        return []
    explanations = [e for e in record.get("explanations", []) if isinstance(e, dict)]
    names = [e.get(key) for e in explanations for key in ("overlay", "heatmap", "raw_heatmap")]
    names.append(record.get("grid"))
    return [n for n in names if isinstance(n, str) and n]
