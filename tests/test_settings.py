"""Settings belong to the method: declared on the class, offered by `--set METHOD.NAME=VALUE`
(and the older option names), listed by `camcli methods METHOD`, recorded in the request."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from camcli.errors import UsageError
from camcli.methods import base, cli_settings, get_method, method_classes, parse_methods
from camcli.methods.base import Setting
from camcli.models import InputSpec


@pytest.mark.parametrize("cls", method_classes(), ids=lambda c: c.name)
def test_every_setting_is_a_constructor_keyword_with_its_default(cls) -> None:
    parameters = inspect.signature(cls.__init__).parameters
    for setting in cls.settings:
        assert isinstance(setting, Setting)
        assert setting.name in parameters, (cls.name, setting.name)
        assert parameters[setting.name].default == setting.default, (cls.name, setting.name)
        assert setting.help and setting.name.isidentifier()
    get_method(cls.name, {f"{cls.name}.{s.name}": s.default for s in cls.settings})


def test_text_is_parsed_and_validated_by_the_method() -> None:
    method = get_method("smoothgrad", {"smoothgrad.samples": "3", "smoothgrad.noise": "0.2"})
    assert (method.samples, method.noise) == (3, 0.2)
    with pytest.raises(UsageError, match=r"^smoothgrad.samples \(--samples\) must be at least 1, not 0$"):
        get_method("smoothgrad", {"smoothgrad.samples": "0"})
    with pytest.raises(UsageError, match="smoothgrad.samples .* expects an integer, not 'many'"):
        get_method("smoothgrad", {"smoothgrad.samples": "many"})


def test_a_colour_is_converted_once_the_input_normalisation_is_known() -> None:
    spec = InputSpec(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert get_method("occlusion", {"occlusion.fill": "255,0,127.5"}, spec).fill == (1.0, -1.0, 0.0)
    assert get_method("occlusion", {"occlusion.fill": "255,0,127.5"}).fill == "mean"  # checked, not yet applied
    assert get_method("occlusion", {"occlusion.fill": "BLUR"}).fill == "blur"
    with pytest.raises(UsageError, match="occlusion.fill"):
        get_method("occlusion", {"occlusion.fill": "300,0,0"})


def test_cli_settings_from_set_and_older_options() -> None:
    names = ["smoothgrad", "occlusion"]
    chosen = cli_settings(names, ["occlusion.patch=8"], {"--samples": 3, "--patch": None})
    assert chosen == {"smoothgrad.samples": 3, "occlusion.patch": "8"}
    methods = parse_methods("smoothgrad,occlusion", chosen)
    assert methods[0].samples == 3 and methods[1].patch == 8
    assert cli_settings(["gradcam"], [], {"--samples": 3}) == {}  # an older option for a method not asked for


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("smoothgrad.sample=3", "smoothgrad has no setting 'sample' \\(did you mean samples\\?\\)"),
        ("samples=3", "--set expects METHOD.NAME=VALUE"),
        ("smoothgrad.samples", "--set expects METHOD.NAME=VALUE"),
        ("occlusion.patch=8", "occlusion is not among the methods asked for"),
        ("smoothgrd.samples=3", "unknown method 'smoothgrd'"),
    ],
)
def test_bad_set_items_are_one_line(item: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        cli_settings(["smoothgrad"], [item], {})


def test_settings_metadata_imports_no_torch() -> None:
    """base.py (Setting, the bases) imports torch only for type checking (the method
    modules import it inside their functions, so `camcli methods` can stay torch-free)."""
    tree = ast.parse(Path(base.__file__).read_text())
    top = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    modules = [alias.name for node in top if isinstance(node, ast.Import) for alias in node.names]
    modules += [node.module or "" for node in top if isinstance(node, ast.ImportFrom)]
    assert not [m for m in modules if m.split(".")[0] in ("torch", "numpy", "torchvision", "cv2")]


def test_cli_set_reaches_the_request_and_methods_lists_settings(tmp_path, samples_dir) -> None:
    base = [sys.executable, "-m", "camcli"]
    shown = subprocess.run([*base, "methods", "smoothgrad"], capture_output=True, text=True, check=True).stdout
    assert "smoothgrad.samples" in shown and "25" in shown and "--samples" in shown
    rows = json.loads(subprocess.run([*base, "methods", "--json"], capture_output=True, text=True, check=True).stdout)
    assert {s["name"] for s in next(r for r in rows if r["name"] == "occlusion")["settings"]} == {
        "patch",
        "stride",
        "fill",
        "occlusion_target",
    }
    image = str(samples_dir / "skimage_chelsea.png")
    args = [*base, "explain", image, "-o", str(tmp_path), "-q", "--model", "resnet18", "--weights", "none"]
    args += ["--input-size", "32", "-m", "smoothgrad", "--set", "smoothgrad.samples=2"]
    subprocess.run(args, check=True, capture_output=True)
    record = json.loads((tmp_path / "skimage_chelsea.png.json").read_text())
    assert record["request"]["method_options"] == {"smoothgrad.samples": "2"}
    bad = subprocess.run([*args[:-1], "smoothgrad.samples=0"], capture_output=True, text=True)
    assert bad.returncode == 2
    expected = "camcli: error: smoothgrad.samples (--samples) must be at least 1, not 0"
    assert bad.stderr.strip().splitlines() == [expected]
