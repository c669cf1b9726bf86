"""Start-up time of camcli commands as a ratio of `python -c "import torch"`.

Every contender runs as a fresh process, interleaved round by round (so machine load
hits all alike); the best of the rounds counts. Targets (issue 13): `--help`,
`explain --help`, `methods`, `schema` and a TAB of shell completion <= 0.2x;
`explain one.jpg` with the default model <= 1.6x.

    python benchmarks/startup.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "samples" / "skimage_chelsea.png"


# What bash asks for when TAB is pressed after `camcli explain -m gradc`
COMPLETION = {"_CAMCLI_COMPLETE": "complete_bash", "COMP_WORDS": "camcli explain -m gradc", "COMP_CWORD": "3"}


def contenders(out: str) -> dict[str, list[str]]:
    camcli = [sys.executable, "-m", "camcli"]
    return {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "camcli --help": [*camcli, "--help"],
        "camcli explain --help": [*camcli, "explain", "--help"],
        "camcli methods": [*camcli, "methods"],
        "camcli schema": [*camcli, "schema"],
        "camcli explain -m gradc<TAB>": [sys.executable, "-c", "from camcli.cli import app; app(prog_name='camcli')"],
        "camcli explain one.jpg": [*camcli, "explain", str(IMAGE), "-o", out, "-q", "--overwrite"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as out:
        runs = contenders(out)
        best = {name: float("inf") for name in runs}
        for _ in range(args.rounds):
            for name, command in runs.items():
                extra = COMPLETION if name.endswith("<TAB>") else {}
                start = time.perf_counter()
                subprocess.run(command, env={**env, **extra}, check=True, capture_output=True)
                best[name] = min(best[name], time.perf_counter() - start)
    base = best['python -c "import torch"']
    print(f"best of {args.rounds} rounds, interleaved; ratio to import torch ({base:.2f} s)")
    for name, seconds in best.items():
        print(f"{name:<30} {seconds:6.2f} s  {seconds / base:5.2f}x")


if __name__ == "__main__":
    main()
