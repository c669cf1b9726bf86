"""Pipeline options on a tiny user model: --labels, --include/--exclude, --dry-run, --summary."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import pytest
from typer.testing import CliRunner

from camcli.cli import app
from camcli.errors import UsageError
from camcli.io import collect_inputs
from camcli.models import read_labels

runner = CliRunner()

TINY = """
import torch
from torch import nn


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )
"""
CLASSES = ["apple", "banana split", "cherry"]


@pytest.fixture
def tiny_model(tmp_path, monkeypatch) -> list[str]:
    """`--model camcli_tiny_user:tiny`: a 3-class CNN the user wrote, 32 px input."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "camcli_tiny_user.py").write_text(TINY)
    monkeypatch.syspath_prepend(str(folder))
    return ["--model", "camcli_tiny_user:tiny", "--input-size", "32"]


@pytest.fixture
def photos(tmp_path, samples_dir) -> Path:
    """photos/{a.png, b.jpg, sub/c.png, sub/skip_d.png}, small."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    image = cv2.resize(cv2.imread(str(samples_dir / "skimage_coffee.png")), (48, 32))
    for name in ["a.png", "b.jpg", "sub/c.png", "sub/skip_d.png"]:
        cv2.imwrite(str(root / name), image)
    return root


def run(*args: str):
    return runner.invoke(app, ["explain", *args])


@pytest.mark.parametrize("kind", ["txt", "json"])
def test_labels_name_the_classes_in_json_and_target(tmp_path, tiny_model, photos, kind: str) -> None:
    labels = tmp_path / f"labels.{kind}"
    labels.write_text(json.dumps(CLASSES) if kind == "json" else "\n".join(CLASSES) + "\n")
    out = tmp_path / "out"
    result = run(str(photos / "a.png"), *tiny_model, "--labels", str(labels), "-t", "banana split", "-o", str(out))
    assert result.exit_code == 0, result.output
    record = json.loads((out / "a.png.json").read_text())
    assert {p["label"] for p in record["predictions"]} == set(CLASSES)
    assert record["explanations"][0]["target"] == {
        "index": 1,
        "label": "banana split",
        "score": pytest.approx(next(p["score"] for p in record["predictions"] if p["index"] == 1)),
    }


def test_without_labels_a_user_model_has_numbered_classes(tmp_path, tiny_model, photos) -> None:
    out = tmp_path / "out"
    assert run(str(photos / "a.png"), *tiny_model, "-o", str(out), "-t", "2").exit_code == 0
    record = json.loads((out / "a.png.json").read_text())
    assert record["explanations"][0]["target"]["label"] == "class 2"


def test_labels_count_must_match_the_model(tmp_path, tiny_model, photos) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("apple\nbanana\n")
    result = run(str(photos / "a.png"), *tiny_model, "--labels", str(labels), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2 and "2 class names for a model with 3 outputs" in result.stderr


def test_read_labels_refuses_gaps_and_bad_json(tmp_path) -> None:
    gap = tmp_path / "gap.txt"
    gap.write_text("a\n\nc\n")
    with pytest.raises(UsageError, match="line 2 is empty"):
        read_labels(gap)
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1}')
    with pytest.raises(UsageError, match="JSON list"):
        read_labels(bad)


def test_include_and_exclude_globs(photos) -> None:
    def names(include=(), exclude=()):
        return [item.key for item in collect_inputs([str(photos)], include=include, exclude=exclude)]

    assert names() == ["a.png", "b.jpg", "sub/c.png", "sub/skip_d.png"]
    assert names(include=["*.png"]) == ["a.png", "sub/c.png", "sub/skip_d.png"]
    assert names(exclude=["skip_*"]) == ["a.png", "b.jpg", "sub/c.png"]
    assert names(include=["sub/*"], exclude=["*_d.png"]) == ["sub/c.png"]  # a '/' matches the path below the folder
    assert names(include=["*.PNG"]) == []  # case-sensitive, like the shell


def test_dry_run_lists_work_and_skips_and_writes_nothing(tmp_path, tiny_model, photos) -> None:
    out = tmp_path / "out"
    first = run(str(photos), *tiny_model, "-o", str(out), "--include", "a.png")
    assert first.exit_code == 0, first.output
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    dry = run(str(photos), *tiny_model, "-o", str(out), "--exclude", "*.jpg", "--dry-run")
    assert dry.exit_code == 0, dry.output
    lines = [line.split("\t") for line in dry.stdout.splitlines()]
    assert [(action, Path(path).name) for action, path, _ in lines] == [
        ("skip", "a.png"),
        ("explain", "c.png"),
        ("explain", "skip_d.png"),
    ]
    assert lines[1][2] == str(out / "sub" / "c.png.json")
    assert "2 to explain, 1 already done; nothing written" in dry.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    fresh = tmp_path / "never"
    assert run(str(photos), *tiny_model, "-o", str(fresh), "--dry-run").exit_code == 0
    assert not fresh.exists()


def test_summary_csv_has_one_row_per_image_and_method(tmp_path, tiny_model, photos) -> None:
    out = tmp_path / "out"
    broken = photos / "broken.png"
    broken.write_bytes(b"not a png")
    summary = tmp_path / "summary.csv"
    result = run(str(photos), *tiny_model, "-o", str(out), "-m", "cam,gradcam", "--summary", str(summary), "--jsonl")
    assert result.exit_code == 1  # the broken file
    rows = list(csv.DictReader(summary.open()))
    assert list(rows[0]) == ["image", "model", "method", "layer", "target", "label", "score", "overlay", "error"]
    good = [r for r in rows if not r["error"]]
    assert len(good) == 4 * 2 and {r["method"] for r in good} == {"cam", "gradcam"}
    records = {r["image"]: r for r in map(json.loads, result.stdout.splitlines())}
    for row in good:
        explanation = next(e for e in records[row["image"]]["explanations"] if e["method"] == row["method"])
        assert int(row["target"]) == explanation["target"]["index"] and row["label"] == explanation["target"]["label"]
        assert float(row["score"]) == pytest.approx(explanation["target"]["score"], rel=1e-5)
        assert row["layer"] == "3" and row["model"] == "camcli_tiny_user:tiny"
        assert Path(row["overlay"]).is_file() and Path(row["overlay"]).parent == out / Path(
            row["image"]
        ).parent.relative_to(photos)
    failed = [r for r in rows if r["error"]]
    assert [(Path(r["image"]).name, r["error"]) for r in failed] == [("broken.png", "not a decodable image")]
