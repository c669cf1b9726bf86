"""`camcli channels`: its cost against a plain forward pass, and its memory from 100 to 2,000 images.

    python benchmarks/bench_channels.py            # ~5 min on 2 CPU cores
    python benchmarks/bench_channels.py --quick    # a smoke run

1. the streaming pass, model side: per batch of 8 (224 px, efficientnet_lite0), the pass's
   step (forward up to the layer, the chosen channels, the top-k merge) / a plain forward of
   the whole model, for a middle layer and for the last feature map (the worst case: almost
   the whole forward); both in the same memory format (channels_last, as camcli runs);
2. the whole command per image beyond start-up ((T(large) - T(small)) / (large - small) images,
   decoding included) against a plain loop that decodes, preprocesses and runs the full model
   over the same folder in batches of 8;
3. peak RSS of `camcli channels` over 100 and 2,000 generated images (the table it keeps is
   channels x top, whatever the folder).

Contenders run interleaved, round after round, each keeping its best time (the machine is
shared and noisy).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import best_times, header, make_folder, peak_rss_mib, row  # noqa: E402

from camcli.channels import TopUnits  # noqa: E402
from camcli.engine import frozen, layer_output  # noqa: E402
from camcli.models import load_model, resolve_layer  # noqa: E402

CPU = torch.device("cpu")
BATCH = 8
MIDDLE = "_blocks.8"

PLAIN_LOOP = textwrap.dedent(
    """
    # A plain forward over a folder: decode, preprocess as camcli does, full model, batches of 8.
    import sys
    from pathlib import Path
    import torch
    from camcli.io import decode_image
    from camcli.models import load_model
    from camcli.run.stages import preprocess
    loaded = load_model("efficientnet_lite0")
    model = loaded.model.eval().to(memory_format=torch.channels_last)
    paths = sorted(Path(sys.argv[1]).glob("*.jpg"))
    with torch.inference_mode():
        for start in range(0, len(paths), 8):
            x = torch.stack([preprocess(decode_image(p), loaded.input) for p in paths[start:start + 8]])
            model(x.contiguous(memory_format=torch.channels_last))
    """
)


def model_side(rounds: int) -> None:
    print(f"\n## 1. Streaming pass, model side (batch {BATCH}, 224 px, efficientnet_lite0, channels 0-15, top 9)\n")
    loaded = load_model("efficientnet_lite0")
    model = loaded.model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(BATCH, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    ids = torch.arange(BATCH)
    chosen = torch.arange(16)

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    contenders = {"plain forward (whole model)": forward}
    for name in (MIDDLE, "auto"):
        info = resolve_layer(model, name, loaded.input, CPU)
        module = dict(model.named_modules())[info.name]
        table = TopUnits(16, 9, CPU)

        def step(module: torch.nn.Module = module, table: TopUnits = table) -> None:
            with frozen(model), torch.inference_mode():
                acts = layer_output(model, module, x).index_select(1, chosen)
                acts.flatten(1).isfinite().all(1).tolist()
                table.update(acts, ids)

        contenders[f"channels pass step, --layer {info.name}"] = step
    best = best_times(contenders, rounds)
    plain = best["plain forward (whole model)"]
    print(header("contender", "ms/batch", "x plain forward"))
    for label, seconds in best.items():
        print(row(label, f"{seconds * 1e3:.1f}", f"{seconds / plain:.2f}"))


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def channels_command(folder: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "camcli", "channels", str(folder), "-o", str(out), "-q", "--device", "cpu", *extra]


def end_to_end(rounds: int, small: int, large: int) -> None:
    print(f"\n## 2. Whole command, per image beyond start-up ({large} - {small} images, 320x240 JPEG)\n")
    work = Path(tempfile.mkdtemp(prefix="camcli-bench-channels-"))
    try:
        for count in (small, large):
            make_folder(work / f"in{count}", count, 320, 240)
        loop = work / "plain_loop.py"
        loop.write_text(PLAIN_LOOP)
        runs = {
            "plain loop: decode + full forward": lambda n: [sys.executable, str(loop), str(work / f"in{n}")],
            f"camcli channels --layer {MIDDLE} (0-15, top 9)": lambda n: channels_command(
                work / f"in{n}", work / f"out-mid-{n}", "--layer", MIDDLE, "--overwrite"
            ),
            "camcli channels --layer auto (0-15, top 9)": lambda n: channels_command(
                work / f"in{n}", work / f"out-auto-{n}", "--overwrite"
            ),
        }
        best = {(label, n): float("inf") for label in runs for n in (small, large)}
        for _ in range(rounds):
            for label, n in best:
                best[label, n] = min(best[label, n], timed(runs[label](n)))
        per_image = {label: (best[label, large] - best[label, small]) / (large - small) for label in runs}
        plain = per_image["plain loop: decode + full forward"]
        print(header("contender", "ms/image", "x plain loop", f"whole run, {large} images (s)"))
        for label, seconds in per_image.items():
            print(row(label, f"{seconds * 1e3:.1f}", f"{seconds / plain:.2f}", f"{best[label, large]:.1f}"))
        print("\nthe projections (16 channels x 9 units, one batched backward per channel) are in the start-up part")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def peak_memory(small: int, large: int) -> None:
    print(f"\n## 3. Peak RSS of `camcli channels` ({small} vs {large} images, 160x120 JPEG, --layer {MIDDLE})\n")
    work = Path(tempfile.mkdtemp(prefix="camcli-bench-channels-"))
    try:
        peaks = {}
        for count in (small, large):
            make_folder(work / f"in{count}", count, 160, 120)
            command = channels_command(work / f"in{count}", work / f"out{count}", "--layer", MIDDLE)
            peaks[count] = peak_rss_mib(command)
        print(header("images", "peak MiB"))
        for count, mib in peaks.items():
            print(row(count, f"{mib:.0f}"))
        print(f"\n{large} / {small}: {peaks[large] / peaks[small]:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="1,2,3", help="comma list of 1-3")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and images (a smoke run)")
    args = parser.parse_args()
    sections = {int(s) for s in args.sections.split(",")}
    print("# camcli channels benchmarks\n")
    print(
        f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    print(f"command: python benchmarks/bench_channels.py {' '.join(sys.argv[1:])}".rstrip())
    if 1 in sections:
        model_side(3 if args.quick else 10)
    if 2 in sections:
        end_to_end(1 if args.quick else 3, 16, 48 if args.quick else 96)
    if 3 in sections:
        peak_memory(20 if args.quick else 100, 200 if args.quick else 2000)


if __name__ == "__main__":
    main()
