"""README's Python example runs as written (from the repository root)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_python_api_block_runs_as_written(monkeypatch) -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API") :]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. torch's "not writable" for the read-only array
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["best"].label == "Egyptian cat"
    assert namespace["heat"].shape == (300, 451)
