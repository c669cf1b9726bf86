"""`--engine ray` against `--engine local` on one machine (issue 14).

Each contender is a whole `camcli explain` process over N images (the licensed photos
in samples/ and benchmarks/data/, copied to N files and resized to 640x480), run at two
sizes so start-up and the cost per image separate: per image = (t(N) - t(n)) / (N - n).
Contenders interleaved round by round, best of the rounds. Ray will not win on one
small machine: the point is its start-up and its overhead per image (target <= 1.5x).

    python benchmarks/bench_ray.py [--images 200] [--small 40] [--rounds 2] [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = sorted([*(ROOT / "samples").glob("*.png"), *(ROOT / "benchmarks" / "data").glob("*.*")])


def make_folder(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    pictures = [cv2.resize(cv2.imread(str(p)), (640, 480)) for p in PHOTOS if p.suffix in (".png", ".jpg")]
    for n in range(count):
        cv2.imwrite(str(folder / f"{n:04d}.jpg"), pictures[n % len(pictures)], [cv2.IMWRITE_JPEG_QUALITY, 90])


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--small", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="Ray model actors")
    parser.add_argument("--method", default="gradcam")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = {args.small: root / "small", args.images: root / "large"}
        for count, folder in folders.items():
            make_folder(folder, count)
        engines = {"local": [], "ray": ["--engine", "ray", "--workers", str(args.workers)]}
        best = {(engine, count): float("inf") for engine in engines for count in folders}
        for _ in range(args.rounds):
            for count, folder in folders.items():
                for engine, extra in engines.items():
                    out = root / f"out-{engine}-{count}"
                    command = [sys.executable, "-m", "camcli", "explain", str(folder), "-o", str(out), "-q"]
                    command += ["-m", args.method, "--overwrite", *extra]
                    best[engine, count] = min(best[engine, count], timed(command, env))
    print(f"camcli explain -m {args.method}, 640x480 JPEGs, best of {args.rounds} rounds, interleaved")
    print(f"| engine | {args.small} images (s) | {args.images} images (s) | per image (ms) | start-up (s) |")
    print("| --- | --- | --- | --- | --- |")
    per_image = {}
    for engine in engines:
        small, large = best[engine, args.small], best[engine, args.images]
        per_image[engine] = (large - small) / (args.images - args.small)
        startup = small - per_image[engine] * args.small
        print(f"| {engine} | {small:.1f} | {large:.1f} | {per_image[engine] * 1000:.0f} | {startup:.1f} |")
    print(f"ray / local per image beyond start-up: {per_image['ray'] / per_image['local']:.2f}x (target <= 1.5)")


if __name__ == "__main__":
    main()
