"""Colormaps, overlays, gradient images and tile grids (all RGB; BGR exists only inside cv2 calls)."""

from __future__ import annotations

import math
from functools import cache

import numpy as np

from camcli.choices import COLORMAPS
from camcli.lazy import cv2


@cache
def colormap_lut(name: str) -> np.ndarray:
    """(256, 3) uint8 RGB lookup table: index 0 is 'cold', 255 is 'hot'."""
    ramp = np.arange(256, dtype=np.uint8).reshape(256, 1)
    code = COLORMAPS[name]
    if code is None:
        return np.repeat(ramp, 3, axis=1)
    return cv2.applyColorMap(ramp, getattr(cv2, code)).reshape(256, 3)[:, ::-1].copy()  # BGR -> RGB


def resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize with pixel-centre alignment (as torch's align_corners=False)."""
    if array.shape[1] == width and array.shape[0] == height:
        return array
    return cv2.resize(array, (width, height), interpolation=cv2.INTER_LINEAR)


def heatmap_at_size(heat: np.ndarray, width: int, height: int) -> np.ndarray:
    """A model-resolution map at the image's size, as written to `.npy`: a CAM (h, w) in
    [0, 1] -> (H, W) clipped to [0, 1]; an input gradient (3, h, w) -> raw (H, W, 3)."""
    if heat.ndim == 3:
        return resize(np.ascontiguousarray(heat.transpose(1, 2, 0)), width, height)
    return np.clip(resize(heat, width, height), 0.0, 1.0)


def overlay(image: np.ndarray, heat: np.ndarray, colormap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] heatmap of the image's size over an RGB uint8 image.

    Three vectorised cv2 calls (quantise, look up, blend) that release the GIL, so the
    writer thread renders while the model runs; each rounds to nearest like the float
    formula rint((1 - alpha) * image + alpha * colour) of the definition.
    """
    index = cv2.convertScaleAbs(heat, alpha=255.0)  # rint + saturate to uint8
    colours = cv2.applyColorMap(index, colormap_lut(colormap)[:, None])  # user LUT: stays RGB
    return cv2.addWeighted(image, 1.0 - alpha, colours, alpha, 0.0)


def gradient_image(gradient: np.ndarray) -> np.ndarray:
    """An (H, W, 3) input gradient as a viewable RGB image: standardised, scaled by 0.1
    around mid-grey and clipped, the usual rendering of guided backpropagation."""
    g = gradient.astype(np.float32)
    g = (g - g.mean()) / (g.std() + 1e-5) * 0.1 + 0.5
    return np.clip(np.rint(g * 255.0), 0, 255).astype(np.uint8)


# --- comparison grids -------------------------------------------------------------------------

GRID_PAD = 6  # white gutter between and around panels, in pixels


def title_height(panel_height: int) -> int:
    """Height of the two-line title bar above each panel (scales with the panel)."""
    return max(24, round(panel_height * 0.2))


def grid_size(rows: int, columns: int, panel_width: int, panel_height: int) -> tuple[int, int]:
    """(width, height) of a grid of `rows` x `columns` titled panels."""
    width = columns * panel_width + (columns + 1) * GRID_PAD
    height = rows * (title_height(panel_height) + panel_height) + (rows + 1) * GRID_PAD
    return width, height


def panel_width(image_width: int, image_height: int, panel_height: int) -> int:
    return max(1, round(image_width * panel_height / image_height))


def comparison_grid(cells: list[list[tuple[np.ndarray, str, str] | None]], panel_height: int = 224) -> np.ndarray:
    """Lay out titled panels (picture, title line, subtitle line) row by row, like the
    side-by-side figures of the CAM papers; ``None`` leaves a cell blank. Every picture
    of one grid has the same aspect ratio (the image's), so panels share one width."""
    first = next(cell for row in cells for cell in row if cell is not None)
    height, width = first[0].shape[:2]
    pw = panel_width(width, height, panel_height)
    columns = max(len(row) for row in cells)
    grid_w, grid_h = grid_size(len(cells), columns, pw, panel_height)
    grid = np.full((grid_h, grid_w, 3), 255, dtype=np.uint8)
    th = title_height(panel_height)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            if cell is None:
                continue
            picture, title, subtitle = cell
            x = GRID_PAD + c * (pw + GRID_PAD)
            y = GRID_PAD + r * (th + panel_height + GRID_PAD)
            _put_text(grid, title, x, y + round(th * 0.42), pw, th, bold=True)
            _put_text(grid, subtitle, x, y + round(th * 0.85), pw, th, bold=False)
            grid[y + th : y + th + panel_height, x : x + pw] = resize(picture, pw, panel_height)
    return grid


def _put_text(grid: np.ndarray, text: str, x: int, baseline: int, width: int, bar: int, bold: bool) -> None:
    """Draw one line (ASCII; others as '?'), shrunk then cut with '...' to fit the panel."""
    text = text.encode("ascii", "replace").decode()
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = bar / 60.0
    thickness = 2 if bold and bar >= 40 else 1
    while cv2.getTextSize(text, font, scale, thickness)[0][0] > width and scale > bar / 110.0:
        scale *= 0.9
    while len(text) > 1 and cv2.getTextSize(text, font, scale, thickness)[0][0] > width:
        text = text[:-4] + "..." if len(text) > 4 else text[:-1]
    cv2.putText(grid, text, (x, baseline), font, scale, (0, 0, 0), thickness, cv2.LINE_AA)


def colorize(maps: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """(..., h, w) maps in [0, 1] -> (..., h, w, 3) RGB uint8 through the colormap."""
    index = np.clip(np.rint(maps * 255.0), 0, 255).astype(np.uint8)
    return colormap_lut(colormap)[index]


def tile_grid(tiles: np.ndarray, columns: int | None = None, min_side: int = 64, gap: int = 2) -> np.ndarray:
    """(N, h, w, 3) RGB uint8 tiles -> one RGB image: a near-square grid, row by row,
    each tile enlarged by an integer factor (nearest, so cells stay visible) to at least
    `min_side` pixels, on a white background with `gap` pixels between tiles."""
    count, height, width = tiles.shape[:3]
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    scale = max(1, math.ceil(min_side / max(height, width)))
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    height, width = height * scale, width * scale
    grid = np.full((rows * (height + gap) + gap, columns * (width + gap) + gap, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        top = gap + (i // columns) * (height + gap)
        left = gap + (i % columns) * (width + gap)
        grid[top : top + height, left : left + width] = tile
    return grid


def draw_boxes(picture: np.ndarray, boxes: list[list[int]], thickness: int = 2) -> np.ndarray:
    """`--draw-boxes`: each box as a white rectangle with a black edge (seen on any colour)."""
    out = np.ascontiguousarray(picture.copy())
    for x0, y0, x1, y1 in boxes:
        cv2.rectangle(out, (x0, y0), (x1, y1), (0, 0, 0), thickness + 2)
        cv2.rectangle(out, (x0, y0), (x1, y1), (255, 255, 255), thickness)
    return out


# --- label maps (occlusion's winner) --------------------------------------------------------

# Tableau's 10 categorical colours (RGB), then two more: classes beyond 12 reuse them in order.
LABEL_COLOURS = np.array(
    [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
        (0, 0, 0),
        (255, 255, 255),
    ],
    dtype=np.uint8,
)


def labels_at_size(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """A model-resolution map of class indices at the image's size (nearest: no blended classes)."""
    return cv2.resize(labels.astype(np.float32), (width, height), interpolation=cv2.INTER_NEAREST)


def label_map(image: np.ndarray, labels: np.ndarray, legend: list[tuple[int, str]], alpha: float = 0.5) -> np.ndarray:
    """An (H, W) map of class indices (the image's size) over the RGB image, one colour per
    class in `legend` order (index, text), with the legend in a white strip below the picture."""
    height, width = image.shape[:2]
    colours = np.zeros((height, width, 3), dtype=np.uint8)
    for n, (index, _) in enumerate(legend):
        colours[labels == index] = LABEL_COLOURS[n % len(LABEL_COLOURS)]
    blended = cv2.addWeighted(image, 1.0 - alpha, colours, alpha, 0.0)
    line = max(18, round(width / 22))
    strip = np.full((line * len(legend) + line // 2, width, 3), 255, dtype=np.uint8)
    for n, (_, text) in enumerate(legend):
        top = line // 4 + n * line
        colour = tuple(int(c) for c in LABEL_COLOURS[n % len(LABEL_COLOURS)])
        cv2.rectangle(strip, (line // 4, top + 2), (line // 4 + line - 6, top + line - 4), colour, -1)
        cv2.rectangle(strip, (line // 4, top + 2), (line // 4 + line - 6, top + line - 4), (0, 0, 0), 1)
        _put_text(strip, text, line // 4 + line, top + round(line * 0.72), width - line * 2, line * 2, bold=False)
    return np.concatenate([blended, strip], 0)
