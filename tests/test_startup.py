"""Start-up: light commands import no torch, torchvision, cv2 or numpy; the default model needs
no torchvision; Ctrl-C during start-up is one line and exit 130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "cv2", "numpy")

# Runs camcli in-process in a fresh interpreter, then prints which heavy modules it imported.
_PROBE = """
import json, os, sys
sys.argv = ["camcli", *json.loads(sys.argv[1])]
from camcli.entry import main
try:
    main()
except SystemExit:
    pass
os.write(3, json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)).encode())
"""


def _imported(args: list[str], env: dict[str, str] | None = None, tmp: Path | None = None) -> list[str]:
    read, write = os.pipe()
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    code = _PROBE.format(heavy=HEAVY)
    proc = subprocess.run(
        [sys.executable, "-c", code.replace("os.write(3,", f"os.write({write},"), json.dumps(args)],
        env=environ,
        pass_fds=(write,),
        capture_output=True,
        cwd=tmp or ROOT,
        timeout=120,
    )
    os.close(write)
    with os.fdopen(read) as handle:
        report = handle.read()
    assert report, proc.stderr.decode()
    return json.loads(report)


@pytest.mark.parametrize(
    "args",
    [["--help"], ["explain", "--help"], ["methods"], ["methods", "--json"], ["schema"], ["compare", "--help"]],
)
def test_light_commands_import_no_torch(args: list[str]) -> None:
    assert _imported(args) == []


def test_tab_completion_imports_no_torch() -> None:
    env = {"_CAMCLI_COMPLETE": "complete_bash", "COMP_WORDS": "camcli explain -m gradc", "COMP_CWORD": "3"}
    assert _imported([], env) == []


def test_explain_with_the_default_model_imports_no_torchvision(tmp_path: Path) -> None:
    image = ROOT / "samples" / "skimage_chelsea.png"
    imported = _imported(["explain", str(image), "-o", str(tmp_path / "out"), "-q"], tmp=tmp_path)
    assert "torch" in imported and "torchvision" not in imported
    record = json.loads((tmp_path / "out" / "skimage_chelsea.png.json").read_text())
    assert record["predictions"][0]["label"] and record["versions"]["torchvision"]


def test_the_shipped_class_names_are_torchvisions() -> None:
    torchvision = pytest.importorskip("torchvision")
    from camcli.models import imagenet_categories

    expected = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    assert imagenet_categories() == list(expected)


def test_ctrl_c_during_start_up_is_one_line_and_130(tmp_path: Path) -> None:
    image = ROOT / "samples" / "skimage_chelsea.png"
    proc = subprocess.Popen(  # -X importtime: a line per finished import, so we know when we are in torch's
        [sys.executable, "-X", "importtime", "-m", "camcli", "explain", str(image), "-o", str(tmp_path / "out")],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # (a run that never imports torch would end the loop: then rc 0 fails below)
        if line.split("|")[-1].strip() == "torch._C":  # torch's extension is in, torch/__init__ still running
            break
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, err
    assert [line for line in err.splitlines() if not line.startswith("import time:")] == ["camcli: interrupted"]
    assert not (tmp_path / "out").exists()
