"""Names of choices that option help text lists, kept where importing costs nothing.

`camcli --help` must not import torch: a choice list that help shows and whose module
is heavy (metrics needs torch) is defined here and imported by that module.
"""

from __future__ import annotations

FUSIONS = ("mean", "product")  # how several layers' maps become one (`--fuse`, camcli.engine)
SMOOTHINGS = ("aug", "eigen")  # --smooth for CAM-family methods (camcli.engine)
SUBSTRATES = ("zero", "blur", "mean")  # what deletion puts in place of removed pixels (camcli.metrics)
COLORMAPS = {  # --colormap: name -> cv2's colormap constant (None: a plain grey ramp; camcli.render)
    "jet": "COLORMAP_JET",
    "turbo": "COLORMAP_TURBO",
    "viridis": "COLORMAP_VIRIDIS",
    "inferno": "COLORMAP_INFERNO",
    "magma": "COLORMAP_MAGMA",
    "plasma": "COLORMAP_PLASMA",
    "hot": "COLORMAP_HOT",
    "gray": None,
}
