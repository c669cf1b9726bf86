"""Finding inputs, decoding images and writing outputs atomically.

Images are decoded with OpenCV from bytes read by Python (so any file name works and
permission errors say so), converted to RGB once, here. Every output is written to
a temporary name in its folder and renamed into place, so a killed run never leaves
a half-written file.
"""

from __future__ import annotations

import errno
import fnmatch
import io
import json
import os
import re
import secrets
import stat
import struct
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageOps

from camcli.errors import ImageError, OutputError, UsageError

if TYPE_CHECKING:
    import numpy as np

# Nothing here changes process-wide state at import (a library must leave its caller's
# Pillow limits, OpenCV logging and umask alone); cv2 and numpy load on first use.

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})

# Pillow's own default: a larger image is refused from its header before any decoding
# (`--max-pixels` raises it). camcli checks the limit itself, with the caller's value; the
# CLI, which owns its process, switches Pillow's own check off (`allow_large_images`).
DEFAULT_MAX_PIXELS = 178_956_970

_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved: int | None = None


@contextmanager
def _quiet_opencv() -> Iterator[None]:
    """OpenCV's logging off while camcli decodes (its warnings, "PNG input buffer is
    incomplete", would bypass camcli's one-line errors), put back when the last of the
    concurrent decodes ends."""
    import cv2

    global _quiet_depth, _quiet_saved
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_saved = cv2.utils.logging.getLogLevel()
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _quiet_saved is not None:
                cv2.utils.logging.setLogLevel(_quiet_saved)


def allow_large_images() -> None:
    """For the CLI's process only: Pillow's decompression-bomb check off, since camcli
    applies `--max-pixels` itself (a library caller keeps Pillow's guard)."""
    Image.MAX_IMAGE_PIXELS = None


_JPEG_END = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class InputItem:
    """One image to explain and where its outputs go (``key`` is relative to --out)."""

    path: Path
    key: str


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def output_key(path: Path, root: Path | None = None) -> str:
    """The output name of `path` inside --out: its path below `root` (a folder given on
    the command line) or the path as given, with anchors dropped and `..` defused, so
    outputs never escape --out."""
    rel = PurePath(os.path.relpath(path, root)) if root is not None else PurePath(path)
    parts = ["__" if part == ".." else part for part in rel.parts if part not in ("", ".")]
    if rel.anchor and parts and parts[0] == rel.anchor:
        parts = parts[1:]
    return "/".join(parts)


def collect_inputs(
    args: Iterable[str],
    stdin_lines: Iterable[str] | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    warn: Callable[[str], None] | None = None,
) -> list[InputItem]:
    """Expand files, folders (recursively, sorted) and ``-`` (paths on stdin) into a list;
    see `stream_inputs`."""
    return list(stream_inputs(args, stdin_lines, include, exclude, warn))


def stream_inputs(
    args: Iterable[str],
    stdin_lines: Iterable[str] | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    warn: Callable[[str], None] | None = None,
) -> Iterator[InputItem]:
    """Expand files, folders (recursively, sorted) and ``-`` (paths on stdin), lazily:
    a path on stdin is yielded as soon as its line is read.

    Output names: a folder's images mirror their path below the folder, a file given
    as an argument keeps its name, a path from stdin keeps its path (anchor dropped).

    A path given as an argument that does not exist is a usage error, raised here,
    before any work; one read from stdin is yielded all the same and fails as that
    image (an error record), so one stale line does not stop a pipeline. The same file
    given twice (or a file and its folder) is explained once. `include` / `exclude` globs
    (`selected`) keep or drop inputs of every kind. Symlinked folders are followed,
    each real folder once: a link back into a folder already walked (a loop) is skipped
    with one line to `warn`.
    """
    args = list(args)
    for arg in args:
        if arg != "-" and not Path(arg).exists():
            raise UsageError(f"no such file or folder: {arg}")
    return _unique(item for item in _expand(args, stdin_lines, warn) if selected(item, include, exclude))


def _expand(
    args: list[str], stdin_lines: Iterable[str] | None, warn: Callable[[str], None] | None
) -> Iterator[InputItem]:
    for arg in args:
        if arg == "-":  # paths from a pipeline keep their folders, so names rarely collide
            for line in stdin_lines or ():
                line = line.strip()
                if line:
                    yield InputItem(Path(line), output_key(Path(line)))
            continue
        path = Path(arg)
        if path.is_dir():
            yield from _folder_items(path, warn or (lambda _: None))
        else:  # a file named on the command line: its outputs go to OUT/<name>
            yield InputItem(path, path.name)


def selected(item: InputItem, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> bool:
    """`--include` / `--exclude`: a glob without ``/`` matches the file name, one with
    ``/`` the output key (the path below the folder given); with includes, at least one
    must match; any matching exclude drops the item."""

    def matches(pattern: str) -> bool:
        return fnmatch.fnmatchcase(item.key if "/" in pattern else item.path.name, pattern)

    if include and not any(matches(p) for p in include):
        return False
    return not any(matches(p) for p in exclude)


def _folder_items(folder: Path, warn: Callable[[str], None]) -> list[InputItem]:
    found = []
    walked: dict[tuple[int, int], str] = {}  # real folder -> the path it was walked as

    def cannot_list(error: OSError) -> None:
        warn(f"{error.filename}: cannot list folder: {error.strerror or error}")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=cannot_list, followlinks=True):
        info = os.stat(dirpath)
        first = walked.setdefault((info.st_dev, info.st_ino), dirpath)
        if first != dirpath:  # reached again through a symlink: a loop, or a second path in
            warn(f"{dirpath}: skipped, the same folder as {first} (symlink)")
            dirnames.clear()
            continue
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if is_image_name(path):
                found.append(InputItem(path, output_key(path, folder)))
    return found


def _unique(items: Iterable[InputItem]) -> Iterator[InputItem]:
    seen_files: set[Path] = set()
    seen_keys: set[str] = set()
    for item in items:
        real = Path(os.path.realpath(item.path))  # Path.resolve raises on a symlink loop
        if real in seen_files:
            continue
        seen_files.add(real)
        key, n = item.key, 1
        while key.lower() in seen_keys:  # never let two inputs share output files
            n += 1
            key = f"{item.key}~{n}"
        seen_keys.add(key.lower())
        yield InputItem(item.path, key)


def decode_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The image as an RGB uint8 (H, W, 3) array as a viewer shows it, or an ImageError
    saying why not.

    The header is read first (Pillow, lazily): unknown formats and images over
    `max_pixels` are refused before any pixel is decoded. OpenCV decodes (it applies
    the EXIF orientation, scales 16-bit to 8-bit, converts grey, palette and CMYK, and
    drops alpha, like PIL's ``convert("RGB")``); Pillow decodes what OpenCV cannot
    (GIF with older OpenCV) and names the reason for files that are broken. A JPEG
    without its end marker goes to Pillow too: older OpenCV decodes a truncated JPEG
    without complaint, filling the missing part with grey.
    """
    import cv2
    import numpy as np

    data = _read_regular_file(path)
    try:
        header = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # over twice Pillow's own limit (library callers)
        raise ImageError(f"{exc} (Pillow's Image.MAX_IMAGE_PIXELS)") from None
    except Exception:  # noqa: BLE001 - any header Pillow cannot parse is not an image
        raise ImageError("not a decodable image") from None
    width, height = header.size
    if width * height > max_pixels:
        raise ImageError(
            f"{width}x{height} image ({width * height:,} pixels) is over the {max_pixels:,}-pixel limit "
            "(a decompression bomb?); --max-pixels raises the limit"
        )
    if header.format in ("JPEG", "MPO") and not data.rstrip(b"\0").endswith(_JPEG_END):
        return _decode_with_pillow(header)
    if header.format == "PNG":
        _check_png_chunks(data)
    with _quiet_opencv():
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.size == 0:
        return _decode_with_pillow(header)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _read_regular_file(path: Path) -> bytes:
    """The file's bytes; a FIFO or device named like an image would block or never end."""
    try:  # non-blocking open: opening a FIFO for reading would wait for a writer
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise ImageError("not a regular file")
            data = handle.read()
    except OSError as exc:
        raise ImageError(f"cannot read: {exc.strerror or exc}") from None
    if not data:
        raise ImageError("empty file")
    return data


def _check_png_chunks(data: bytes) -> None:
    """Refuse a PNG whose chunk checksums are wrong, before libpng prints its own error
    line to stderr. A truncated file is left to the decoders, which name it."""
    position = len(_PNG_SIGNATURE)
    while position + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, position)
        end = position + 8 + length
        if end + 4 > len(data):
            return
        kind = data[position + 4 : position + 8]
        (expected,) = struct.unpack_from(">I", data, end)
        if zlib.crc32(data[position + 4 : end]) != expected:
            raise ImageError(f"corrupt PNG file: bad checksum in its {kind.decode('latin-1')} chunk")
        if kind == b"IEND":
            return
        position = end + 4


def _decode_with_pillow(image: Image.Image) -> np.ndarray:
    """Pillow's decode (first frame, EXIF orientation applied, alpha dropped), or the reason
    the file is broken (truncated, bad checksum, corrupt data)."""
    import numpy as np

    kind = image.format or "image"
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I;16"):  # convert() would clip 16-bit values, not scale them
            gray = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
            return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
        return np.array(image.convert("RGB"))  # a writable copy, for torch.from_numpy
    except Exception as exc:  # noqa: BLE001 - a broken file is one line, whatever the decoder raised
        reason = str(exc).strip() or type(exc).__name__
        raise ImageError(f"corrupt {kind} file: {reason}") from None


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place.

    The temporary file is created with mode 0666 so the kernel applies the umask, as
    open() would (mkstemp's 0600 would need the umask, which only os.umask can read, by
    setting it). A failure (a full disk) removes it and raises an OutputError naming `path`.
    """
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise OutputError(path, exc.strerror or str(exc), disk_full=exc.errno in _DISK_FULL) from None


_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")  # atomic_write's temporary names


def remove_stale_temps(out_dir: Path, keys: Iterable[str]) -> int:
    """Delete temporary files a killed run left for these outputs (``.NAME.XXXXXXXX.tmp``
    beside the outputs of each key); returns how many. One listing per output folder."""
    names_by_folder: dict[Path, set[str]] = {}
    for key in keys:
        target = out_dir / key
        names_by_folder.setdefault(target.parent, set()).add(target.name)
    removed = 0
    for folder, names in names_by_folder.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            match = _TEMP_NAME.match(entry.name)
            if match and _owned_by(match["name"], names) and entry.is_file():
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    return removed


def _owned_by(output_name: str, image_names: set[str]) -> bool:
    """Whether an output file name (``a.jpg.json``, ``a.jpg.gradcam.png``) belongs to an image."""
    parts = output_name.split(".")
    return any(".".join(parts[:i]) in image_names for i in range(1, len(parts)))


OVERLAY_FORMATS = {  # format: cv2 parameters (name, value), the first the JPEG/WebP quality
    # PNG is written by fpng (lossless, 24-bit RGB): about 10x faster than libpng at zlib level 1
    # on 640x480 photo overlays for files ~15 % larger (benchmarks/bench.py section 6 measures
    # the alternatives), so an overlay costs less than its share of the model.
    "png": (),
    "jpg": (("IMWRITE_JPEG_QUALITY", 92),),
    "webp": (("IMWRITE_WEBP_QUALITY", 90),),
}


def encode_image(rgb: np.ndarray, fmt: str = "png", quality: int | None = None) -> bytes:
    """PNG, JPEG or WebP bytes (see OVERLAY_FORMATS) of an RGB uint8 image; `quality`
    overrides the JPEG/WebP default (thumbnails)."""
    if fmt == "png":
        return encode_png(rgb)
    import cv2

    params = []
    for n, (flag, value) in enumerate(OVERLAY_FORMATS[fmt]):
        if n == 0 and quality is not None:
            value = quality
        params += [getattr(cv2, flag), getattr(cv2, value) if isinstance(value, str) else value]
    ok, buffer = cv2.imencode(f".{fmt}", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise OSError(f"could not encode {fmt}")
    return buffer.tobytes()


def encode_png(rgb: np.ndarray) -> bytes:
    """Lossless PNG bytes of an (H, W, 3) RGB uint8 image, by fpng."""
    import numpy as np

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"PNG overlays are (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    import fpng

    png = fpng.from_ndarray(np.ascontiguousarray(rgb))
    if not png:
        raise OSError("could not encode png")
    return png


def npy_bytes(array: np.ndarray) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def json_text(record: dict[str, Any], indent: int | None = None) -> str:
    """JSON that any UTF-8 stream accepts: a file name that is not valid UTF-8 (its bytes
    decoded by Python as lone surrogates) is written as its \\udcXX escape, which JSON
    readers turn back into the same string."""
    text = json.dumps(record, indent=indent, ensure_ascii=False)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_bytes(record: dict[str, Any]) -> bytes:
    return (json_text(record, indent=2) + "\n").encode()


def read_json(path: Path) -> dict[str, Any] | None:
    """A previous run's JSON, or None when missing or unreadable (then it is redone)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def no_images_message(inputs: Sequence[str]) -> str:
    """What an input list without images says: where camcli looked and for which names."""
    extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
    return f"no images found in {' '.join(inputs)} (looked for {extensions}, any case)"


def check_writable(out_dir: Path) -> None:
    """Exit 2 before any work if --out cannot be created or written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output folder {out_dir} is a file, not a folder; name a folder with -o/--out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write to output folder {out_dir}: {exc.strerror or exc}") from None
