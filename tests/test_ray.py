"""`--engine ray` writes what `--engine local` writes, on a local Ray instance (no network).

Marked `ray`: the default run leaves it out (it starts Ray: ~20 s); `.ci/run` installs
the extra and runs `pytest -m ray`. Skipped where Ray Data is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.data")
pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny_models:brightness", "--mean", "0,0,0", "--std", "1,1,1", "--input-size", "32"]
# fields that say when and where, not what
VOLATILE = {"device", "versions"}


def camcli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    return subprocess.run(
        [sys.executable, "-m", "camcli", "explain", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def records(out: Path) -> dict[str, dict]:
    found = {}
    for path in sorted(out.rglob("*.json")):
        record = json.loads(path.read_text())
        found[str(path.relative_to(out))] = {k: v for k, v in record.items() if k not in VOLATILE}
    return found


def test_ray_engine_writes_what_the_local_engine_writes(tmp_path: Path, samples_dir: Path) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for name in ("skimage_chelsea.png", "skimage_coffee.png"):
        shutil.copy(samples_dir / name, folder / name)
    shutil.copy(samples_dir / "skimage_camera.png", folder / "sub" / "camera.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    common = [str(folder), "-m", "gradcam,saliency", "--save-heatmap", "-b", "2", *TINY]

    local = camcli(*common, "-o", str(tmp_path / "local"), cwd=tmp_path)
    assert local.returncode == 1, local.stderr  # the broken file
    ray = camcli(*common, "-o", str(tmp_path / "ray"), "--engine", "ray", "--workers", "1", "--jsonl", cwd=tmp_path)
    assert ray.returncode == 1, ray.stderr
    assert "broken.jpg" in ray.stderr
    streamed = [json.loads(line) for line in ray.stdout.splitlines()]
    assert sorted(r["image"] for r in streamed) == sorted(str(p) for p in folder.rglob("*.*"))

    local_records, ray_records = records(tmp_path / "local"), records(tmp_path / "ray")
    for r in (*local_records.values(), *ray_records.values()):
        r["image"] = Path(r["image"]).name
    assert ray_records == local_records
    local_files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*") if p.is_file())
    ray_files = sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*") if p.is_file())
    assert ray_files == local_files
    for name in (p for p in local_files if p.suffix == ".npy"):
        np.testing.assert_allclose(np.load(tmp_path / "ray" / name), np.load(tmp_path / "local" / name), atol=1e-5)

    # a re-run adds a method on ray to the ray run's own results, redoing nothing else
    again = camcli(*common[:2], "gradcam,saliency,cam", *common[3:], "-o", str(tmp_path / "ray"), "--engine", "ray",
                   "--workers", "1", cwd=tmp_path)  # fmt: skip
    assert again.returncode == 1, again.stderr
    assert "3 explained" in again.stderr and "1 failed" in again.stderr
    chelsea = json.loads((tmp_path / "ray" / "skimage_chelsea.png.json").read_text())
    assert [e["method"] for e in chelsea["explanations"]] == ["gradcam", "saliency", "cam"]


def test_engine_ray_option_errors_are_one_line(tmp_path: Path, samples_dir: Path) -> None:
    image = str(samples_dir / "skimage_chelsea.png")
    result = camcli(image, "--engine", "spark", "-o", str(tmp_path / "o"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["camcli: error: unknown --engine 'spark'; use local or ray"]
    assert not (tmp_path / "o").exists()
