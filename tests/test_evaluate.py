"""`explain --metrics` fields and `camcli evaluate` files, end to end; the quality bar
on the sample photos."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from camcli.cli import app
from camcli.metrics import METRIC_NAMES

runner = CliRunner()
FAST = ["--model", "resnet18", "--weights", "none", "--input-size", "32", "--device", "cpu"]


@pytest.fixture()
def folder(tmp_path: Path) -> tuple[Path, Path]:
    """Two small photos-to-be (one in a subfolder) and a boxes file that lists one of them."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(images / "a.png"), rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    cv2.imwrite(str(images / "sub" / "b.png"), rng.integers(0, 255, (50, 30, 3), dtype=np.uint8))
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"sub/b.png": [[5, 10, 20, 40, 7]]}))
    return images, boxes


def test_explain_metrics_writes_every_metric_per_map(tmp_path, folder) -> None:
    images, boxes = folder
    out = tmp_path / "out"
    args = ["explain", str(images), "-o", str(out), "-m", "gradcam,center", "--boxes", str(boxes), "--jsonl"]
    result = runner.invoke(app, [*args, *FAST, "--steps", "5", "--substrate", "blur"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [Path(r["image"]).name for r in lines] == ["a.png", "b.png"]
    for line in lines:
        record = json.loads((out / f"{Path(line['image']).relative_to(images).as_posix()}.json").read_text())
        assert record == line
        assert record["request"]["metrics"] == {"steps": 5, "substrate": "blur", "boxes": str(boxes)}
        for entry in record["explanations"]:
            metrics = entry["metrics"]
            assert set(metrics) == {n for n in METRIC_NAMES if not n.startswith("road_")}  # ROAD: only with --road
            for name in ("deletion_auc", "insertion_auc", "average_drop"):
                assert 0.0 <= metrics[name] <= 1.0
            assert isinstance(metrics["increase_in_confidence"], bool)
            boxed = record["image"].endswith("b.png")
            assert (metrics["pointing_game"] is not None) == boxed
            assert (metrics["energy_in_box"] is not None) == boxed
            # the box's class is the target; the unlisted image keeps its top-1
            expected = 7 if boxed else record["predictions"][0]["index"]
            assert entry["target"]["index"] == expected
    # without --metrics nothing changes in the records
    plain = runner.invoke(app, ["explain", str(images), "-o", str(tmp_path / "plain"), "--jsonl", *FAST])
    assert all("metrics" not in e for line in plain.stdout.splitlines() for e in json.loads(line)["explanations"])


def test_evaluate_prints_and_writes_the_table(tmp_path, folder) -> None:
    images, boxes = folder
    out = tmp_path / "eval"
    args = ["evaluate", str(images), "--boxes", str(boxes), "-m", "gradcam,center", "-o", str(out), "--steps", "4"]
    result = runner.invoke(app, [*args, *FAST])
    assert result.exit_code == 0, result.output
    assert "gradcam" in result.stdout and "center" in result.stdout and "deletion" in result.stdout
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["method"] for r in rows] == ["gradcam", "center"]
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(p.read_text()) for p in sorted(out.rglob("*.png.json"))]
    assert len(records) == 2
    for row, method in zip(rows, summary["methods"], strict=True):
        assert row["images"] == "2" and method["images"] == 2
        entries = [e for r in records for e in r["explanations"] if e["method"] == row["method"]]
        for name in ("deletion_auc", "insertion_auc", "average_drop"):
            mean = np.mean([e["metrics"][name] for e in entries])
            assert float(row[name]) == pytest.approx(mean, rel=1e-5)
            assert method[name] == pytest.approx(mean, rel=1e-9)
        assert method["counts"]["pointing_game"] == 1  # only b.png has a box
        assert int(row["pointing_game_hits"]) == method["pointing_game_hits"] <= 1


def test_bad_boxes_file_is_a_usage_error(tmp_path, folder) -> None:
    images, _ = folder
    bad = tmp_path / "bad.json"
    bad.write_text('{"a.png": [[1, 2]]}')
    result = runner.invoke(app, ["evaluate", str(images), "--boxes", str(bad), "-o", str(tmp_path / "o"), *FAST])
    assert result.exit_code == 2
    assert "bad.json: bad boxes file" in result.output
    result = runner.invoke(app, ["explain", str(images), "--metrics", "--substrate", "noise", *FAST])
    assert result.exit_code == 2 and "substrate" in result.output
    unrelated = tmp_path / "unrelated.json"
    unrelated.write_text('{"elsewhere.png": [[1, 2, 3, 4]]}')
    args = ["explain", str(images), "--boxes", str(unrelated), "-m", "center", "-o", str(tmp_path / "u"), *FAST]
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "unrelated.json has boxes for none of the 2 images" in result.output


@pytest.mark.slow
def test_quality_bar_on_the_sample_photos(tmp_path, samples_dir) -> None:
    """Issue 7: with the default model, Grad-CAM, Grad-CAM++ and Score-CAM each point into
    the box on all 3 photos and delete more faithfully (zero substrate) than the centre."""
    out = tmp_path / "eval"
    methods = "gradcam,gradcam++,scorecam,center"
    args = ["evaluate", str(samples_dir), "--boxes", str(samples_dir / "labels.json"), "-m", methods, "-o", str(out)]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = {m["method"]: m for m in json.loads((out / "summary.json").read_text())["methods"]}
    for method in ("gradcam", "gradcam++", "scorecam"):
        assert summary[method]["pointing_game_hits"] == 3 and summary[method]["counts"]["pointing_game"] == 3
        assert summary[method]["deletion_auc"] < summary["center"]["deletion_auc"], (method, summary)
