"""Killed and interrupted folder runs, as real subprocesses: SIGKILL once the Nth JSON
exists, Ctrl-C (SIGINT) once the first does. Every file either run leaves is complete
and valid, and a re-run finishes the rest without redoing finished images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from typer.testing import CliRunner

from camcli.cli import app

ROOT = Path(__file__).resolve().parent.parent
IMAGES = 200  # enough that the run cannot end in the few ms between a JSON appearing and the signal
BATCH = 4
TINY = ["--model", "tiny_models:brightness", "--mean", "0,0,0", "--std", "1,1,1", "--input-size", "32"]
ARGS = [*TINY, "-b", str(BATCH), "--save-heatmap"]
SIZE = (24, 32)  # height, width


def make_folder(folder: Path, count: int = IMAGES) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        image = (rng.random((*SIZE, 3)) * 255).astype(np.uint8)
        assert cv2.imwrite(str(folder / f"img{i:03d}.png"), image)


def start(src: Path, out: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.Popen(
        [sys.executable, "-m", "camcli", "explain", str(src), "-o", str(out), *ARGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for_jsons(proc: subprocess.Popen[str], out: Path, count: int, timeout: float = 120.0) -> int:
    """Poll until `count` JSONs exist (a condition, not a sleep); return how many there are."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = len(list(out.glob("*.json"))) if out.is_dir() else 0
        if found >= count:
            return found
        assert proc.poll() is None, f"the run ended before {count} JSONs: {proc.communicate()}"
        time.sleep(0.002)
    proc.kill()
    raise AssertionError(f"no {count} JSONs after {timeout} s")


def check_outputs(out: Path, temporary_ok: bool = False) -> dict[str, int]:
    """Every output in `out` is complete and valid; returns each JSON's mtime (ns).

    Only a SIGKILL may leave temporary files (``.NAME.XXXXXXXX.tmp``, never an output
    name); the next run removes them."""
    stamps = {}
    for path in out.iterdir():
        if path.name.startswith("."):
            assert temporary_ok and path.suffix == ".tmp", f"temporary file left: {path.name}"
            continue
        if path.suffix == ".json":
            record = json.loads(path.read_text())
            assert record["error"] is None and len(record["explanations"]) == 1
            explanation = record["explanations"][0]
            assert (out / explanation["overlay"]).is_file() and (out / explanation["heatmap"]).is_file()
            stamps[path.name] = path.stat().st_mtime_ns
        elif path.suffix == ".png":
            image = cv2.imread(str(path))
            assert image is not None and image.shape == (*SIZE, 3), path.name
        elif path.suffix == ".npy":
            heat = np.load(path)
            assert heat.shape == SIZE and np.isfinite(heat).all(), path.name
        else:
            raise AssertionError(f"unexpected file {path.name}")
    return stamps


def resume(src: Path, out: Path):
    result = CliRunner().invoke(app, ["explain", str(src), "-o", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    return result


def test_sigkill_leaves_only_complete_files_and_a_rerun_finishes_the_rest(tmp_path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    make_folder(src)
    proc = start(src, out)
    wait_for_jsons(proc, out, 6)
    proc.kill()
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    done = check_outputs(out, temporary_ok=True)  # complete, or not there at all
    assert 6 <= len(done) < IMAGES
    overlays = {name: (out / name.replace(".json", ".gradcam.png")).stat().st_mtime_ns for name in done}

    result = resume(src, out)
    assert f"{IMAGES - len(done)} explained, {len(done)} already done, 0 failed" in result.stderr
    stamps = check_outputs(out)  # and the killed run's temporary files are gone
    assert len(stamps) == IMAGES
    assert {name: stamps[name] for name in done} == done, "finished images are not recomputed"
    assert {name: (out / name.replace(".json", ".gradcam.png")).stat().st_mtime_ns for name in done} == overlays


def test_sigint_stops_within_a_batch_prints_a_summary_and_exits_130(tmp_path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    make_folder(src)
    proc = start(src, out)
    seen = wait_for_jsons(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr

    done = check_outputs(out)  # in-flight writes finished, nothing half-written
    # stops after the batch on the model; up to 4 batches of writes were queued
    assert seen <= len(done) <= seen + 5 * BATCH
    assert stderr.splitlines()[-1] == (
        f"camcli: interrupted, {IMAGES - len(done)} not started; {len(done)} explained, 0 already done, "
        f"0 failed -> {out}"
    )

    result = resume(src, out)
    assert f"{IMAGES - len(done)} explained, {len(done)} already done, 0 failed" in result.stderr
    assert len(check_outputs(out)) == IMAGES


def test_a_rerun_removes_only_its_own_stale_temporary_files(tmp_path) -> None:
    """What a SIGKILL mid-write leaves (mkstemp names beside the outputs) goes; nothing else."""
    src, out = tmp_path / "in", tmp_path / "out"
    make_folder(src, 2)
    out.mkdir()
    stale = [out / ".img000.png.json.k2j4_x9a.tmp", out / ".img001.png.gradcam.png.0abcdefg.tmp"]
    kept = [out / ".other.png.json.k2j4_x9a.tmp", out / ".img000.png.notes", out / "img000.png.json.tmp"]
    for path in stale + kept:
        path.write_bytes(b"partial")
    resume(src, out)
    assert not any(path.exists() for path in stale)
    assert all(path.read_bytes() == b"partial" for path in kept)
