"""Two camcli processes on the same folder and --out at once (two shells, `xargs -P`):
every image's JSON ends up whole, names only files that are there, and no file is left
that no JSON names."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny_models:brightness", "--mean", "0,0,0", "--std", "1,1,1", "--input-size", "32"]


def test_two_processes_on_one_out_leave_every_json_whole(tmp_path: Path, samples_dir: Path) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for n in range(12):  # enough images that the two runs' writes overlap
        name = ("skimage_chelsea.png", "skimage_coffee.png", "skimage_camera.png")[n % 3]
        shutil.copy(samples_dir / name, folder / f"{n:02d}.png")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    # one run adds a method to what the other writes (merged, never lost); they go through
    # the images in opposite orders, so each writes some images first and some second
    paths = sorted(str(p) for p in folder.iterdir())
    runs = [
        ["-", "-o", str(out), "-m", "gradcam", "--save-heatmap", "-b", "2", *TINY],
        ["-", "-o", str(out), "-m", "gradcam,saliency", "--save-heatmap", "-b", "2", *TINY],
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "camcli", "explain", *args],
            env=env,
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in runs
    ]
    for proc, order in zip(procs, (paths, paths[::-1]), strict=True):
        assert proc.stdin is not None
        proc.stdin.write("\n".join(order) + "\n")
        proc.stdin.close()
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""

    named = set()
    for path in sorted(out.rglob("*.json")):
        record = json.loads(path.read_text())  # whole: it parses
        methods = [e["method"] for e in record["explanations"]]
        assert record["error"] is None
        assert "gradcam" in methods and len(methods) == len(set(methods)), methods
        assert methods == record["request"]["methods"]
        for e in record["explanations"]:
            for name in (e["overlay"], e["heatmap"]):
                assert (path.parent / name).is_file(), name
                named.add(path.parent / name)
        named.add(path)
    assert len(list(out.rglob("*.json"))) == 12
    assert {p for p in out.rglob("*") if p.is_file()} == named  # no orphan, no temporary file left

    again = subprocess.run(
        [sys.executable, "-m", "camcli", "explain", str(folder), *runs[1][1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    # a run that raced the first one may have finished before saliency was asked: only those are redone
    assert "0 failed" in again.stderr
