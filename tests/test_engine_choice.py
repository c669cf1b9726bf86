"""`--engine ray` without Ray installed is one line saying how to install it, and a local
run never imports ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny_models:brightness", "--mean", "0,0,0", "--std", "1,1,1", "--input-size", "32"]
RUN = (
    "import sys\n"
    "if sys.argv[1] == 'hide': sys.modules['ray'] = None  # as if not installed: import ray fails\n"
    "sys.argv = ['camcli', 'explain', *sys.argv[2:]]\n"
    "from camcli.entry import main\n"
    "try:\n    main()\nexcept SystemExit as e:\n"
    "    print(e.code, 'ray' in sys.modules and sys.modules['ray'] is not None)\n"
)


def run(mode: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.run(
        [sys.executable, "-c", RUN, mode, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_engine_ray_without_ray_says_how_to_install(tmp_path: Path, samples_dir: Path) -> None:
    image = str(samples_dir / "skimage_chelsea.png")
    result = run("hide", image, "--engine", "ray", "-o", str(tmp_path / "out"), *TINY, cwd=tmp_path)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert result.stderr.strip().splitlines() == [
        "camcli: error: --engine ray needs Ray Data: pip install 'camcli[ray]'"
    ]
    assert not (tmp_path / "out").exists()


def test_a_local_run_never_imports_ray(tmp_path: Path, samples_dir: Path) -> None:
    image = str(samples_dir / "skimage_chelsea.png")
    result = run("keep", image, "-o", str(tmp_path / "out"), *TINY, cwd=tmp_path)
    assert result.stdout.split() == ["0", "False"], result.stderr
