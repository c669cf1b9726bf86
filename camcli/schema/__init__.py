"""The JSON Schema of the per-image JSON files, shipped with the package.

Pipelines can validate against it; the test suite validates every JSON camcli writes.
Core fields are strict (names, types, required); objects that later versions may
extend (an explanation, the request, the record itself) accept extra keys, so adding
a field is not a breaking change, while renaming or retyping one is (and bumps
``schema_version``).
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

SCHEMA_FILE = "image-record.v1.json"


def schema_text() -> str:
    """The schema file's text, as shipped."""
    return files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8")


@cache
def image_record_schema() -> dict[str, Any]:
    """The schema as a dict (for `jsonschema.validate`)."""
    return json.loads(schema_text())
