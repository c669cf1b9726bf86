"""The bad-input battery: broken, hostile and unusual files mixed into a folder of good
ones. Each bad file gives one stderr line naming it and the reason, an ``error`` in its
JSON, and exit 1; the valid-but-unusual formats are decoded as a viewer shows them.
Everything is generated in a temp dir; the model is `tests/tiny_models.py`'s
`brightness`, whose Grad-CAM is the image's brightness."""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from typer.testing import CliRunner

from camcli.cli import app
from camcli.engine import normalise
from camcli.errors import ImageError
from camcli.io import DEFAULT_MAX_PIXELS, collect_inputs, decode_image

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
TINY = ["--model", "tiny_models:brightness", "--mean", "0,0,0", "--std", "1,1,1", "--input-size", "32"]
IS_ROOT = os.geteuid() == 0

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["explain", *args])


# --- generated files --------------------------------------------------------------------------


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(width: int = 64, height: int = 48) -> np.ndarray:
    """A real photo (the sample cat), small."""
    rgb = np.asarray(Image.open(SAMPLES / "skimage_chelsea.png").convert("RGB"))
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)


def bright_patch(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Dark noise with one bright rectangle (x0, y0, x1, y1): where the heat must sit."""
    rng = np.random.default_rng(0)
    rgb = (rng.random((height, width, 3)) * 40).astype(np.uint8)
    x0, y0, x1, y1 = box
    rgb[y0:y1, x0:x1] = 255
    return rgb


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 30000) -> bytes:
    """A small PNG declaring side x side 8-bit grey pixels (2.7 GB once decoded to RGB);
    its data holds the first 100 rows, enough for a decoder to allocate the whole image."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\0" * (1 + side) * 100, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def corrupt_png() -> bytes:
    data = bytearray(encoded(Image.fromarray(photo()), "PNG"))
    data[data.index(b"IDAT") + 20] ^= 0xFF  # a flipped byte in the compressed pixels
    return bytes(data)


def rotated_jpeg(rgb: np.ndarray, orientation: int = 6) -> bytes:
    """A JPEG stored as `rgb` whose EXIF tells viewers to rotate it (6: 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(Image.fromarray(rgb), "JPEG", quality=95, exif=exif.tobytes())


def two_frame_gif(first: np.ndarray) -> bytes:
    frames = [Image.fromarray(x).convert("P", palette=Image.Palette.ADAPTIVE) for x in (first, 255 - first)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])


GOOD = photo()
GRAY16 = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
ALPHA = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
PATCH_BOX = (60, 4, 90, 20)  # bright patch in the stored (unrotated) 100 x 40 picture
JPEG = encoded(Image.fromarray(photo(320, 240)), "JPEG", quality=90)

# name -> bytes of the file; each must be explained
VALID: dict[str, bytes] = {
    "good.png": encoded(Image.fromarray(GOOD), "PNG"),
    "gray.png": encoded(Image.fromarray(GOOD[:, :, 1]), "PNG"),
    "gray16.png": encoded(Image.fromarray(GRAY16), "PNG"),
    "rgba.png": encoded(Image.fromarray(np.dstack([GOOD, ALPHA])), "PNG"),
    "cmyk.jpg": encoded(Image.fromarray(GOOD).convert("CMYK"), "JPEG", quality=95),
    "anim.gif": two_frame_gif(GOOD),
    "image.bmp": encoded(Image.fromarray(GOOD), "BMP"),
    "image.tiff": encoded(Image.fromarray(GOOD), "TIFF"),
    "image.webp": encoded(Image.fromarray(GOOD), "WEBP", lossless=True),
    "rotated.jpg": rotated_jpeg(bright_patch(100, 40, PATCH_BOX)),
    "trailing.jpg": JPEG + b"vendor trailer after the end marker",
    "one.png": encoded(Image.fromarray(np.full((1, 1, 3), 200, np.uint8)), "PNG"),
    "strip.png": encoded(Image.fromarray(np.tile(GOOD[:1, :3], (10000, 1, 1))), "PNG"),
    "with space.png": encoded(Image.fromarray(GOOD), "PNG"),
    "ünïcødé 猫.png": encoded(Image.fromarray(GOOD), "PNG"),
    "-dash.png": encoded(Image.fromarray(GOOD), "PNG"),
    "UPPER.PNG": encoded(Image.fromarray(GOOD), "PNG"),
}
# displayed (height, width) where it differs from GOOD's 48 x 64
DISPLAYED = {"rotated.jpg": (100, 40), "trailing.jpg": (240, 320), "one.png": (1, 1), "strip.png": (10000, 3)}

# name -> (bytes, the reason its line and JSON give)
BAD: dict[str, tuple[bytes, str]] = {
    "empty.jpg": (b"", "empty file"),
    "notes.jpg": (b"shopping list: milk, eggs\n", "not a decodable image"),
    "truncated.jpg": (JPEG[: len(JPEG) // 3], "corrupt JPEG file: image file is truncated"),
    "corrupt.png": (corrupt_png(), "corrupt PNG file: bad checksum in its IDAT chunk"),
    "noise.png": (np.random.default_rng(7).bytes(4096), "not a decodable image"),
    "bomb.png": (
        bomb_png(),
        "30000x30000 image (900,000,000 pixels) is over the 178,956,970-pixel limit (a decompression bomb?)",
    ),
}
SPECIAL_BAD = {"fifo.jpg": "not a regular file", "dangling.jpg": "cannot read: No such file or directory"}


@pytest.fixture(scope="module")
def battery(tmp_path_factory):
    """One run over a folder holding every case, plus symlink loops; returns (result, src, out)."""
    root = tmp_path_factory.mktemp("battery")
    src, out = root / "in", root / "out"
    (src / "sub").mkdir(parents=True)
    for name, data in VALID.items():
        (src / name).write_bytes(data)
    for name, (data, _) in BAD.items():
        (src / name).write_bytes(data)
    os.mkfifo(src / "fifo.jpg")  # reading it would block forever
    (src / "dangling.jpg").symlink_to(root / "gone.jpg")
    (src / "sub" / "nested.png").write_bytes(VALID["good.png"])
    (src / "loop").symlink_to(src, target_is_directory=True)  # in/loop -> in
    (src / "sub" / "up").symlink_to("..", target_is_directory=True)  # in/sub/up -> in
    result = invoke(str(src), "-o", str(out), "--jsonl", "--save-heatmap", "-b", "4", *TINY)
    return result, src, out


def test_battery_exit_code_and_no_traceback(battery) -> None:
    result, _, _ = battery
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"{len(VALID) + 1} explained, 0 already done, {len(BAD) + len(SPECIAL_BAD)} failed" in result.stderr


@pytest.mark.parametrize("name", [*BAD, *SPECIAL_BAD])
def test_bad_file_is_one_line_and_an_error_in_its_json(battery, name: str) -> None:
    result, src, out = battery
    reason = BAD[name][1] if name in BAD else SPECIAL_BAD[name]
    lines = [line for line in result.stderr.splitlines() if name in line]
    assert len(lines) == 1 and lines[0].startswith(f"camcli: {src / name}: {reason}")
    record = json.loads((out / f"{name}.json").read_text())
    assert record["error"].startswith(reason)
    assert record["explanations"] == [] and record["width"] is None
    assert not list(out.glob(f"{name}.*.png")), "no overlay for a failed image"


@pytest.mark.parametrize("name", [*VALID, "sub/nested.png"])
def test_valid_file_is_explained_at_its_displayed_size(battery, name: str) -> None:
    _, _, out = battery
    record = json.loads((out / f"{name}.json").read_text())
    height, width = DISPLAYED.get(name, GOOD.shape[:2])
    assert record["error"] is None
    assert (record["height"], record["width"]) == (height, width)
    (explanation,) = record["explanations"]
    folder = (out / name).parent
    overlay = cv2.imread(str(folder / explanation["overlay"]))
    assert overlay.shape == (height, width, 3)
    heat = np.load(folder / explanation["heatmap"])
    assert heat.shape == (height, width) and np.isfinite(heat).all()


def test_symlink_loops_are_walked_once_with_one_line_each(battery) -> None:
    result, src, out = battery
    loops = [line for line in result.stderr.splitlines() if "symlink" in line]
    assert sorted(loops) == sorted(
        [
            f"camcli: {src / 'loop'}: skipped, the same folder as {src} (symlink)",
            f"camcli: {src / 'sub' / 'up'}: skipped, the same folder as {src} (symlink)",
        ]
    )
    assert not (out / "loop").exists() and not (out / "sub" / "up").exists()
    assert len(list(out.rglob("*.json"))) == len(VALID) + len(BAD) + len(SPECIAL_BAD) + 1  # + sub/nested.png
    assert not list(out.rglob("*.tmp"))


def test_jsonl_has_one_line_per_input_errors_included(battery) -> None:
    result, _, _ = battery
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == len(VALID) + len(BAD) + len(SPECIAL_BAD) + 1
    errors = {Path(r["image"]).name: r["error"] for r in records if r["error"]}
    assert set(errors) == {*BAD, *SPECIAL_BAD}


def test_exif_rotated_heatmap_sits_on_the_patch_as_a_viewer_shows_it(battery) -> None:
    """Stored 100 wide x 40 high, EXIF 6: viewers show it 40 wide x 100 high, the patch
    rotated 90 degrees clockwise. The heat (brightness) must peak there, not at the
    stored position."""
    _, src, out = battery
    viewer = np.asarray(ImageOps.exif_transpose(Image.open(src / "rotated.jpg")))
    assert viewer.shape == (100, 40, 3)
    heat = np.load(out / "rotated.jpg.gradcam.npy")
    x0, y0, x1, y1 = PATCH_BOX
    rows, cols = slice(x0, x1), slice(40 - y1, 40 - y0)  # clockwise: (x, y) -> (39 - y, x)
    assert viewer[rows, cols].mean() > 200  # the patch is where the viewer shows it
    assert heat[rows, cols].mean() > 0.8 and np.delete(heat, np.r_[rows], axis=0).mean() < 0.3
    overlay = cv2.cvtColor(cv2.imread(str(out / "rotated.jpg.gradcam.png")), cv2.COLOR_BGR2RGB)
    assert np.corrcoef(overlay.mean(2).ravel(), viewer.mean(2).ravel())[0, 1] > 0.9


def test_a_uniform_image_gives_a_flat_map_warning_and_zeros(tmp_path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name, value in (("grey.png", 128), ("black.png", 0)):
        (src / name).write_bytes(encoded(Image.fromarray(np.full((24, 32, 3), value, np.uint8)), "PNG"))
    (src / "patch.png").write_bytes(encoded(Image.fromarray(bright_patch(32, 24, (4, 4, 12, 12))), "PNG"))
    result = invoke(str(src), "-o", str(out), "--save-heatmap", "-m", "gradcam,gradcam++,scorecam", *TINY)
    assert result.exit_code == 0, result.output
    for name in ("grey.png", "black.png"):
        record = json.loads((out / f"{name}.json").read_text())
        assert [e["warning"] for e in record["explanations"]] == ["flat map"] * 3
        for explanation in record["explanations"]:
            heat = np.load(out / explanation["heatmap"])
            assert heat.dtype == np.float32 and not heat.any()
    record = json.loads((out / "patch.png.json").read_text())
    assert [e["warning"] for e in record["explanations"]] == [None] * 3
    assert "NaN" not in "".join(p.read_text() for p in out.glob("*.json"))


def test_normalise_never_returns_nan() -> None:
    maps = torch.tensor(
        [
            [[0.0, 0.0], [0.0, 0.0]],
            [[3.0, 3.0], [3.0, 3.0]],
            [[float("nan"), float("nan")], [float("nan"), float("nan")]],
            [[float("inf"), 1.0], [2.0, 3.0]],
            [[1.0, 2.0], [3.0, 5.0]],
        ]
    )
    scaled, flat = normalise(maps)
    assert flat.tolist() == [True, True, True, False, False]
    assert scaled.isfinite().all() and not scaled[:3].any()
    assert scaled[4].flatten().tolist() == [0.0, 0.25, 0.5, 1.0]
    assert maps.shape == scaled.shape


# --- decode_image: pixels as a viewer shows them ------------------------------------------------


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["good.png", "image.bmp", "image.tiff", "image.webp", "-dash.png"])
def test_lossless_formats_decode_exactly(tmp_path, name: str) -> None:
    assert np.array_equal(decode_image(write(tmp_path, name, VALID[name])), GOOD)


def test_grayscale_and_16_bit_png(tmp_path) -> None:
    gray = decode_image(write(tmp_path, "gray.png", VALID["gray.png"]))
    assert np.array_equal(gray, np.repeat(GOOD[:, :, 1:2], 3, axis=2))
    deep = decode_image(write(tmp_path, "gray16.png", VALID["gray16.png"]))
    assert deep.dtype == np.uint8
    assert np.array_equal(deep, np.repeat((GRAY16 >> 8).astype(np.uint8)[:, :, None], 3, axis=2))


def test_rgba_png_drops_alpha_like_pil_convert_rgb(tmp_path) -> None:
    assert np.array_equal(decode_image(write(tmp_path, "rgba.png", VALID["rgba.png"])), GOOD)


def test_cmyk_jpeg_matches_pillow(tmp_path) -> None:
    ours = decode_image(write(tmp_path, "cmyk.jpg", VALID["cmyk.jpg"])).astype(int)
    pillow = np.asarray(Image.open(io.BytesIO(VALID["cmyk.jpg"])).convert("RGB")).astype(int)
    assert np.abs(ours - pillow).mean() < 3 and np.abs(ours - GOOD).mean() < 5


def test_gif_gives_its_first_frame(tmp_path) -> None:
    ours = decode_image(write(tmp_path, "anim.gif", VALID["anim.gif"]))
    first = np.asarray(Image.open(io.BytesIO(VALID["anim.gif"])).convert("RGB"))
    assert np.array_equal(ours, first)
    assert np.abs(ours.astype(int) - GOOD).mean() < 8  # the photo, not its negative


def test_exif_orientation_is_applied(tmp_path) -> None:
    for orientation in (3, 6, 8):
        data = rotated_jpeg(bright_patch(100, 40, PATCH_BOX), orientation)
        viewer = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
        ours = decode_image(write(tmp_path, f"o{orientation}.jpg", data))
        assert ours.shape == viewer.shape and np.abs(ours.astype(int) - viewer).max() <= 2


def test_jpeg_without_end_marker_is_decoded_only_if_complete(tmp_path) -> None:
    """Data after the end marker is fine; a missing tail is an error (older OpenCV fills it grey)."""
    full = decode_image(write(tmp_path, "full.jpg", JPEG))
    assert np.array_equal(decode_image(write(tmp_path, "t.jpg", VALID["trailing.jpg"])), full)
    for fraction in (0.33, 0.9, 0.999):
        with pytest.raises(ImageError, match="corrupt JPEG file: image file is truncated"):
            decode_image(write(tmp_path, "cut.jpg", JPEG[: int(len(JPEG) * fraction)]))


def test_decompression_bomb_is_refused_from_its_header(tmp_path) -> None:
    path = write(tmp_path, "bomb.png", bomb_png())
    assert path.stat().st_size < 1_000_000
    start = time.perf_counter()
    with pytest.raises(ImageError, match="30000x30000 image"):
        decode_image(path)
    assert time.perf_counter() - start < 0.5  # a decode of 900 M pixels would take seconds
    assert DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS or Image.MAX_IMAGE_PIXELS is None


def test_max_pixels_option_sets_the_limit(tmp_path) -> None:
    path = write(tmp_path, "good.png", VALID["good.png"])  # 64 x 48 = 3072 pixels
    out = tmp_path / "out"
    refused = invoke(str(path), "-o", str(out), "--max-pixels", "3071", *TINY)
    assert refused.exit_code == 1
    assert f"{path}: 64x48 image (3,072 pixels) is over the 3,071-pixel limit" in refused.stderr
    allowed = invoke(str(path), "-o", str(out), "--max-pixels", "3072", *TINY)
    assert allowed.exit_code == 0, allowed.output
    assert json.loads((out / "good.png.json").read_text())["error"] is None


@pytest.mark.skipif(IS_ROOT, reason="root reads files whatever their mode: chmod 000 cannot make one unreadable")
def test_unreadable_file_is_one_line(tmp_path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    write(src, "good.png", VALID["good.png"])
    locked = write(src, "locked.png", VALID["good.png"])
    locked.chmod(0)
    result = invoke(str(src), "-o", str(tmp_path / "out"), *TINY)
    assert result.exit_code == 1
    assert [line for line in result.stderr.splitlines() if "locked.png" in line] == [
        f"camcli: {locked}: cannot read: Permission denied"
    ]
    assert json.loads((tmp_path / "out" / "good.png.json").read_text())["error"] is None


# --- inputs, outputs and usage errors -----------------------------------------------------------


def test_leading_dash_file_argument_after_double_dash(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "-dash.png", VALID["-dash.png"])
    result = invoke("-o", "out", *TINY, "--", "-dash.png")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "-dash.png.json").read_text())["error"] is None


def test_folder_without_images_is_a_usage_error_naming_the_extensions(tmp_path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    write(src, "readme.txt", b"no images here")
    result = invoke(str(src), "-o", str(tmp_path / "out"), *TINY)
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(f"camcli: error: no images found in {src} (looked for .bmp, .gif, .jpeg")
    assert not (tmp_path / "out").exists()  # found before anything was created


def test_unknown_class_name_creates_nothing(tmp_path, samples_dir) -> None:
    out = tmp_path / "newdir"
    result = invoke(str(samples_dir / "skimage_chelsea.png"), "-t", "kat", "-o", str(out))
    assert result.exit_code == 2 and "unknown class name 'kat'" in result.stderr
    assert not out.exists()


def test_out_naming_a_file_says_it_is_a_file(tmp_path, samples_dir) -> None:
    afile = write(tmp_path, "afile", b"x")
    result = invoke(str(samples_dir / "skimage_chelsea.png"), "-o", str(afile), *TINY)
    assert result.exit_code == 2 and f"output folder {afile} is a file, not a folder" in result.stderr


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_output_dir_that_cannot_be_created_is_exit_2_before_any_work(tmp_path, where: str) -> None:
    image = write(tmp_path, "good.png", VALID["good.png"])
    blocker = write(tmp_path, "blocker", b"a file, not a folder")
    out = blocker / "out" if where == "under_a_file" else blocker
    result = invoke(str(image), "-o", str(out), *TINY)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"camcli: error: cannot write to output folder {out}: Not a directory"
        if where == "under_a_file"
        else f"camcli: error: output folder {out} is a file, not a folder; name a folder with -o/--out"
    ]
    assert blocker.read_bytes() == b"a file, not a folder"


def test_duplicate_and_case_variant_inputs(tmp_path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    write(src, "a.png", VALID["good.png"])
    write(src, "A.PNG", VALID["good.png"])
    items = collect_inputs([str(src), str(src / "a.png"), str(src)])
    assert sorted(item.key for item in items) == ["A.PNG", "a.png~2"]


def test_factory_that_raises_is_one_line_naming_it(tmp_path) -> None:
    image = write(tmp_path, "good.png", VALID["good.png"])
    result = invoke(str(image), "-o", str(tmp_path / "out"), "--model", "tiny_models:broken")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "camcli: error: --model tiny_models:broken: the factory raised ValueError: checkpoint config missing"
    ]


def test_outputs_never_escape_out(tmp_path, monkeypatch) -> None:
    """Absolute paths, `..` and stdin paths all map inside --out."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    image = write(tmp_path / "a", "x.png", VALID["good.png"])
    monkeypatch.chdir(tmp_path / "a" / "b")
    items = collect_inputs(["-"], [f"{image}\n", "../x.png\n", "../../a/./x.png\n"])
    assert len(items) == 1, "the same file three ways is one input"
    assert items[0].key == str(image).lstrip("/")
    (item,) = collect_inputs(["-"], ["../../a/x.png"])
    assert item.key == "__/__/a/x.png"
    out = tmp_path / "out"
    result = runner.invoke(app, ["explain", "-", "-o", str(out), *TINY], input="../x.png\n")
    assert result.exit_code == 0, result.output
    written = [p for p in tmp_path.rglob("*.json")]
    assert written == [out / "__" / "x.png.json"]


def test_truncated_multi_picture_jpeg_from_a_camera_is_refused(tmp_path) -> None:
    """Cameras and phones write MPO (JPEG + a second JPEG); Pillow names the format MPO."""
    first = Image.fromarray(GOOD)
    data = encoded(first, "MPO", quality=95, save_all=True, append_images=[Image.fromarray(255 - GOOD)])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert np.abs(decode_image(write(tmp_path, "mpo.jpg", data)).astype(int) - GOOD).mean() < 5
    with pytest.raises(ImageError, match="corrupt MPO file: image file is truncated"):
        decode_image(write(tmp_path, "cut.jpg", data[: len(data) // 4]))


def test_file_name_that_is_not_utf8(tmp_path) -> None:
    """A name whose bytes are not UTF-8 (Python holds it as lone surrogates) is explained,
    and its JSON and JSONL line are valid JSON that gives the same name back."""
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    raw = os.path.join(os.fsencode(folder), b"bad\xff name.png")
    with open(raw, "wb") as handle:
        handle.write(encoded(Image.fromarray(photo()), "PNG"))
    name = os.fsdecode(b"bad\xff name.png")
    result = invoke(str(folder), "-o", str(out), "--jsonl", "-q", *TINY)
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.splitlines()[0])
    record = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
    assert Path(line["image"]).name == Path(record["image"]).name == name
    assert record["error"] is None
    assert (out / record["explanations"][0]["overlay"]).is_file()
