"""The shipped JSON Schema: `camcli schema` prints it, it accepts what camcli writes,
and it refuses renamed or retyped core fields."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
from typer.testing import CliRunner

from camcli.cli import app
from camcli.schema import image_record_schema

runner = CliRunner()

RECORD = {
    "schema_version": 1,
    "image": "a.png",
    "width": 4,
    "height": 3,
    "model": "efficientnet_lite0",
    "weights": "none",
    "input": {"size": [224, 224], "mean": [0.5] * 3, "std": [0.5] * 3},
    "device": "cpu",
    "versions": {"camcli": "0.1.0", "torch": "2", "torchvision": "0"},
    "predictions": [{"index": 1, "label": "x", "score": 0.5}],
    "explanations": [
        {
            "method": "gradcam",
            "layer": "f",
            "target": {"index": 1, "label": "x", "score": 0.5},
            "overlay": "a.png.gradcam.png",
            "heatmap": None,
            "warning": None,
            "metrics": {"later": "keys are allowed"},
        }
    ],
    "error": None,
    "request": {
        "model": "m",
        "weights": "none",
        "layer": "f",
        "methods": ["gradcam"],
        "target": "top1",
        "topk": 1,
        "input": {"size": [224, 224], "mean": [0.5] * 3, "std": [0.5] * 3},
        "heatmap": False,
    },
}


def test_schema_command_prints_the_shipped_schema() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema == image_record_schema()
    jsonschema.Draft202012Validator.check_schema(schema)


def test_a_valid_record_and_a_failed_image_pass(validate_record) -> None:
    validate_record(RECORD)
    failed = {**RECORD, "width": None, "height": None, "predictions": [], "explanations": [], "error": "empty file"}
    validate_record(failed)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda r: r.pop("predictions"),
        lambda r: r.update(schema_version=2),
        lambda r: r["explanations"][0].pop("overlay"),
        lambda r: r["explanations"][0]["target"].update(score="high"),
        lambda r: r["predictions"][0].update(class_name="renamed"),
        lambda r: r.update(explanations=[]),  # no error, yet nothing explained
        lambda r: r["request"].pop("methods"),
    ],
)
def test_renamed_missing_or_retyped_core_fields_are_refused(validate_record, breakage) -> None:
    record = copy.deepcopy(RECORD)
    breakage(record)
    with pytest.raises(jsonschema.ValidationError):
        validate_record(record)
