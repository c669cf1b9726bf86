"""Re-runs keep finished work; stdin is streamed; a full disk stops cleanly and resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from camcli.cli import app

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny_models:brightness", "--mean", "0,0,0", "--std", "1,1,1", "--input-size", "32"]
runner = CliRunner()


def invoke(*args: str, stdin: str | None = None):
    return runner.invoke(app, ["explain", *args], input=stdin)


def files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def named(out: Path) -> set[str]:
    """Every file the JSONs in `out` name, and the JSONs."""
    names = set()
    for path in out.rglob("*.json"):
        record = json.loads(path.read_text())
        names.add(str(path.relative_to(out)))
        folder = path.parent.relative_to(out)
        for e in record["explanations"]:
            names |= {str(folder / n) for n in (e["overlay"], e["heatmap"]) if n}
    return names


@pytest.fixture
def images(tmp_path: Path, samples_dir: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("skimage_chelsea.png", "skimage_coffee.png"):
        shutil.copy(samples_dir / name, folder / name)
    return folder


def test_a_rerun_with_another_method_adds_it_and_keeps_the_first(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke(str(images), "-o", str(out), "-m", "gradcam", *TINY).exit_code == 0
    first = (out / "skimage_chelsea.png.gradcam.png").stat().st_mtime_ns
    result = invoke(str(images), "-o", str(out), "-m", "gradcam,saliency", *TINY)
    assert result.exit_code == 0, result.output
    assert "2 explained" in result.stderr
    record = json.loads((out / "skimage_chelsea.png.json").read_text())
    assert [e["method"] for e in record["explanations"]] == ["gradcam", "saliency"]
    assert record["request"]["methods"] == ["gradcam", "saliency"]
    assert (out / "skimage_chelsea.png.gradcam.png").stat().st_mtime_ns == first  # not redone
    assert files(out) == named(out)
    # a third run asking a subset: nothing left to do
    result = invoke(str(images), "-o", str(out), "-m", "saliency", *TINY)
    assert result.exit_code == 0 and "0 explained, 2 already done" in result.stderr


def test_a_replaced_result_leaves_no_orphan_file(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke(str(images), "-o", str(out), "-m", "gradcam,saliency", "--save-heatmap", *TINY).exit_code == 0
    result = invoke(str(images), "-o", str(out), "-m", "cam", "--overwrite", *TINY)
    assert result.exit_code == 0, result.output
    assert files(out) == named(out)
    assert not list(out.glob("*.gradcam.*")) and not list(out.glob("*.npy"))
    # another target is added; a changed request (--save-heatmap) redoes the image, its old files dropped
    assert invoke(str(images), "-o", str(out), "-m", "cam", "-k", "2", *TINY).exit_code == 0
    assert files(out) == named(out)
    assert invoke(str(images), "-o", str(out), "-m", "cam", "--save-heatmap", *TINY).exit_code == 0
    assert files(out) == named(out) and len(list(out.glob("*.npy"))) == 2


def explain_in_a_process(*args: str) -> tuple[list[str], str]:
    """`camcli explain ARGS` in a fresh process: (its exit code and whether torch was
    imported, as printed), its stderr."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    code = (
        "import sys; sys.argv=['camcli', *sys.argv[1:]]\n"
        "from camcli.entry import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print(code, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "explain", *args], env=env, capture_output=True, text=True, timeout=120
    )
    return proc.stdout.split(), proc.stderr


def test_nothing_to_do_skips_loading_the_model(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke(str(images), "-o", str(out), *TINY).exit_code == 0
    printed, stderr = explain_in_a_process(str(images), "-o", str(out), *TINY)
    assert printed == ["0", "False"], stderr
    assert "0 explained, 2 already done" in stderr


def test_all_rerun_counts_its_skips_as_done_but_a_named_method_still_refuses(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    every = ("-m", "all")
    first = invoke(str(images), "-o", str(out), *every, *TINY)
    assert first.exit_code == 0, first.output
    record = json.loads((out / "skimage_chelsea.png.json").read_text())
    skipped = {s["method"] for s in record["request"]["skipped_methods"]}
    assert {"legrad", "rollout", "grad-rollout"} <= skipped  # a CNN: the attention methods do not apply
    assert not skipped & set(record["request"]["methods"])
    again = invoke(str(images), "-o", str(out), *every, *TINY)
    assert again.exit_code == 0 and "0 explained, 2 already done" in again.stderr
    assert "skipped" not in again.stderr  # decided before the model was loaded
    named_one = invoke(str(images), "-o", str(out), "-m", "rollout", *TINY)
    assert named_one.exit_code == 2 and "rollout reads the attention" in named_one.output


def test_a_missing_path_on_stdin_is_an_error_record_and_the_rest_is_explained(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    good = images / "skimage_chelsea.png"
    result = invoke("-", "-o", str(out), "--jsonl", *TINY, stdin=f"{good}\n{tmp_path / 'missing.jpg'}\n")
    assert result.exit_code == 1, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["error"] is None for r in records] == [True, False]
    assert "missing.jpg" in records[1]["image"] and "No such file" in records[1]["error"]


def test_paths_on_stdin_are_explained_as_they_come(images: Path, tmp_path: Path) -> None:
    """The first image's line comes out while the producer still holds the second path."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "camcli", "explain", "-", "-o", str(out), "--jsonl", "-b", "4", *TINY],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"{images / 'skimage_chelsea.png'}\n")
    proc.stdin.flush()
    start = time.monotonic()
    first = json.loads(proc.stdout.readline())  # before stdin is closed
    assert first["error"] is None and time.monotonic() - start < 60
    proc.stdin.write(f"{images / 'skimage_coffee.png'}\n")
    proc.stdin.close()
    second = json.loads(proc.stdout.readline())
    assert second["image"].endswith("skimage_coffee.png")
    assert proc.wait(timeout=60) == 0, proc.stderr.read()


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_with_one_line_and_resumes(images: Path, small_disk: Path, tmp_path: Path) -> None:
    method = ["-m", "gradcam,saliency", "-b", "1", *TINY]
    reference = tmp_path / "reference"
    assert invoke(str(images), "-o", str(reference), *method).exit_code == 0
    first = sum(p.stat().st_size for p in reference.glob("skimage_chelsea.png*"))
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free - first - 64 * 1024))  # room for the first image's outputs only
    out = small_disk / "out"
    args = [str(images), "-o", str(out), *method]
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if "No space left" in line]
    assert len(lines) == 1 and str(out) in lines[0], result.stderr
    assert "disk is full" in result.stderr
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # nothing half-written
    assert (out / "skimage_chelsea.png.json").is_file() and not (out / "skimage_coffee.png.json").exists()
    assert files(out) == named(out)  # the image that failed left none of its files
    filler.unlink()
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "1 explained, 1 already done" in result.stderr
    assert files(out) == named(out)


# -- re-runs with other targets: the real default model (efficientnet_lite0), a small input --

LITE = ["--input-size", "96", "-m", "gradcam"]


def record_of(out: Path, name: str = "skimage_chelsea.png") -> dict:
    return json.loads((out / f"{name}.json").read_text())


def stamps(out: Path) -> dict[str, tuple[int, bytes]]:
    """Every map file's (mtime_ns, bytes), the JSONs aside (rewritten when added to): a file redone changes."""
    maps = [name for name in files(out) if not name.endswith(".json")]
    return {name: ((out / name).stat().st_mtime_ns, (out / name).read_bytes()) for name in maps}


def pairs(record: dict) -> list[tuple[str, int]]:
    return [(e["method"], e["target"]["index"]) for e in record["explanations"]]


def test_a_rerun_with_another_target_adds_it_and_keeps_the_first(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke(str(images), "-o", str(out), *LITE).exit_code == 0
    before = stamps(out)
    top1 = {
        name: record_of(out, name)["predictions"][0]["index"] for name in ("skimage_chelsea.png", "skimage_coffee.png")
    }
    assert 5 not in top1.values()  # class 5 (electric ray) is neither image's top-1
    result = invoke(str(images), "-o", str(out), "-t", "electric ray", "--jsonl", *LITE)
    assert result.exit_code == 0, result.output
    assert "2 explained" in result.stderr
    assert {name: stamps(out)[name] for name in before} == before  # the first run's files untouched
    assert set(stamps(out)) == set(before) | {f"{n}.gradcam.c5.png" for n in top1} and files(out) == named(out)
    lines = {Path(r["image"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    for name, top in top1.items():
        record = record_of(out, name)
        assert pairs(record) == [("gradcam", top), ("gradcam", 5)]
        assert [e["overlay"] for e in record["explanations"]] == [f"{name}.gradcam.png", f"{name}.gradcam.c5.png"]
        assert record["request"]["target"] == "electric ray" and record["request"]["methods"] == ["gradcam"]
        assert lines[name] == record  # the --jsonl line is the record as written, both targets in it
    after = stamps(out)
    # the same request again, or the class by its index: nothing to do, the model is not loaded
    for target in ("electric ray", "5"):
        printed, stderr = explain_in_a_process(str(images), "-o", str(out), "-t", target, *LITE)
        assert printed == ["0", "False"], stderr
        assert "0 explained, 2 already done" in stderr
    # a target that is an image's top-1 is its first explanation: nothing recomputed
    chelsea = str(images / "skimage_chelsea.png")
    again = invoke(chelsea, "-o", str(out), "-t", str(top1["skimage_chelsea.png"]), *LITE)
    assert again.exit_code == 0 and "0 explained, 1 already done" in again.stderr
    assert stamps(out) == after
    # --overwrite redoes all, as asked now: no file left that no JSON names
    redo = invoke(str(images), "-o", str(out), "--overwrite", *LITE)
    assert redo.exit_code == 0 and "2 explained" in redo.stderr
    assert set(stamps(out)) == set(before) and files(out) == named(out)
    assert all(stamps(out)[name][0] != before[name][0] for name in before)
    assert pairs(record_of(out)) == [("gradcam", top1["skimage_chelsea.png"])]


def test_topk_after_top1_computes_only_the_new_ranks(images: Path, tmp_path: Path) -> None:
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    heat = ["--save-heatmap", *LITE]
    assert invoke(str(images), "-o", str(out), *heat).exit_code == 0
    before = stamps(out)
    result = invoke(str(images), "-o", str(out), "-k", "3", *heat)
    assert result.exit_code == 0, result.output
    assert {name: stamps(out)[name] for name in before} == before  # rank 1 kept: its files untouched
    assert invoke(str(images), "-o", str(fresh), "-k", "3", *heat).exit_code == 0
    assert files(out) == named(out) == files(fresh)  # the same names as a fresh --topk 3
    for name in ("skimage_chelsea.png", "skimage_coffee.png"):
        merged, anew = record_of(out, name), record_of(fresh, name)
        assert pairs(merged) == pairs(anew) == [("gradcam", p["index"]) for p in anew["predictions"][:3]]
        assert merged["request"]["topk"] == 3
        for kept, made in zip(merged["explanations"], anew["explanations"], strict=True):
            assert kept["overlay"] == made["overlay"] and kept["target"]["index"] == made["target"]["index"]
            np.testing.assert_allclose(np.load(out / kept["heatmap"]), np.load(fresh / made["heatmap"]), atol=1e-5)
    # a second, smaller topk and the top-1 alone: all done already
    for again in (["-k", "2"], []):
        rerun = invoke(str(images), "-o", str(out), *again, *heat)
        assert rerun.exit_code == 0 and "0 explained, 2 already done" in rerun.stderr


def test_a_rerun_adds_the_pairs_each_class_lacks(images: Path, tmp_path: Path) -> None:
    """Top-1 with one method, then two methods for the top 2: three pairs per image are new,
    grouped by the methods each class lacks, ordered as a fresh run orders them."""
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert invoke(str(images), "-o", str(out), *LITE).exit_code == 0
    before = stamps(out)
    both = ["--input-size", "96", "-m", "gradcam,gradcam++", "-k", "2"]
    assert invoke(str(images), "-o", str(out), *both).exit_code == 0
    assert {name: stamps(out)[name] for name in before} == before
    assert invoke(str(images), "-o", str(fresh), *both).exit_code == 0
    assert files(out) == named(out) == files(fresh)
    for name in ("skimage_chelsea.png", "skimage_coffee.png"):
        assert pairs(record_of(out, name)) == pairs(record_of(fresh, name))
        assert record_of(out, name)["request"]["methods"] == ["gradcam", "gradcam++"]


def test_an_older_record_that_names_a_target_without_its_class_is_redone(images: Path, tmp_path: Path) -> None:
    """Earlier versions named a lone `-t N` file without `.cN`: merging would give the top-1
    the same file name, so such a record is replaced, never added to."""
    out = tmp_path / "out"
    chelsea = str(images / "skimage_chelsea.png")
    assert invoke(chelsea, "-o", str(out), "-t", "5", *LITE).exit_code == 0
    record = record_of(out)
    (out / "skimage_chelsea.png.gradcam.c5.png").rename(out / "skimage_chelsea.png.gradcam.png")
    record["explanations"][0]["overlay"] = "skimage_chelsea.png.gradcam.png"
    (out / "skimage_chelsea.png.json").write_text(json.dumps(record))
    result = invoke(chelsea, "-o", str(out), *LITE)
    assert result.exit_code == 0 and "1 explained" in result.stderr
    assert pairs(record_of(out)) == [("gradcam", record["predictions"][0]["index"])]
    assert files(out) == named(out)
