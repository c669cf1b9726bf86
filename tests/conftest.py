"""Shared fixtures: the sample photos shipped in samples/ with their labels and boxes."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture(scope="session", autouse=True)
def deliverable_ctrl_c() -> Iterator[None]:
    """The Ctrl-C tests need SIGINT delivered. A shell starts a background job (`cmd &`, CI
    runners, nohup) with SIGINT ignored, and camcli, like Python, keeps an ignored SIGINT
    ignored, in its own process and in the children that inherit it: there those tests
    would see their signal dropped. The session takes Python's default handler instead."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def sample_labels() -> dict[str, dict[str, Any]]:
    return {entry["file"]: entry for entry in json.loads((SAMPLES / "labels.json").read_text())}


# --- every JSON camcli writes follows the shipped schema ----------------------------------------


@pytest.fixture(scope="session")
def validate_record():
    """Call with a per-image record (dict): raises jsonschema.ValidationError if it breaks the schema."""
    import jsonschema

    from camcli.schema import image_record_schema

    validator = jsonschema.Draft202012Validator(image_record_schema())

    def validate(record: dict[str, Any]) -> None:
        validator.validate(record)

    return validate


def _written_records(base: Path, since_ns: int) -> list[tuple[Path, dict[str, Any]]]:
    records = []
    for path in base.rglob("*.json"):
        if path.stat().st_mtime_ns < since_ns:
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a test's own broken file, not camcli's
        if isinstance(record, dict) and "schema_version" in record:
            records.append((path, record))
    return records


@pytest.fixture(autouse=True)
def _written_json_follows_schema(request, tmp_path_factory, validate_record):
    """After each test, validate every per-image JSON written under pytest's temp folders
    during it, whatever command or API wrote it."""
    import time

    start = time.time_ns() - 1_000_000  # file systems round mtimes
    yield
    for path, record in _written_records(tmp_path_factory.getbasetemp(), start):
        try:
            validate_record(record)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file's name
            pytest.fail(f"{path} does not follow camcli's JSON schema: {exc}")
