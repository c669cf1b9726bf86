"""Shared fixtures: the sample photos shipped in samples/ with their labels and boxes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def sample_labels() -> dict[str, dict[str, Any]]:
    return {entry["file"]: entry for entry in json.loads((SAMPLES / "labels.json").read_text())}
