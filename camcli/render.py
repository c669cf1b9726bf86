"""Colormaps, overlays and gradient images (all RGB; BGR exists only inside cv2 calls)."""

from __future__ import annotations

from functools import cache

import cv2
import numpy as np

COLORMAPS = {
    "jet": cv2.COLORMAP_JET,
    "turbo": cv2.COLORMAP_TURBO,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "inferno": cv2.COLORMAP_INFERNO,
    "magma": cv2.COLORMAP_MAGMA,
    "plasma": cv2.COLORMAP_PLASMA,
    "hot": cv2.COLORMAP_HOT,
    "gray": None,
}


@cache
def colormap_lut(name: str) -> np.ndarray:
    """(256, 3) uint8 RGB lookup table: index 0 is 'cold', 255 is 'hot'."""
    ramp = np.arange(256, dtype=np.uint8).reshape(256, 1)
    code = COLORMAPS[name]
    if code is None:
        return np.repeat(ramp, 3, axis=1)
    return cv2.applyColorMap(ramp, code).reshape(256, 3)[:, ::-1].copy()  # BGR -> RGB


def resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize with pixel-centre alignment (as torch's align_corners=False)."""
    if array.shape[1] == width and array.shape[0] == height:
        return array
    return cv2.resize(array, (width, height), interpolation=cv2.INTER_LINEAR)


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
