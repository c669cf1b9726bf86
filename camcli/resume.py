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
# Also what loading finds out: the methods `-m all` skipped and those kept in fp32.
_RESOLVED_KEYS = frozenset({"model", "weights", "layer", "input", "fuse", "skipped_methods", "fp32_methods"})


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
    old = record["request"]
    if not same_request(old, request, loaded) or not files_present(path.parent, record):
        return Prior(record, False, methods)
    done = set(old.get("methods", ()))
    if not loaded:
        skipped = {s.get("method") for s in old.get("skipped_methods", ()) if isinstance(s, dict)}
        done |= skipped & set(optional)
    missing = tuple(m for m in methods if m not in done)
    if missing and "grid" in request:  # a grid shows every method: made anew with all of them
        return Prior(record, False, methods)
    return Prior(record, True, missing)


def same_request(old: dict[str, Any], new: dict[str, Any], loaded: bool = True) -> bool:
    """Whether two requests ask for the same thing, methods aside (those are added to)."""
    ignore = {"methods", *_RESOLVED_KEYS} if not loaded else {"methods", "asked"}
    return {k: v for k, v in old.items() if k not in ignore} == {k: v for k, v in new.items() if k not in ignore}


def files_present(folder: Path, record: dict[str, Any]) -> bool:
    """Every file the record names is there (else its image is redone)."""
    return all((folder / name).is_file() for name in output_files(record))


def output_files(record: dict[str, Any] | None) -> list[str]:
    """The files (relative to the JSON's folder) a record names."""
    if record is None:
        return []
    explanations = [e for e in record.get("explanations", []) if isinstance(e, dict)]
    names = [e.get(key) for e in explanations for key in ("overlay", "heatmap", "raw_heatmap")]
    names.append(record.get("grid"))
    return [n for n in names if isinstance(n, str) and n]
