"""`camcli channels`: top units per channel over a folder, receptive fields, projections."""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from tiny_models import Patterns
from torch import nn
from typer.testing import CliRunner

from camcli.channels import ChannelsOptions, ChannelsRun, TopUnits, parse_channels, project_units, receptive_fields
from camcli.cli import app
from camcli.errors import UsageError
from camcli.io import collect_inputs
from camcli.models import InputSpec, LoadedModel, resolve_layer

CPU = torch.device("cpu")
SPEC = InputSpec(32, (0.0,) * 3, (1.0,) * 3)
TINY = ["--model", "tiny_models:patterns", "--mean", "0,0,0", "--std", "1,1,1", "--input-size", "32"]

# (file, colour plane, centre y, centre x, height 0-255): the plus marks placed in the folder
MARKS = [
    ("a.png", 0, 5, 9, 120),
    ("b.png", 0, 20, 13, 240),
    ("c.png", 1, 11, 26, 200),
    ("d.png", 0, 27, 4, 180),
    ("e.png", 1, 6, 6, 90),
    ("f.png", 2, 16, 16, 60),
]


def _write_folder(folder: Path, blanks: int = 3) -> None:
    """32 x 32 PNGs on a uniform grey of 40: one plus mark each, and `blanks` with none."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, plane, cy, cx, height in MARKS:
        image = np.full((32, 32, 3), 40, dtype=np.uint8)
        for dy, dx in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)):
            image[cy + dy, cx + dx, plane] += height - 40
        cv2.imwrite(str(folder / name), image[:, :, ::-1])  # RGB -> BGR for cv2
    for n in range(blanks):
        cv2.imwrite(str(folder / f"z{n}.png"), np.full((32, 32, 3), 40, dtype=np.uint8))


def test_channels_finds_the_marks_in_order(tmp_path: Path) -> None:
    _write_folder(tmp_path / "in")
    result = CliRunner().invoke(
        app,
        ["channels", str(tmp_path / "in"), *TINY, "--layer", "pool", "--channels", "0,1", "--top", "3"]
        + ["-o", str(tmp_path / "out"), "-b", "4", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    zero = json.loads((out / "tiny_models_patterns.pool.c0.json").read_text())
    found = [(Path(t["image"]).name, t["location"]["y"], t["location"]["x"]) for t in zero["top"]]
    # red marks by height: b (240), d (180), a (120); the conv (no padding) puts the centre
    # (y, x) at (y - 1, x - 1), the pool at ((y - 1) // 2, (x - 1) // 2)
    assert found == [("b.png", 9, 6), ("d.png", 13, 1), ("a.png", 2, 4)]
    values = [t["value"] for t in zero["top"]]
    expected = [5 * (h - 40) / 255 - 0.05 for h in (240, 180, 120)]  # the kernel sums to 0 on the grey
    np.testing.assert_allclose(values, expected, rtol=1e-5)
    one = json.loads((out / "tiny_models_patterns.pool.c1.json").read_text())
    assert [Path(t["image"]).name for t in one["top"]][:2] == ["c.png", "e.png"]
    assert one["top"][2]["value"] == 0.0  # only two green marks: the third slot holds a silent unit
    # the box is the pooled unit's field: pool 2 over a 3x3 conv -> 4 x 4 pixels
    x0, y0, x1, y1 = zero["top"][0]["box"]
    assert (x1 - x0, y1 - y0) == (4, 4) and x0 <= 13 < x1 and y0 <= 20 < y1
    assert zero["warning"] is None and zero["grid"] == "tiny_models_patterns.pool.c0.png"
    grid = cv2.imread(str(out / zero["grid"]))
    assert grid is not None and grid.shape[0] > 2 * 96
    assert (out / "tiny_models_patterns.pool.channels.png").is_file()
    again = CliRunner().invoke(
        app,
        ["channels", str(tmp_path / "in"), *TINY, "--layer", "pool", "--channels", "0,1", "--top", "3"]
        + ["-o", str(out), "--device", "cpu"],
    )
    assert again.exit_code == 0 and "already done" in again.output


def test_top_units_keeps_channels_times_top() -> None:
    table = TopUnits(2, 3, CPU)
    for first in range(0, 40, 8):
        acts = torch.zeros(8, 2, 4, 4)
        ids = torch.arange(first, first + 8)
        acts[:, 0, 1, 2] = ids.float()  # channel 0: later images stronger
        acts[:, 1, 3, 0] = 1.0  # channel 1: all equal, the earliest win
        table.update(acts, ids)
        assert table.values.shape == (2, 3) and table.images.shape == (2, 3)
    assert table.images[0].tolist() == [39, 38, 37] and table.locations[0].tolist() == [6, 6, 6]
    assert table.images[1].tolist() == [0, 1, 2] and table.locations[1].tolist() == [12, 12, 12]


def test_receptive_field_of_a_known_stack() -> None:
    stack = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1),
    )
    # by hand, at input 32 (32 -> 32 -> 16 -> 8 -> 8): unit (3, 3) of the last conv reads pool
    # 2..4 -> conv2 4..9 -> conv1 (stride 2, pad 1) 7..19 -> input 6..20: box [6, 21).
    # Unit (0, 0): pool 0..1 -> conv2 0..3 -> conv1 0..7 -> input 0..8: box [0, 9).
    # Unit (7, 5): pool 6..7, 4..6 -> conv2 12..15, 8..13 -> conv1 23..31, 15..27 -> input 22..31, 14..28.
    units = torch.tensor([[0, 3, 3], [4, 0, 0], [2, 7, 5]])
    boxes, max_pools = receptive_fields(stack, stack[6], units, 32)
    assert boxes.tolist() == [[6, 6, 21, 21], [0, 0, 9, 9], [14, 22, 29, 32]]
    assert max_pools == 1
    assert all(p.requires_grad for p in stack.parameters()) and stack.training


def _captum_projection(model: nn.Module, layer: nn.Module, inputs: torch.Tensor, units: torch.Tensor, kind: str):
    """The same units' guided backprop / deconvnet by captum: the model cut at `layer`, the
    unit's channel flattened into outputs, each sample's own unit as its target."""
    captum_attr = pytest.importorskip("captum.attr")
    channel = int(units[0, 0])

    class Unit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            store = {}
            handle = layer.register_forward_hook(lambda _m, _i, out: store.setdefault("a", out))
            try:
                self.body(x)
            finally:
                handle.remove()
            return store["a"][:, channel].flatten(1)

    wrapped = Unit().eval()
    with torch.no_grad():
        width = model_layer_width(model, layer, inputs)
    targets = (units[:, 1] * width + units[:, 2]).tolist()
    method = captum_attr.GuidedBackprop if kind == "guided-backprop" else captum_attr.Deconvolution
    return method(wrapped).attribute(inputs.clone(), target=targets)


def model_layer_width(model: nn.Module, layer: nn.Module, inputs: torch.Tensor) -> int:
    store = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: store.setdefault("a", out))
    try:
        model(inputs)
    finally:
        handle.remove()
    return int(store["a"].shape[-1])


@pytest.mark.parametrize("kind", ["guided-backprop", "deconvnet"])
def test_projections_match_captum(kind: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    ).eval()
    inputs = torch.randn(3, 3, 16, 16)
    units = torch.tensor([[2, 1, 5], [2, 6, 0], [2, 3, 3]])
    ours = project_units(model, model[5], inputs, units, kind)
    copied = copy.deepcopy(model)
    reference = _captum_projection(copied, copied[5], inputs, units, kind)
    assert ours.abs().amax() > 0
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)


def test_parse_channels() -> None:
    assert parse_channels("0-3,7,2", 10) == (0, 1, 2, 3, 7)
    assert parse_channels("all", 3) == (0, 1, 2)
    for bad in ("0-20", "x", "5-2", ""):
        with pytest.raises(UsageError):
            parse_channels(bad, 10)


def test_interrupted_pass_resumes(tmp_path: Path) -> None:
    """A Ctrl-C during the pass checkpoints the table; the next run continues from there and
    ends with the table of an uninterrupted run."""
    _write_folder(tmp_path / "in", blanks=6)
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")
    items = collect_inputs([str(tmp_path / "in")])
    assert [i.path.name for i in items].index("broken.png") < 4  # in the first batch of 2

    def loaded() -> LoadedModel:
        return LoadedModel(Patterns(), "patterns", None, SPEC, None)

    def run(out: Path, interrupt: bool) -> tuple[ChannelsRun, object]:
        model = loaded()
        info = resolve_layer(model.model, "pool", SPEC, CPU)
        options = ChannelsOptions(out, (0, 1, 2), top=2, batch_size=2, workers=1, checkpoint_every=1)
        channels = ChannelsRun(model, info, CPU, options)

        def report(line: str) -> None:
            if interrupt and "broken.png" in line:
                os.kill(os.getpid(), signal.SIGINT)

        return channels, channels.run(items, report)

    _, first = run(tmp_path / "out", interrupt=True)
    assert first.interrupted and first.failed == 1
    state = json.loads((tmp_path / "out" / "patterns.pool.channels-state.json").read_text())
    assert 0 < state["done"] < len(items)
    _, resumed = run(tmp_path / "out", interrupt=False)
    assert not resumed.interrupted and resumed.failed == 1 and resumed.images == len(items) - 1
    _, plain = run(tmp_path / "plain", interrupt=False)
    for channel in (0, 1, 2):
        a = json.loads((tmp_path / "out" / f"patterns.pool.c{channel}.json").read_text())
        b = json.loads((tmp_path / "plain" / f"patterns.pool.c{channel}.json").read_text())
        assert a["top"] == b["top"]


def test_deconvnet_without_max_pooling_warns(tmp_path: Path) -> None:
    _write_folder(tmp_path / "in", blanks=0)
    result = CliRunner().invoke(
        app,
        ["channels", str(tmp_path / "in"), *TINY, "--layer", "relu", "--channels", "0", "--top", "2"]
        + ["--projection", "deconvnet", "-o", str(tmp_path / "out"), "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    assert "does not depend on the image" in result.output
    record = json.loads((tmp_path / "out" / "tiny_models_patterns.relu.c0.json").read_text())
    assert "max pooling" in record["warning"]
