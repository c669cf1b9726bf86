"""What an earlier run left in --out, and what a re-run must still do (torch-free, so a
re-run with nothing left to do never loads torch or the model).

An explanation is identified by its (method, target class): a re-run with other methods
or other targets (`-t`, `--topk`) computes only the pairs an image's record lacks and adds
them to it. Everything else in the request (model, layer, input, --contrast, precision,
`-t positive`, --boxes, settings...) redoes the image when it differs.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from camcli.errors import UsageError
from camcli.io import InputItem, read_json
from camcli.models.spec import class_by_name

# Request keys known only once the model is loaded; "asked" records the options as given,
# so a re-run can tell before loading whether anything is left to do.
# Also what loading finds out: the methods `-m all` skipped and those kept in fp32.
_RESOLVED_KEYS = frozenset({"model", "weights", "layer", "input", "fuse", "skipped_methods", "fp32_methods"})
# What a re-run adds to rather than redoes (when the classes are named, not found per image
# at the forward as `-t positive` and a box's class are).
_ADDED_KEYS = frozenset({"target", "topk"})


@dataclass(frozen=True)
class Work:
    """Explanations an image still needs: each of `methods` for each of `classes`."""

    methods: tuple[str, ...]
    classes: tuple[int, ...] | None  # None: the classes the run's target finds at the forward


@dataclass(frozen=True)
class Prior:
    """What an earlier run left for one image."""

    record: dict[str, Any] | None  # its JSON, whatever it holds (its files are removed if replaced)
    reusable: bool  # same request (methods and named targets aside), no error, its files there
    todo: tuple[Work, ...]  # what it lacks of the request (all of it when not reusable)
    classes: tuple[int, ...] | None = None  # the asked classes, in order, where the record resolves them

    @property
    def finished(self) -> bool:
        return self.reusable and not self.todo


def prior_result(
    out_dir: Path,
    item: InputItem,
    request: dict[str, Any],
    loaded: bool = True,
    optional: Collection[str] = (),
    categories: Sequence[str] | None = None,
) -> Prior:
    """The earlier run's record of `item` in `out_dir` and which requested (method, class)
    pairs it lacks.

    The asked classes are read off the record (`asked_classes`; `categories` names the
    classes, for `-t NAME`); a pair is done when the record has an explanation of it (its
    files are all there, or the record is not reusable). Before the model is loaded
    (`loaded=False`) the options as given (``request["asked"]``) stand in for what loading
    resolves (model, weights, layer, input recipe), and the methods that only `-m all` brought
    in (`optional`) and that the earlier run skipped as not applying to that same model (its
    ``skipped_methods``) count as done: they would be skipped again. A method named
    explicitly is never taken as done that way (it refuses).
    """
    methods = tuple(request["methods"])
    everything = (Work(methods, None),)
    path = out_dir / f"{item.key}.json"
    record = read_json(path)
    if record is None or not reusable(path, record, request, loaded):
        return Prior(record, False, everything)
    old = record["request"]
    skipped: set[str] = set()
    if not loaded:
        skipped = {s.get("method") for s in old.get("skipped_methods", ()) if isinstance(s, dict)} & set(optional)
    wanted = tuple(m for m in methods if m not in skipped)
    classes = asked_classes(request, record, categories)
    if classes is not None:
        todo = _missing_pairs(record, wanted, classes)
    elif not added_to(request):  # -t positive, --boxes: the same classes as before, by method
        missing = tuple(m for m in wanted if m not in old.get("methods", ()))
        todo = (Work(missing, None),) if missing else ()
    else:  # the record cannot say which classes are asked (--topk beyond its predictions)
        todo = (Work(wanted, None),)
    if todo and "grid" in request:  # a grid shows every target and method: made anew with all
        return Prior(record, False, everything)
    return Prior(record, True, todo, classes)


def _missing_pairs(record: dict[str, Any], methods: tuple[str, ...], classes: tuple[int, ...]) -> tuple[Work, ...]:
    """The (method, class) pairs the record lacks, the classes that lack the same methods together."""
    done = {(e.get("method"), _target_index(e)) for e in record.get("explanations", ()) if isinstance(e, dict)}
    by_methods: dict[tuple[str, ...], list[int]] = {}
    for index in dict.fromkeys(classes):
        lacking = tuple(m for m in methods if (m, index) not in done)
        if lacking:
            by_methods.setdefault(lacking, []).append(index)
    return tuple(Work(lacking, tuple(found)) for lacking, found in by_methods.items())


def _target_index(explanation: dict[str, Any]) -> int | None:
    target = explanation.get("target")
    index = target.get("index") if isinstance(target, dict) else None
    return index if isinstance(index, int) else None


def added_to(request: dict[str, Any]) -> bool:
    """Whether the request's targets are named classes (top-1, top-k, an index or a name),
    which a re-run adds to; `-t positive` and --boxes find theirs per image at the forward."""
    target = request.get("target")
    boxes = request.get("metrics", {}).get("boxes") if isinstance(request.get("metrics"), dict) else None
    return not (isinstance(target, str) and target.lower() == "positive") and boxes is None


def asked_classes(
    request: dict[str, Any], record: dict[str, Any], categories: Sequence[str] | None = None
) -> tuple[int, ...] | None:
    """The classes `request` asks for this image, in order, as far as its earlier record
    tells: the top-1 / top-k from its ``predictions`` (while it holds k), an index as
    given, a class name by `categories` (the model's class list), else by the record's own
    labels where that is safe. None where they are not known without the model."""
    if not added_to(request):
        return None
    predictions = [p.get("index") for p in record.get("predictions", ()) if isinstance(p, dict)]
    predictions = [index for index in predictions if isinstance(index, int)]
    target = str(request.get("target") or "top1")
    topk = request.get("topk") or 1
    if target.lower() == "top1":
        return tuple(predictions[:topk]) if isinstance(topk, int) and 1 <= topk <= len(predictions) else None
    if target.lstrip("-").isdigit():
        return (int(target),)
    if categories is not None:
        try:
            return (class_by_name(target, categories),)
        except UsageError:  # refused where the run parses its target, with the reason
            return None
    return _named_in_record(target, record)


def _named_in_record(name: str, record: dict[str, Any]) -> tuple[int, ...] | None:
    """A class name by the labels the record shows, only where that is safe without the
    class list: the run that wrote it asked for this very name (so it named one class of
    the model's) and exactly one label in the record is that name, spelled alike."""
    if record["request"].get("target") != name:
        return None
    shown = [*record.get("predictions", ()), *(e.get("target") for e in record.get("explanations", ()))]
    found = {c.get("index") for c in shown if isinstance(c, dict) and c.get("label") == name}
    return (found.pop(),) if len(found) == 1 and isinstance(next(iter(found)), int) else None


def reusable(path: Path, record: dict[str, Any] | None, request: dict[str, Any], loaded: bool = True) -> bool:
    """Whether the record at `path` can be kept and added to by a run of `request`: no error,
    the same request (methods and named targets aside), every file it names there, and
    those files named as this version names them (an older scheme could collide)."""
    if record is None or record.get("error") is not None or not isinstance(record.get("request"), dict):
        return False
    return (
        same_request(record["request"], request, loaded)
        and files_present(path.parent, record)
        and named_as_now(record, path.name.removesuffix(".json"))
    )


def same_request(old: dict[str, Any], new: dict[str, Any], loaded: bool = True) -> bool:
    """Whether two requests ask for the same thing, methods and named targets aside (those are added to)."""
    ignore = {"methods", *_RESOLVED_KEYS} if not loaded else {"methods", "asked"}
    if added_to(old) and added_to(new):
        ignore |= _ADDED_KEYS
    return {k: v for k, v in old.items() if k not in ignore} == {k: v for k, v in new.items() if k not in ignore}


def explanation_stem(name: str, method: str, target: int, top1: int | None) -> str:
    """An explanation's file name without extension: `.c<class>` unless the class is the
    image's own top-1, however it was asked (so two targets never share a file)."""
    return f"{name}.{method}" + ("" if target == top1 else f".c{target}")


def top_class(record: dict[str, Any]) -> int | None:
    """The image's top-1 class by its record (what file names are relative to)."""
    predictions = record.get("predictions") or [{}]
    index = predictions[0].get("index") if isinstance(predictions[0], dict) else None
    return index if isinstance(index, int) else None


def named_as_now(record: dict[str, Any], name: str) -> bool:
    """Every explanation's overlay is named by `explanation_stem` (earlier versions named a
    single target without its class, and top-k's first with it: a new target could collide)."""
    top1 = top_class(record)
    for e in record.get("explanations", ()):
        overlay, index = (e.get("overlay"), _target_index(e)) if isinstance(e, dict) else (None, None)
        if not isinstance(overlay, str) or index is None:
            return False
        if overlay.rsplit(".", 1)[0] != explanation_stem(name, str(e.get("method")), index, top1):
            return False
    return True


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
