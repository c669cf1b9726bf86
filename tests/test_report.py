"""`camcli report`: the page's data, links, escaping, thumbnails and expected labels, checked
on a real run (random-weight resnet18 at 64 px on the sample photos, under hostile names),
and the page itself rendered in headless Chromium when one is installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from camcli.cli import app
from camcli.report import THUMB_SIDE, write_report

runner = CliRunner()

# output key (path below the input folder) -> sample photo copied there; None: not an image
INPUTS: dict[str, str | None] = {
    "camera.png": "skimage_camera.png",
    "sub dir/café #1 50%?.png": "skimage_chelsea.png",
    "\"><img src=x onerror=document.title='pwned'>.png": "skimage_coffee.png",
    # folders "<" and "script>..<" make the key close the data <script> element
    "</script><script>document.title='pwned'</script>.png": "skimage_coffee.png",
    "broken.png": None,
}
RUN = ["--model", "resnet18", "--weights", "none", "--input-size", "64", "-m", "cam,gradcam", "-q"]


def make_inputs(folder: Path, samples_dir: Path) -> None:
    for key, sample in INPUTS.items():
        path = folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        if sample is None:
            path.write_bytes(b"not an image")
        else:
            shutil.copyfile(samples_dir / sample, path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, samples_dir) -> Path:
    """A real run with one undecodable file; the report is written by `explain --report`."""
    inputs = tmp_path_factory.mktemp("inputs")
    make_inputs(inputs, samples_dir)
    out = tmp_path_factory.mktemp("out")
    result = runner.invoke(app, ["explain", str(inputs), "-o", str(out), *RUN, "--report"])
    assert result.exit_code == 1, result.output  # broken.png failed; everything else worked
    assert (out / "index.html").is_file()
    return out


def page_data(out: Path) -> dict[str, Any]:
    page = (out / "index.html").read_text(encoding="utf-8")
    blob = re.search(r'<script type="application/json" id="camcli-data">(.*?)</script>', page, re.S)
    assert blob is not None
    return json.loads(blob.group(1))


def rows_by_key(out: Path) -> dict[str, dict[str, Any]]:
    return {row["key"]: row for row in page_data(out)["rows"]}


def test_one_row_per_image_with_predictions_overlays_and_errors(run_dir: Path) -> None:
    rows = rows_by_key(run_dir)
    assert set(rows) == set(INPUTS) == {p.relative_to(run_dir).as_posix()[:-5] for p in run_dir.rglob("*.json")}
    for key, row in rows.items():
        record = json.loads((run_dir / f"{key}.json").read_text())
        if INPUTS[key] is None:
            assert row["error"] == record["error"] == "not a decodable image"
            assert row["preds"] == [] and row["expl"] == [] and row["thumb"] is None
            continue
        assert row["error"] is None and row["warnings"] == []
        assert [(p["label"], p["index"]) for p in row["preds"]] == [
            (p["label"], p["index"]) for p in record["predictions"]
        ]
        assert len(row["preds"]) == 5 and row["score"] == pytest.approx(record["predictions"][0]["score"])
        assert [e["method"] for e in row["expl"]] == ["cam", "gradcam"]
        assert all(e["overlay"] and e["thumb"] for e in row["expl"])


def url_file(out: Path, url: str) -> Path:
    """The file a relative URL of the page points at, checking it is fully percent-encoded."""
    assert re.fullmatch(r"[A-Za-z0-9_.~/%-]+", url), url
    return Path(os.path.normpath(out / unquote(url)))


def test_links_are_relative_escaped_and_exist(run_dir: Path) -> None:
    rows = rows_by_key(run_dir)
    row = rows["sub dir/café #1 50%?.png"]
    assert row["expl"][0]["overlay"] == "sub%20dir/caf%C3%A9%20%231%2050%25%3F.png.cam.png"
    for key, row in rows.items():
        if INPUTS[key] is None:
            continue
        record = json.loads((run_dir / f"{key}.json").read_text())
        assert url_file(run_dir, row["src"]) == Path(record["image"])  # the original photo
        for e, written in zip(row["expl"], record["explanations"], strict=True):
            assert url_file(run_dir, e["overlay"]) == run_dir / Path(key).parent / written["overlay"]
        for thumb in [row["thumb"], *(e["thumb"] for e in row["expl"])]:
            image = cv2.imread(str(url_file(run_dir, thumb)))  # cv2 reads JPEGs by content
            assert image is not None and max(image.shape[:2]) == THUMB_SIDE
            assert (run_dir / unquote(thumb)).read_bytes()[:3] == b"\xff\xd8\xff"


def test_file_names_cannot_inject_markup(run_dir: Path) -> None:
    page = (run_dir / "index.html").read_text(encoding="utf-8")
    assert page.count("<script") == 2 and page.count("</script>") == 2
    assert "<img" not in page
    assert "\\u003c/script\\u003e\\u003cscript\\u003edocument.title" in page  # escaped, in the data blob
    assert set(rows_by_key(run_dir)) == set(INPUTS)  # and read back exactly


def test_thumbnails_are_made_once_and_remade_when_stale(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)  # copytree keeps mtimes: thumbnails stay newer than sources
    thumbs = sorted(p for p in (out / ".thumbs").rglob("*.jpg"))
    assert len(thumbs) == 4 * 3  # original + 2 overlays for the 4 decodable images
    before = {p: p.stat().st_mtime_ns for p in thumbs}
    summary = write_report(out)
    assert (summary.thumbnails_made, summary.thumbnails_cached) == (0, 12)
    assert {p: p.stat().st_mtime_ns for p in thumbs} == before
    overlay = out / "camera.png.gradcam.png"
    later = before[out / ".thumbs/overlays/camera.png.gradcam.png.jpg"] + 10**9
    os.utime(overlay, ns=(later, later))
    summary = write_report(out)
    assert (summary.thumbnails_made, summary.thumbnails_cached) == (1, 11)


def test_a_missing_overlay_is_a_warning_and_exit_1(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    (out / "camera.png.cam.png").unlink()
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 1
    assert "camera.png.cam.png: missing" in result.output
    row = rows_by_key(out)["camera.png"]
    assert row["warnings"] == ["cam: overlay missing"] and row["expl"][0]["overlay"] is None
    assert rows_by_key(out)["broken.png"]["error"]  # a failed image is data, not a report problem


def test_labels_expected_marks_images_whose_top1_differs(run_dir: Path, tmp_path: Path) -> None:
    rows = rows_by_key(run_dir)
    run_dir = shutil.copytree(run_dir, tmp_path / "out")
    camera, cafe = rows["camera.png"]["preds"][0], rows["sub dir/café #1 50%?.png"]["preds"][0]
    labels = tmp_path / "expected.json"
    labels.write_text(
        json.dumps(
            {
                "camera.png": camera["label"],  # by name: matches
                "café #1 50%?.png": (cafe["index"] + 1) % 1000,  # by index, by file name: differs
                "broken.png": 3,  # no prediction: neither
                "not-in-the-run.png": "tench",
            }
        )
    )
    result = runner.invoke(app, ["report", str(run_dir), "--labels-expected", str(labels)])
    assert result.exit_code == 0, result.output
    assert "1 not the expected class" in result.output and "1 expected labels named no image" in result.output
    data = page_data(run_dir)
    assert data["has_expected"] is True
    marks = {row["key"]: (row["expected"], row["mismatch"]) for row in data["rows"]}
    assert marks["camera.png"] == (camera["label"], False)
    assert marks["sub dir/café #1 50%?.png"] == (f"class {(cafe['index'] + 1) % 1000}", True)
    assert marks["broken.png"] == ("class 3", None)
    assert marks["\"><img src=x onerror=document.title='pwned'>.png"] == (None, None)

    # the list format of samples/labels.json: file + class_index and class_name
    listed = tmp_path / "labels.json"
    listed.write_text(
        json.dumps(
            [
                {"file": "camera.png", "class_index": camera["index"], "class_name": "anything"},
                {"file": "sub dir/café #1 50%?.png", "class_name": cafe["label"].upper()},
            ]
        )
    )
    summary = write_report(run_dir, listed)
    assert (summary.mismatched, summary.unmatched_labels) == (0, 0)
    marks = {row["key"]: (row["expected"], row["mismatch"]) for row in page_data(run_dir)["rows"]}
    assert marks["camera.png"] == (f"anything ({camera['index']})", False)  # the index decides
    assert marks["sub dir/café #1 50%?.png"] == (cafe["label"].upper(), False)  # names: any case


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"a.png": true}', "'a.png' needs a class name or index"),
        ('[{"class_index": 3}]', 'every list entry needs a "file"'),
        ("3", "must hold a JSON object or list"),
    ],
)
def test_bad_labels_expected_is_a_usage_error(run_dir: Path, tmp_path: Path, content: str, message: str) -> None:
    labels = tmp_path / "labels.json"
    labels.write_text(content)
    result = runner.invoke(app, ["report", str(run_dir), "--labels-expected", str(labels)])
    assert result.exit_code == 2 and message in result.output


def test_report_of_a_folder_without_results_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "labels.json").write_text("{}")  # a JSON that camcli did not write is skipped
    for folder in (tmp_path, tmp_path / "missing"):
        result = runner.invoke(app, ["report", str(folder)])
        assert result.exit_code == 2
        assert f"camcli: error: no {'such output folder' if folder.name == 'missing' else 'camcli results'}" in (
            result.output
        )
    assert not (tmp_path / "index.html").exists()


# -- in a real browser -------------------------------------------------------------------------

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


class _DomCount(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.classes: list[list[str]] = []
        self.tags: list[str] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.classes.append((dict(attrs).get("class") or "").split())
        self._in_title = tag == "title"

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False


def chromium(page: Path | str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
        "--virtual-time-budget=3000",  # lets the script run and the images load
        *args,
        page.as_uri() if isinstance(page, Path) else page,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium installed (Debian: apt-get install chromium)")
def test_report_renders_in_chromium(run_dir: Path, tmp_path: Path) -> None:
    page = run_dir / "index.html"
    shot = tmp_path / "report.png"
    chromium(page, tmp_path / "profile", f"--screenshot={shot}")
    image = cv2.imread(str(shot))
    assert image is not None and image.shape == (900, 1280, 3)
    assert float(image.std()) > 20.0, "the screenshot is blank"
    # the photos' thumbnails are there: some rows are far from the page's greys and whites
    saturation = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)[..., 1]
    assert np.mean(saturation > 80) > 0.02

    dom = _DomCount()
    dom.feed(chromium(page, tmp_path / "profile", "--dump-dom").stdout)
    rows = [c for c in dom.classes if "row" in c]
    assert len(rows) == len(INPUTS), "one rendered row per image"
    assert sum("failed" in c for c in rows) == 1
    assert dom.tags.count("script") == 2 and dom.title.startswith("camcli report")  # nothing injected
    assert not any("broken" in c for c in dom.classes), "every visible thumbnail loaded"
    assert sum("thumb" in c for c in dom.classes) >= 4 * 3


def rendered_keys(page: str, profile: Path) -> list[str]:
    """The data-key of each row the page shows, in order."""
    keys: list[str] = []

    class Rows(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            found = dict(attrs)
            if "row" in (found.get("class") or "").split():
                keys.append(found["data-key"] or "")

    Rows().feed(chromium(page, profile, "--dump-dom").stdout)
    return keys


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium installed (Debian: apt-get install chromium)")
def test_filters_and_sorting_in_chromium(run_dir: Path, tmp_path: Path) -> None:
    """The view in the URL fragment drives the same filters and sort as the controls."""
    out = shutil.copytree(run_dir, tmp_path / "out")
    rows = rows_by_key(out)
    camera = rows["camera.png"]["preds"][0]
    labels = tmp_path / "expected.json"
    labels.write_text(json.dumps({"camera.png": (camera["index"] + 1) % 1000, "café #1 50%?.png": 0}))
    write_report(out, labels)
    cafe_wrong = rows["sub dir/café #1 50%?.png"]["preds"][0]["index"] != 0
    page = (out / "index.html").as_uri()
    profile = tmp_path / "profile"

    mismatched = rendered_keys(page + "#expected=mismatch", profile)
    assert mismatched == ["camera.png", *(["sub dir/café #1 50%?.png"] if cafe_wrong else [])]
    assert rendered_keys(page + "#issues=error", profile) == ["broken.png"]

    by_score = sorted((k for k in rows if rows[k]["score"] is not None), key=lambda k: -rows[k]["score"])
    shown = rendered_keys(page + "#sort=score-desc&issues=none&query=.PNG", profile)
    assert [rows[k]["score"] for k in shown] == [rows[k]["score"] for k in by_score]
    assert set(shown) == set(by_score)
