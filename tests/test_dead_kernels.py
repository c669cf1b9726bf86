"""`camcli filters --kernels`: dead first-layer kernels (nearly zero, or without structure)."""

from __future__ import annotations

import json

import torch
from torch import nn
from typer.testing import CliRunner

from camcli.cli import app
from camcli.filters import UNIFORM_FRACTION, ZERO_FRACTION, dead_kernels, kernel_grid, kernels_report


def _stem() -> nn.Sequential:
    """Seven 5x5 kernels: 0-2 random, 3 zero, 4 a flat colour, 5 kernel 0 / 100, 6 flat plus some structure."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 7, 5)
    with torch.no_grad():
        conv.weight[3] = 0.0
        conv.weight[4] = torch.tensor([0.3, -0.2, 0.1])[:, None, None]
        conv.weight[5] = conv.weight[0] / 100
        conv.weight[6] = conv.weight[4] + 0.05 * torch.randn(3, 5, 5)
    return nn.Sequential(conv, nn.ReLU(), nn.Conv2d(7, 4, 3))


def test_dead_kernels_by_hand() -> None:
    model = _stem()
    kernels = dead_kernels(model[0].weight)
    assert [k["dead"] for k in kernels] == [None, None, None, "zero", "uniform", "zero", None]
    assert kernels[4]["structure"] < 1e-6 and kernels[6]["structure"] > UNIFORM_FRACTION
    median = torch.stack([model[0].weight[c].detach().norm() for c in range(7)]).median()
    assert kernels[5]["norm"] < ZERO_FRACTION * float(median) < kernels[0]["norm"]
    report = kernels_report(model)
    assert report["layer"] == "0" and report["dead"] == [3, 4, 5] and report["shape"] == [7, 3, 5, 5]
    grid = kernel_grid(model, report["dead"])
    # 3 columns of 35 px tiles (5 px x 7) with 2 px gaps: dead tile 3 (row 1, column 0) is framed in red
    assert tuple(grid[2 + 37, 2]) == (255, 0, 0) and tuple(grid[2 + 37 + 17, 2]) == (255, 0, 0)
    assert tuple(grid[2, 2]) != (255, 0, 0)  # tile 0 is alive


def test_filters_kernels_json(tmp_path) -> None:
    result = CliRunner().invoke(app, ["filters", "resnet18", "--weights", "none", "--kernels", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "resnet18.kernels.json").read_text())
    assert report["layer"] == "conv1" and len(report["kernels"]) == 64 and "median" in report["thresholds"]["zero"]
    assert report["dead"] == [k["index"] for k in report["kernels"] if k["dead"]]
