"""`camcli report OUT`: one static page (OUT/index.html) to look at a run, not read it.

The page needs no server and no network: CSS and JS are inline, images are relative
links to the overlays beside it and to small JPEG thumbnails made once under
OUT/.thumbs/ (remade only when the source is newer). All rows go into the page as one
JSON blob that the script filters, sorts and renders a page at a time, so a report of
10,000 images opens as fast as one of ten. Every string from a file name or a JSON
file reaches the page either JSON-escaped inside the data blob or through
`textContent`/`setAttribute`, never as HTML; a Content-Security-Policy allows only
the page's own script, by hash.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import json
import math
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import cv2

from camcli import __version__
from camcli.errors import CamcliError, UsageError
from camcli.io import atomic_write, decode_image, encode_image, read_json

REPORT_NAME = "index.html"
THUMB_DIR = ".thumbs"  # OUT/.thumbs/images/<key>.jpg and OUT/.thumbs/overlays/<overlay>.jpg
THUMB_SIDE = 200  # pixels, longest side: sharp at the page's 160 x 120 boxes
THUMB_QUALITY = 80  # JPEG: about 5-10 KB a thumbnail


@dataclass
class ReportSummary:
    """What `write_report` wrote and what it could not use."""

    path: Path
    images: int = 0
    failed: int = 0  # images whose JSON carries an error
    warned: int = 0  # images with a warning (flat map, missing overlay)
    mismatched: int = 0  # top-1 differs from --labels-expected
    unmatched_labels: int = 0  # entries of --labels-expected that named no image
    thumbnails_made: int = 0
    thumbnails_cached: int = 0
    problems: list[str] = field(default_factory=list)  # files the report could not read


@dataclass(frozen=True)
class Expected:
    """An expected class: an index, a name, or both (samples/labels.json gives both)."""

    index: int | None
    name: str | None
    also: tuple[int, ...] = ()  # other indices that count as right (`acceptable_classes`)

    def text(self) -> str:
        if self.name is not None and self.index is not None:
            text = f"{self.name} ({self.index})"
        else:
            text = self.name if self.name is not None else f"class {self.index}"
        return text + (f" or {', '.join(map(str, self.also))}" if self.also else "")

    def matches(self, prediction: dict[str, Any]) -> bool:
        if prediction.get("index") in self.also:
            return True
        if self.index is not None:
            return prediction.get("index") == self.index
        return str(prediction.get("label", "")).strip().casefold() == (self.name or "").strip().casefold()


def load_expected(path: Path) -> dict[str, Expected]:
    """Read --labels-expected: a JSON object {image: class name or index}, or a list of
    {"file", "class_index" and/or "class_name", optionally "acceptable_classes"} like
    samples/labels.json."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read --labels-expected {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"--labels-expected {path} is not valid JSON: {exc}") from None
    expected: dict[str, Expected] = {}
    if isinstance(data, dict):
        for image, value in data.items():
            expected[image] = _expected_value(value, path, image)
    elif isinstance(data, list):
        for entry in data:
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise UsageError(f'--labels-expected {path}: every list entry needs a "file"')
            index, name = entry.get("class_index"), entry.get("class_name")
            index_ok = index is None or (isinstance(index, int) and not isinstance(index, bool))
            if not index_ok or not (name is None or isinstance(name, str)) or (index is None and name is None):
                raise UsageError(
                    f"--labels-expected {path}: {entry['file']} needs an integer class_index and/or a class_name"
                )
            also = entry.get("acceptable_classes") or []
            if not isinstance(also, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in also):
                raise UsageError(f"--labels-expected {path}: {entry['file']}: acceptable_classes must list indices")
            expected[entry["file"]] = Expected(index, name, tuple(i for i in also if i != index))
    else:
        raise UsageError(f"--labels-expected {path} must hold a JSON object or list")
    return expected


def _expected_value(value: Any, path: Path, image: str) -> Expected:
    if isinstance(value, int) and not isinstance(value, bool):
        return Expected(value, None)
    if isinstance(value, str) and value.strip():
        text = value.strip()
        return Expected(int(text), None) if text.isdigit() else Expected(None, text)
    raise UsageError(f"--labels-expected {path}: {image!r} needs a class name or index, not {value!r}")


def write_report(
    out_dir: Path,
    labels_expected: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    report_problem: Callable[[str], None] | None = None,
) -> ReportSummary:
    """Make the thumbnails that are missing or stale and write OUT/index.html atomically.

    `progress(done, total)` follows the thumbnails; `report_problem` gets one line per
    file the report could not read (those rows still appear, with a warning)."""
    if not out_dir.is_dir():
        raise UsageError(f"no such output folder: {out_dir}")
    expected = load_expected(labels_expected) if labels_expected is not None else None
    summary = ReportSummary(path=out_dir / REPORT_NAME)

    def problem(message: str) -> None:
        summary.problems.append(message)
        if report_problem is not None:
            report_problem(message)

    records = _find_records(out_dir, problem)
    if not records:
        raise UsageError(f"no camcli results (*.json) in {out_dir}; run `camcli explain ... -o {out_dir}` first")

    plans = [_plan_row(out_dir, key, record) for key, record in records]
    jobs = {thumb: source for plan in plans for source, thumb in plan.thumbnails}
    failures = _make_thumbnails(jobs, summary, progress)
    for plan in plans:
        for source, thumb in plan.thumbnails:
            if thumb in failures:
                plan.drop_thumbnail(thumb, failures[thumb])
                if plan.counts_as_problem(thumb):
                    problem(f"{source}: {failures[thumb]}")

    rows = [plan.row for plan in plans]
    used_labels: set[str] = set()
    if expected is not None:
        for plan in plans:
            _mark_expected(plan.row, expected, used_labels)
        summary.unmatched_labels = len(set(expected) - used_labels)
    summary.images = len(rows)
    summary.failed = sum(row["error"] is not None for row in rows)
    summary.warned = sum(bool(row["warnings"]) for row in rows)
    summary.mismatched = sum(row["mismatch"] is True for row in rows)
    data = {"camcli": __version__, "has_expected": expected is not None, "rows": rows}
    atomic_write(summary.path, render_html(data, title=f"camcli report: {out_dir.resolve().name}"))
    return summary


# -- reading the run -------------------------------------------------------------------------


def _find_records(out_dir: Path, problem: Callable[[str], None]) -> list[tuple[str, dict[str, Any]]]:
    """(key, record) of every camcli JSON under OUT, by key; other JSON files are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(out_dir):
        if Path(dirpath) == out_dir and THUMB_DIR in dirnames:
            dirnames.remove(THUMB_DIR)
        dirnames.sort()
        for name in sorted(filenames):
            if not name.endswith(".json") or name.startswith("."):  # .name.json.xxx.tmp never ends so
                continue
            path = Path(dirpath) / name
            record = read_json(path)
            if record is None:
                problem(f"{path}: cannot read this JSON; left out of the report")
                continue
            if "schema_version" not in record or not isinstance(record.get("explanations"), list):
                continue  # not written by camcli explain (a labels file, a summary, ...)
            if not isinstance(record.get("predictions"), list):
                continue
            key = path.relative_to(out_dir).as_posix()[: -len(".json")]
            found.append((key, record))
    return found


def url(path: PurePosixPath | str) -> str:
    """A relative URL for a path relative to OUT: every segment percent-encoded from its
    bytes, so spaces, '#', '%', '?', ':' and any Unicode (even undecodable names) work."""
    return "/".join(quote(os.fsencode(part), safe="") for part in PurePosixPath(path).parts)


def _inside(relative: str) -> PurePosixPath | None:
    """`relative` as a path inside OUT, or None if it is absolute or climbs out."""
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path


def _score(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _index(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


class _RowPlan:
    """One row of the page and the thumbnails it needs."""

    def __init__(self, row: dict[str, Any]) -> None:
        self.row = row
        self.thumbnails: list[tuple[Path, Path]] = []  # (source, thumbnail)
        self._slots: dict[Path, dict[str, Any]] = {}  # thumbnail -> the dict whose "thumb" it is

    def add_thumbnail(self, source: Path, thumb: Path, out_dir: Path, slot: dict[str, Any]) -> None:
        self.thumbnails.append((source, thumb))
        self._slots[thumb] = slot
        slot["thumb"] = url(thumb.relative_to(out_dir).as_posix())

    def drop_thumbnail(self, thumb: Path, reason: str) -> None:
        slot = self._slots[thumb]
        slot["thumb"] = None
        if slot is not self.row:  # an overlay the run wrote is gone or broken: worth a warning
            slot["overlay"] = None
            self.row["warnings"].append(f"{slot['method']}: overlay {reason}")

    def counts_as_problem(self, thumb: Path) -> bool:
        """A missing original is normal (a failed image, a run from another folder);
        a missing overlay is not."""
        return self._slots[thumb] is not self.row


def _plan_row(out_dir: Path, key: str, record: dict[str, Any]) -> _RowPlan:
    folder = PurePosixPath(key).parent
    predictions = [
        {"label": _text(p.get("label")), "index": _index(p.get("index")), "score": _score(p.get("score"))}
        for p in record.get("predictions") or []
        if isinstance(p, dict)
    ]
    image = str(record.get("image") or key)
    row: dict[str, Any] = {
        "key": key,
        "image": image,
        "src": None,
        "thumb": None,
        "model": _text(record.get("model")),
        "preds": predictions,
        "top": predictions[0]["label"] if predictions else None,
        "score": predictions[0]["score"] if predictions else None,
        "expl": [],
        "error": _text(record.get("error")),
        "warnings": [],
        "expected": None,
        "mismatch": None,
    }
    plan = _RowPlan(row)
    source = Path(image)
    if source.is_file():  # recorded relative to the run's working folder, or absolute
        with contextlib.suppress(ValueError):  # Windows: on another drive, no relative link
            row["src"] = url(os.path.relpath(source.absolute(), out_dir.absolute()))
        if row["error"] is None:
            plan.add_thumbnail(source, out_dir / THUMB_DIR / "images" / f"{key}.jpg", out_dir, row)
    for e in record.get("explanations") or []:
        if not isinstance(e, dict):
            continue
        target = e.get("target") if isinstance(e.get("target"), dict) else {}
        item = {
            "method": _text(e.get("method")),
            "label": _text(target.get("label")),
            "index": _index(target.get("index")),
            "score": _score(target.get("score")),
            "overlay": None,
            "thumb": None,
            "warning": _text(e.get("warning")),
        }
        row["expl"].append(item)
        if item["warning"]:
            row["warnings"].append(f"{item['method']}: {item['warning']}")
        overlay = _inside(e["overlay"]) if isinstance(e.get("overlay"), str) else None
        if overlay is None:
            row["warnings"].append(f"{item['method']}: no overlay file")
            continue
        relative = folder / overlay
        item["overlay"] = url(relative)
        thumb = out_dir / THUMB_DIR / "overlays" / f"{relative}.jpg"
        plan.add_thumbnail(out_dir / relative, thumb, out_dir, item)
    return plan


def _mark_expected(row: dict[str, Any], expected: dict[str, Expected], used: set[str]) -> None:
    """Find the image's expected class by its path in OUT, its recorded path or its name."""
    for name in (row["key"], row["image"], PurePosixPath(row["key"]).name):
        if name in expected:
            used.add(name)
            wanted = expected[name]
            row["expected"] = wanted.text()
            if row["preds"]:
                row["mismatch"] = not wanted.matches(row["preds"][0])
            return


# -- thumbnails ------------------------------------------------------------------------------


def _make_thumbnails(
    jobs: dict[Path, Path], summary: ReportSummary, progress: Callable[[int, int], None] | None
) -> dict[Path, str]:
    """Make every thumbnail (thumbnail -> source) not newer than its source, in threads
    (cv2 releases the GIL); returns thumbnail -> why it could not be made."""
    failures: dict[Path, str] = {}
    total = len(jobs)
    with ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="camcli-thumb") as pool:
        futures = {thumb: pool.submit(_thumbnail, source, thumb) for thumb, source in jobs.items()}
        for done, (thumb, future) in enumerate(futures.items(), 1):
            try:
                made = future.result()
            except FileNotFoundError:
                failures[thumb] = "missing"
            except CamcliError as exc:
                failures[thumb] = str(exc)
            except OSError as exc:
                failures[thumb] = f"cannot read or write: {exc.strerror or exc}"
            else:
                if made:
                    summary.thumbnails_made += 1
                else:
                    summary.thumbnails_cached += 1
            if progress is not None:
                progress(done, total)
    return failures


def _thumbnail(source: Path, thumb: Path) -> bool:
    """Write a JPEG of at most THUMB_SIDE pixels; False when the one there is current."""
    source_time = source.stat().st_mtime_ns
    try:
        if thumb.stat().st_mtime_ns >= source_time:
            return False
    except FileNotFoundError:
        pass
    image = decode_image(source)
    height, width = image.shape[:2]
    scale = THUMB_SIDE / max(height, width)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    atomic_write(thumb, encode_image(image, "jpg", THUMB_QUALITY))
    return True


# -- the page --------------------------------------------------------------------------------


def script_json(value: Any) -> str:
    """JSON that is safe inside <script>: ASCII only, and no '<', '>' or '&' outside
    escapes, so no string can close the element or open a comment."""
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def render_html(data: dict[str, Any], title: str) -> bytes:
    """The whole page: data blob, CSS and script inline; CSP allows only this script."""
    digest = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
    policy = (
        "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    )
    parts = {
        "POLICY": policy,
        "TITLE": html.escape(title),
        "STYLE": _STYLE,
        "DATA": script_json(data),
        "SCRIPT": _SCRIPT,
    }
    # one pass, so a file named "@SCRIPT@" stays text
    page = re.sub(r"@([A-Z]+)@", lambda m: parts[m.group(1)], _PAGE)
    return page.encode("utf-8", "replace")


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="@POLICY@">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@TITLE@</title>
<style>@STYLE@</style>
</head>
<body>
<header>
  <h1>@TITLE@</h1>
  <p id="totals"></p>
  <div id="controls">
    <label title="by top-1 score">Sort <select id="sort">
      <option value="name">name</option>
      <option value="score-desc">score, high first</option>
      <option value="score-asc">score, low first</option>
      <option value="class">predicted class</option>
    </select></label>
    <label>Predicted class <select id="class"><option value="">all</option></select></label>
    <label>Errors/warnings <select id="issues">
      <option value="all">all images</option>
      <option value="any">error or warning</option>
      <option value="error">errors</option>
      <option value="warning">warnings</option>
      <option value="none">neither</option>
    </select></label>
    <label id="expected-filter" hidden>Expected <select id="expected">
      <option value="all">all images</option>
      <option value="mismatch">top-1 &ne; expected</option>
      <option value="match">top-1 = expected</option>
      <option value="unlabelled">no expected class</option>
    </select></label>
    <label>Name <input id="query" type="search" placeholder="filter by name"></label>
  </div>
  <nav><button id="prev" type="button">&larr; previous</button> <span id="page"></span>
  <button id="next" type="button">next &rarr;</button> <span id="count"></span></nav>
</header>
<main id="rows"></main>
<noscript>This report needs JavaScript to show its rows.</noscript>
<script type="application/json" id="camcli-data">@DATA@</script>
<script>@SCRIPT@</script>
</body>
</html>
"""

_STYLE = """
:root { --line: #d8dce3; --muted: #5f6b7a; --bad: #c62828; --warn: #b26a00; --good: #2e7d32; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.35 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1d232b; background: #f5f6f8; }
header { position: sticky; top: 0; z-index: 1; background: #fff; border-bottom: 1px solid var(--line);
         padding: 8px 16px; }
h1 { font-size: 17px; margin: 0 0 2px; }
#totals { margin: 0 0 6px; color: var(--muted); }
#controls { display: flex; flex-wrap: wrap; gap: 6px 14px; margin-bottom: 6px; }
label { color: var(--muted); }
select, input, button { font: inherit; }
select { max-width: 15em; }
nav { display: flex; gap: 8px; align-items: center; }
#count { color: var(--muted); }
main { padding: 0 16px 24px; }
.row { display: grid; grid-template-columns: 168px 250px 1fr; gap: 14px; padding: 10px 8px;
       background: #fff; border-bottom: 1px solid var(--line); border-left: 4px solid transparent; }
.row.mismatch { border-left-color: var(--bad); }
.row.failed { background: #fff6f6; }
.thumb { width: 160px; height: 120px; object-fit: contain; background: #2a2f36; display: block;
         border-radius: 3px; }
.missing { display: flex; align-items: center; justify-content: center; color: #c9ced6; font-size: 12px;
           text-align: center; padding: 4px; }
.name { margin-top: 4px; font-size: 13px; font-weight: 600; overflow-wrap: anywhere; }
.model { color: var(--muted); font-size: 12px; overflow-wrap: anywhere; }
.badges { display: flex; flex-wrap: wrap; gap: 4px; margin-top: 4px; }
.badge { font-size: 11px; padding: 1px 6px; border-radius: 8px; color: #fff; }
.badge.error { background: var(--bad); } .badge.warning { background: var(--warn); }
.badge.mismatch { background: #6a1b9a; }
.preds { list-style: none; margin: 0; padding: 0; }
.preds li { position: relative; display: flex; justify-content: space-between; gap: 8px;
            padding: 2px 6px; margin-bottom: 2px; border-radius: 3px; overflow: hidden; }
.preds li:first-child { font-weight: 600; }
.preds .bar { position: absolute; inset: 0 auto 0 0; background: #dbe7fb; z-index: 0; }
.preds span { position: relative; z-index: 1; overflow-wrap: anywhere; }
.preds .score { font-variant-numeric: tabular-nums; color: var(--muted); white-space: nowrap; }
.expected { margin-top: 6px; font-size: 13px; }
.expected.bad { color: var(--bad); font-weight: 600; } .expected.good { color: var(--good); }
.error-text { color: var(--bad); white-space: pre-wrap; overflow-wrap: anywhere; }
.warnings { color: var(--warn); margin: 4px 0 0; padding-left: 18px; }
.overlays { display: flex; flex-wrap: wrap; gap: 10px; align-content: flex-start; }
figure { margin: 0; width: 160px; }
figcaption { font-size: 12px; margin-top: 3px; overflow-wrap: anywhere; }
figcaption .method { font-weight: 600; } figcaption .warn { color: var(--warn); }
.empty { padding: 24px; color: var(--muted); }
"""

_SCRIPT = """
"use strict";
const DATA = JSON.parse(document.getElementById("camcli-data").textContent);
const ROWS = DATA.rows;
ROWS.forEach((row, i) => { row.order = i; });
const PAGE_SIZE = 50;
/* The view lives in the URL's #fragment (#sort=score-desc&issues=any&page=2), so a filtered
   view can be bookmarked or shared. Keys are the ids of the controls. */
const DEFAULTS = { sort: "name", class: "", issues: "all", expected: "all", query: "", page: 0 };
const state = { ...DEFAULTS };
const $ = (id) => document.getElementById(id);

/* Every value reaches the page as a text node or an attribute, never as HTML. */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}
const percent = (score) => (score === null ? "" : (100 * score).toFixed(1) + "%");

function picture(thumb, href, alt, absent) {
  if (!thumb) return el("div", { class: "thumb missing" }, absent);
  const img = el("img", { class: "thumb", loading: "lazy", decoding: "async", alt: alt });
  img.addEventListener("error", () => {
    img.replaceWith(el("div", { class: "thumb missing broken" }, "file not found"));
  });
  img.src = thumb;
  return href ? el("a", { href: href }, img) : img;
}

function rowNode(row) {
  const badges = el("div", { class: "badges" });
  if (row.error !== null) badges.append(el("span", { class: "badge error" }, "error"));
  if (row.warnings.length) badges.append(el("span", { class: "badge warning" }, "warning"));
  if (row.mismatch === true) badges.append(el("span", { class: "badge mismatch" }, "top-1 \\u2260 expected"));
  const info = el("div", { class: "info" },
    picture(row.thumb, row.src, row.key, row.error !== null ? "no image" : "original not found"),
    el("div", { class: "name", title: row.image }, row.key),
    row.model === null ? null : el("div", { class: "model" }, row.model),
    badges);

  const preds = el("ol", { class: "preds" });
  for (const p of row.preds) {
    const bar = el("span", { class: "bar" });
    bar.style.width = percent(p.score || 0);
    preds.append(el("li", { title: "class " + p.index }, bar, el("span", {}, p.label ?? String(p.index)),
      el("span", { class: "score" }, percent(p.score))));
  }
  const middle = el("div", { class: "predictions" }, preds);
  if (row.expected !== null) {
    const tone = row.mismatch === true ? "bad" : row.mismatch === false ? "good" : "";
    middle.append(el("div", { class: "expected " + tone }, "expected: " + row.expected));
  }
  if (row.error !== null) middle.append(el("div", { class: "error-text" }, row.error));
  if (row.warnings.length) middle.append(el("ul", { class: "warnings" }, ...row.warnings.map((w) => el("li", {}, w))));

  const overlays = el("div", { class: "overlays" });
  for (const e of row.expl) {
    const caption = el("figcaption", {}, el("span", { class: "method" }, e.method), " ",
      e.label ?? String(e.index), " ", percent(e.score));
    if (e.warning) caption.append(" ", el("span", { class: "warn" }, e.warning));
    overlays.append(el("figure", {}, picture(e.thumb, e.overlay, e.method, "overlay missing"), caption));
  }
  const classes = ["row"];
  if (row.mismatch === true) classes.push("mismatch");
  if (row.error !== null) classes.push("failed");
  return el("section", { class: classes.join(" "), "data-key": row.key }, info, middle, overlays);
}

function keep(row) {
  if (state.class && row.top !== state.class) return false;
  const error = row.error !== null;
  const warning = row.warnings.length > 0;
  if (state.issues === "any" && !error && !warning) return false;
  if (state.issues === "error" && !error) return false;
  if (state.issues === "warning" && !warning) return false;
  if (state.issues === "none" && (error || warning)) return false;
  if (state.expected === "mismatch" && row.mismatch !== true) return false;
  if (state.expected === "match" && row.mismatch !== false) return false;
  if (state.expected === "unlabelled" && row.expected !== null) return false;
  if (state.query && !row.key.toLowerCase().includes(state.query.toLowerCase())) return false;
  return true;
}

const byOrder = (a, b) => a.order - b.order;
const SORTS = {  /* rows without a score (failed images) go last either way */
  "name": byOrder,
  "score-desc": (a, b) => (b.score ?? -1) - (a.score ?? -1) || byOrder(a, b),
  "score-asc": (a, b) => (a.score ?? 2) - (b.score ?? 2) || byOrder(a, b),
  "class": (a, b) => (a.top ?? "\\uffff").localeCompare(b.top ?? "\\uffff") || (b.score ?? -1) - (a.score ?? -1),
};

function render() {
  const shown = ROWS.filter(keep).sort(SORTS[state.sort]);
  const pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
  state.page = Math.min(state.page, pages - 1);
  const start = state.page * PAGE_SIZE;
  const slice = shown.slice(start, start + PAGE_SIZE);
  const nodes = slice.length ? slice.map(rowNode) : [el("p", { class: "empty" }, "No image matches.")];
  $("rows").replaceChildren(...nodes);
  $("page").textContent = "page " + (state.page + 1) + " of " + pages;
  $("count").textContent = shown.length
    ? "images " + (start + 1) + "\\u2013" + (start + slice.length) + " of " + shown.length
      + (shown.length === ROWS.length ? "" : " (filtered from " + ROWS.length + ")")
    : "";
  $("prev").disabled = state.page === 0;
  $("next").disabled = state.page >= pages - 1;
}

const CONTROLS = ["sort", "class", "issues", "expected", "query"];

function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  for (const key of CONTROLS) {
    $(key).value = params.get(key) ?? DEFAULTS[key];
    if ($(key).value === "" && key !== "class" && key !== "query") $(key).value = DEFAULTS[key];  /* unknown option */
    state[key] = $(key).value;
  }
  state.page = Math.max(0, (parseInt(params.get("page"), 10) || 1) - 1);
}

function update() {
  render();
  const params = new URLSearchParams();
  for (const key of CONTROLS) if (state[key] !== DEFAULTS[key]) params.set(key, state[key]);
  if (state.page) params.set("page", state.page + 1);
  const hash = params.toString();
  history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
}

function setup() {
  const counts = new Map();
  for (const row of ROWS) if (row.top !== null) counts.set(row.top, (counts.get(row.top) || 0) + 1);
  const classes = [...counts].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  for (const [name, n] of classes) $("class").append(el("option", { value: name }, name + " (" + n + ")"));
  const failed = ROWS.filter((r) => r.error !== null).length;
  const warned = ROWS.filter((r) => r.warnings.length).length;
  let totals = ROWS.length + " images, " + failed + " with an error, " + warned + " with a warning";
  if (DATA.has_expected) {
    $("expected-filter").hidden = false;
    totals += ", " + ROWS.filter((r) => r.mismatch === true).length + " whose top-1 is not the expected class";
  }
  $("totals").textContent = totals + " \\u00b7 camcli " + DATA.camcli;
  readHash();
  for (const key of CONTROLS) {
    $(key).addEventListener("input", () => { state[key] = $(key).value; state.page = 0; update(); });
  }
  const turn = (step) => { state.page += step; update(); window.scrollTo(0, 0); };
  $("prev").addEventListener("click", () => turn(-1));
  $("next").addEventListener("click", () => turn(1));
  document.addEventListener("keydown", (event) => {
    if (event.target.closest("input, select")) return;
    if (event.key === "ArrowLeft" && !$("prev").disabled) turn(-1);
    if (event.key === "ArrowRight" && !$("next").disabled) turn(1);
  });
  window.addEventListener("hashchange", () => { readHash(); render(); });
  render();
}
setup();
"""
