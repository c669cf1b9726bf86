"""`--engine ray` against `--engine local` on one machine (issue 14).

Each contender is a whole `camcli explain --jsonl` process over N images (the licensed
photos in samples/ and benchmarks/data/, copied to N files at 640x480); the driver's
records are timestamped as they arrive, so start-up (start to first record) and the cost
per image beyond it ((last - first) / (N - 1)) are measured apart, whatever Ray's start-up
varies by. Contenders interleaved round by round, best of the rounds. Ray will not win on
one small machine: the point is its start-up and its overhead per image (target <= 1.5x).

    python benchmarks/bench_ray.py [--images 200] [--rounds 3] [--workers 1]
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


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(start-up, seconds per image beyond it, total) of one run, from its --jsonl lines."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    stamps = [time.perf_counter() for _ in proc.stdout]
    if proc.wait() != 0 or len(stamps) < 2:
        raise SystemExit(f"{' '.join(command)} failed")
    end = time.perf_counter()
    return stamps[0] - start, (stamps[-1] - stamps[0]) / (len(stamps) - 1), end - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="Ray model actors")
    parser.add_argument("--method", default="gradcam")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_folder(root / "in", args.images)
        engines = {"local": [], "ray": ["--engine", "ray", "--workers", str(args.workers)]}
        best = {engine: (float("inf"),) * 3 for engine in engines}
        for _ in range(args.rounds):
            for engine, extra in engines.items():
                command = [sys.executable, "-m", "camcli", "explain", str(root / "in"), "-o", str(root / engine)]
                command += ["-m", args.method, "--overwrite", "--jsonl", *extra]
                got = timed(command, env)
                best[engine] = tuple(min(a, b) for a, b in zip(best[engine], got, strict=True))
    print(f"camcli explain -m {args.method} --jsonl, {args.images} JPEGs of 640x480, best of {args.rounds} rounds")
    print("| engine | start-up to first record (s) | per image beyond it (ms) | whole run (s) |")
    print("| --- | --- | --- | --- |")
    for engine, (startup, per_image, total) in best.items():
        print(f"| {engine} | {startup:.1f} | {per_image * 1000:.0f} | {total:.1f} |")
    ratio = best["ray"][1] / best["local"][1]
    print(f"ray / local per image beyond start-up: {ratio:.2f}x (target <= 1.5)")


if __name__ == "__main__":
    main()
