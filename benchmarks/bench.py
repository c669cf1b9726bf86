"""camcli's speed and memory against the physical limit of each method and against
pytorch-grad-cam, measured in one run on one machine (ratios; absolute times for context).

    python benchmarks/bench.py                 # all five sections, ~10 min on 2 CPU cores
    python benchmarks/bench.py --sections 1,2  # a subset
    python benchmarks/bench.py --quick         # fewer repeats and images, a smoke run

1. gradient methods: camcli batch time / forward-only time (inference_mode, default memory
   format), efficientnet_lite0 and resnet50, batch 8, 224 px;
2. Score-CAM on Lite0: camcli per image / ((1 + K non-constant channels) x one forward at the
   best batch), and camcli vs pytorch-grad-cam's ScoreCAM with the Pearson of their maps;
3. a folder end to end (`camcli explain DIR -m gradcam --model resnet50 --weights none`),
   per image beyond start-up, against forward-only and a plain pytorch-grad-cam loop;
4. peak RSS of `camcli explain` on 100 vs 1,000 images;
5. `--layer fine` (the auto layer fused with the last stage at twice its resolution) on
   Lite0, batch 8, 224 px: its batch time / the single auto layer's, beside forward-only.

The machine is shared and noisy: contenders run interleaved, round after round, and each
keeps its best time, so a burst of load slows one round, not one contender. pytorch-grad-cam
is optional (`pip install -e '.[bench]'`); without it its columns say so.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from camcli.engine import Explainer, TargetSpec  # noqa: E402
from camcli.io import decode_image  # noqa: E402
from camcli.methods import parse_methods  # noqa: E402
from camcli.methods.scorecam import ScoreCAM  # noqa: E402
from camcli.models import load_model, resolve_layer, resolve_layers  # noqa: E402
from camcli.run.stages import preprocess  # noqa: E402

CPU = torch.device("cpu")
BATCH = 8
SIZE = 224

try:
    import pytorch_grad_cam
except ImportError:  # the optional anchors
    pytorch_grad_cam = None
try:
    import torchcam.methods as torchcam_methods
except ImportError:
    torchcam_methods = None


def anchor_version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def best_times(contenders: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best wall time of each contender over `rounds` interleaved rounds (one warm-up)."""
    for run in contenders.values():
        run()
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(rounds):
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel())[0, 1])


def row(*cells: object) -> str:
    """A Markdown table row, so that the output pastes into benchmarks/RESULTS.md as it is."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def header(*cells: str) -> str:
    return row(*cells) + "\n" + row(*("---" for _ in cells))


# --- 1 ----------------------------------------------------------------------------------------


def gradient_methods(rounds: int) -> None:
    print("\n## 1. Gradient methods: batch time / forward-only time (batch 8, 224 px)\n")
    sets = ["cam", "gradcam", "gradcam++", "cam,gradcam,gradcam++", "guided-backprop", "guided-gradcam"]
    for name, weights in (("efficientnet_lite0", None), ("resnet50", "none")):
        torch.manual_seed(0)
        loaded = load_model(name, weights)
        plain = loaded.model.eval()
        layer = resolve_layer(plain, "auto", loaded.input, CPU)
        x = torch.randn(BATCH, 3, SIZE, SIZE)

        def forward(model: torch.nn.Module = plain, x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                model(x)

        contenders: dict[str, Callable[[], object]] = {"forward (inference_mode)": forward}
        for spec in sets:
            explainer = Explainer(copy.deepcopy(plain), layer, parse_methods(spec))
            contenders[spec] = lambda e=explainer, x=x: e.explain(x, TargetSpec())
        separate = Explainer(copy.deepcopy(plain), layer, parse_methods("guided-gradcam"))
        separate._shared_guided = lambda: None  # type: ignore[method-assign]  # the CAM and guided forwards apart
        contenders["guided-gradcam, two forwards"] = lambda e=separate, x=x: e.explain(x, TargetSpec())
        if pytorch_grad_cam is not None:
            anchor_model = copy.deepcopy(plain)
            anchor = pytorch_grad_cam.GradCAM(anchor_model, [dict(anchor_model.named_modules())[layer.name]])
            contenders["pytorch-grad-cam GradCAM"] = lambda a=anchor, x=x: a(input_tensor=x, targets=None)
        if torchcam_methods is not None:
            torchcam_model = copy.deepcopy(plain)
            extractor = torchcam_methods.GradCAM(torchcam_model, target_layer=layer.name)  # hooks stay on

            def torchcam_gradcam(net: torch.nn.Module = torchcam_model, x: torch.Tensor = x, cam=extractor) -> None:
                scores = net(x)
                cam(scores.argmax(1).tolist(), scores)

            contenders["torchcam GradCAM"] = torchcam_gradcam
        times = best_times(contenders, rounds)
        base = times["forward (inference_mode)"]
        print(f"### {name} (layer {layer.name})\n")
        print(header("contender", "ms/batch", "x forward"))
        for label, seconds in times.items():
            print(row(label, f"{seconds * 1e3:.0f}", f"{seconds / base:.2f}"))
        all3, gradcam = times["cam,gradcam,gradcam++"], times["gradcam"]
        print(f"\nall three / gradcam alone: {all3 / gradcam:.2f}")
        if pytorch_grad_cam is None:
            print("pytorch-grad-cam: not installed (pip install -e '.[bench]')")
        print()


# --- 2 ----------------------------------------------------------------------------------------


def sample_batch(paths: list[Path], spec) -> torch.Tensor:
    return torch.stack([preprocess(decode_image(p), spec) for p in paths])


def scorecam(rounds: int, images: int) -> None:
    print("\n## 2. Score-CAM on efficientnet_lite0 (embedded weights, samples/, 224 px)\n")
    loaded = load_model("efficientnet_lite0", None)
    model = loaded.model.eval()
    layer = resolve_layer(model, "auto", loaded.input, CPU)
    paths = sorted((ROOT / "samples").glob("*.png"))[:images]
    x = sample_batch(paths, loaded.input)
    explainer = Explainer(copy.deepcopy(model), layer, parse_methods("scorecam"), chunk_size=32)
    modules = dict(explainer.model.named_modules())
    with torch.inference_mode():
        acts = {}
        handle = modules[layer.name].register_forward_hook(lambda _m, _i, out: acts.setdefault("a", out))
        try:
            explainer._forward(x)
        finally:
            handle.remove()
    flat = acts["a"].flatten(2)
    live = (flat.amax(-1) > flat.amin(-1)).sum(1)  # K per image
    k_mean = float(live.float().mean())

    # The limit: one forward per (1 + K) inputs at the best batch size and layout.
    limit_times = {}
    for layout, net in (("default", model), ("channels_last", explainer.model)):
        for batch in (16, 32, 64):
            xb = torch.randn(batch, 3, SIZE, SIZE).contiguous(
                memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
            )

            def forward(net: torch.nn.Module = net, xb: torch.Tensor = xb) -> None:
                with torch.inference_mode():
                    net(xb)

            limit_times[f"{layout} @ {batch}"] = forward
    result = {}

    def ours() -> None:
        result["maps"] = explainer.explain(x, TargetSpec()).explanations[0]

    # Interleaved with the limit's forwards, so a burst of load cannot favour either.
    times = best_times({**limit_times, "camcli": ours}, max(1, rounds // 2))
    ours_time = times.pop("camcli") / len(paths)
    per_input = {k: v / int(k.split("@")[1]) for k, v in times.items()}
    best_key = min(per_input, key=per_input.get)
    one_forward = per_input[best_key]
    maps = F.interpolate(result["maps"].maps[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    targets = result["maps"].targets.tolist()
    limit = (1 + k_mean) * one_forward
    print(f"images: {', '.join(p.name for p in paths)}; non-constant channels K: {live.tolist()} of {flat.shape[1]}")
    print(f"one forward at the best batch ({best_key}): {one_forward * 1e3:.1f} ms per input")
    print("ms per input by layout @ batch: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in per_input.items()))
    print(header("contender", "s/image", "x limit"))
    print(row("limit (1 + K) forwards", f"{limit:.2f}", "1.00"))
    print(row("camcli scorecam", f"{ours_time:.2f}", f"{ours_time / limit:.2f}"))
    if pytorch_grad_cam is None:
        print("pytorch-grad-cam: not installed (pip install -e '.[bench]')")
        return
    anchor_model = copy.deepcopy(model)
    anchor = pytorch_grad_cam.ScoreCAM(anchor_model, [dict(anchor_model.named_modules())[layer.name]])
    start = time.perf_counter()
    theirs = anchor(
        input_tensor=x.clone(), targets=[lambda out, c=c: out.log_softmax(-1)[c] for c in targets]
    )  # default batch size (16); log-probability targets make its maps equal to the paper's
    anchor_time = (time.perf_counter() - start) / len(paths)
    agreement = [pearson(maps[i, 0].numpy(), theirs[i]) for i in range(len(paths))]
    # pytorch-grad-cam upsamples the masks with align_corners=True, the official code (and
    # camcli) with False; at Lite0's 7x7 that alone moves the maps. Same convention, same map:
    aligned = Explainer(copy.deepcopy(model), layer, [ScoreCAM(align_corners=True)], chunk_size=32)
    same = aligned.explain(x, TargetSpec()).explanations[0].maps
    same = F.interpolate(same[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    agreement_aligned = [pearson(same[i, 0].numpy(), theirs[i]) for i in range(len(paths))]
    print(row("pytorch-grad-cam ScoreCAM", f"{anchor_time:.2f}", f"{anchor_time / limit:.2f}"))
    print(
        f"\ncamcli is {anchor_time / ours_time:.1f}x faster. Pearson of the maps: "
        + ", ".join(f"{v:.5f}" for v in agreement)
        + "; with pytorch-grad-cam's mask upsampling (align_corners=True): "
        + ", ".join(f"{v:.5f}" for v in agreement_aligned)
    )


def plain_graph(explainer: Explainer, x: torch.Tensor) -> object:
    """`explainer` on `x` with autograd's plain graph after the layer (no `_LeanGraph`): the
    cost without the lean ops, measured beside them."""
    import contextlib

    import camcli.engine as engine

    lean = engine.lean_graph_from
    engine.lean_graph_from = lambda modules: contextlib.nullcontext()  # type: ignore[assignment]
    try:
        return explainer.explain(x, TargetSpec())
    finally:
        engine.lean_graph_from = lean


# --- 5 ----------------------------------------------------------------------------------------


def fine_layers(rounds: int) -> None:
    """`--layer fine` costs one forward and one backward for both layers; the backward runs from
    the head down to the finer layer, through Lite0's last (stride-32) stage, where the single
    auto layer's stops at the head's input. The finer layer alone is shown beside it: fusing
    the two adds almost nothing to it."""
    print("\n## 5. --layer fine on efficientnet_lite0 (embedded weights, batch 8, 224 px)\n")
    loaded = load_model("efficientnet_lite0", None)
    model = loaded.model.eval()
    auto = resolve_layers(model, "auto", loaded.input, CPU)
    fine = resolve_layers(model, "fine", loaded.input, CPU)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    fine_label = f"gradcam fine mean ({','.join(i.name for i in fine)})"
    explainers = {
        f"gradcam auto ({auto[0].name})": Explainer(model, auto, parse_methods("gradcam")),
        fine_label: Explainer(model, fine, parse_methods("gradcam")),
        "gradcam fine product": Explainer(model, fine, parse_methods("gradcam"), fuse="product"),
        f"gradcam {fine[0].name} alone": Explainer(model, fine[:1], parse_methods("gradcam")),
        "gradcam++,layercam fine product": Explainer(model, fine, parse_methods("gradcam++,layercam"), fuse="product"),
    }

    def forward() -> None:  # in the engine's layout (channels_last), as its passes run
        with explainers[next(iter(explainers))].session(), torch.inference_mode():
            model(x.contiguous(memory_format=torch.channels_last))

    contenders: dict[str, Callable[[], object]] = {"forward (inference_mode, channels_last)": forward}
    for label, explainer in explainers.items():
        contenders[label] = lambda e=explainer: e.explain(x, TargetSpec())
    contenders["gradcam fine mean, plain graph"] = lambda: plain_graph(explainers[fine_label], x)
    times = best_times(contenders, rounds)
    single = times[next(iter(explainers))]
    print(header("contender", "ms/batch", "x forward", "x auto"))
    base = times["forward (inference_mode, channels_last)"]
    for label, seconds in times.items():
        print(row(label, f"{seconds * 1e3:.0f}", f"{seconds / base:.2f}", f"{seconds / single:.2f}"))
    print(f"\nfine (mean) / single auto layer: {times[fine_label] / single:.2f}")
    print(f"the same with the plain graph (no _LeanGraph): {times['gradcam fine mean, plain graph'] / single:.2f}")


# --- 3 and 4 ----------------------------------------------------------------------------------


def make_folder(folder: Path, count: int, width: int = 640, height: int = 480) -> None:
    """`count` JPEGs of the sample photos, shifted and resized so that no two are equal."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = [decode_image(p) for p in sorted((ROOT / "samples").glob("*.png"))]
    for i in range(count):
        photo = photos[i % len(photos)]
        shift = (i * 7) % 40
        crop = photo[shift:, shift:]
        picture = cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / f"img{i:05d}.jpg"), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))


ANCHOR_LOOP = textwrap.dedent(
    """
    # What a pytorch-grad-cam user writes for a folder: read, GradCAM at batch 8, overlay, save.
    import json, sys
    from pathlib import Path
    import cv2, numpy as np, torch, torchvision
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import preprocess_image, show_cam_on_image
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    cam = GradCAM(model, target_layers=[model.layer4[-1]])
    paths = sorted(folder.glob("*.jpg"))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    for start in range(0, len(paths), 8):
        batch = paths[start:start + 8]
        images = [np.float32(cv2.imread(str(p))[:, :, ::-1]) / 255 for p in batch]
        x = torch.cat([preprocess_image(cv2.resize(im, (224, 224)), mean, std) for im in images])
        maps = cam(input_tensor=x, targets=None)
        for path, image, heat in zip(batch, images, maps):
            heat = cv2.resize(heat, (image.shape[1], image.shape[0]))
            overlay = show_cam_on_image(image, heat, use_rgb=True)
            cv2.imwrite(str(out / f"{path.name}.gradcam.png"), overlay[:, :, ::-1])
            with open(out / f"{path.name}.json", "w") as f:
                json.dump({"image": str(path), "method": "gradcam"}, f)
    """
)

PEAK_RSS = textwrap.dedent(
    """
    # Runs camcli's CLI in this process and prints its peak resident set size (KiB).
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent.
    import resource, runpy, sys
    sys.argv = ["camcli", *sys.argv[1:]]
    try:
        runpy.run_module("camcli", run_name="__main__")
    except SystemExit as exit:
        code = exit.code
    try:
        with open("/proc/self/status") as status:
            peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(peak, file=sys.stderr)
    """
)


def peak_rss_mib(command: list[str]) -> float:
    """Peak RSS in MiB of a `python -m camcli ...` command, measured by the child itself."""
    command = [command[0], "-c", PEAK_RSS, *command[3:]]
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return int(done.stderr.strip().splitlines()[-1]) / 1024


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def camcli_command(folder: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "camcli", "explain", str(folder), "-o", str(out), "-q", *extra]


def folder_end_to_end(rounds: int, small: int, large: int) -> None:
    print(f"\n## 3. Folder end to end: per image beyond start-up ({large} - {small} images, 640x480 JPEG)\n")
    work = Path(tempfile.mkdtemp(prefix="camcli-bench-"))
    try:
        for count in (small, large):
            make_folder(work / f"in{count}", count)
        loop = work / "anchor_loop.py"
        loop.write_text(ANCHOR_LOOP)
        runs: dict[str, Callable[[int], list[str]]] = {
            "camcli explain -m gradcam": lambda n: camcli_command(
                work / f"in{n}",
                work / f"out-camcli-{n}",
                "-m",
                "gradcam",
                "--model",
                "resnet50",
                "--weights",
                "none",
                "--overwrite",
            ),
        }
        if pytorch_grad_cam is not None:
            runs["pytorch-grad-cam loop"] = lambda n: [
                sys.executable,
                str(loop),
                str(work / f"in{n}"),
                str(work / f"out-anchor-{n}"),
            ]
        best = {(label, n): float("inf") for label in runs for n in (small, large)}
        for _ in range(rounds):  # interleaved, so a burst of load hits one round, not one contender
            for label, n in best:
                best[label, n] = min(best[label, n], timed(runs[label](n)))
        per_image = {label: (best[label, large] - best[label, small]) / (large - small) for label in runs}

        torch.manual_seed(0)
        loaded = load_model("resnet50", "none")
        x = torch.randn(BATCH, 3, SIZE, SIZE)

        def forward() -> None:
            with torch.inference_mode():
                loaded.model.eval()(x)

        forward_per_image = best_times({"f": forward}, 5)["f"] / BATCH
        print(header("contender", "ms/image", "x forward", "x camcli"))
        print(row("forward only (batch 8)", f"{forward_per_image * 1e3:.0f}", "1.00"))
        ours = per_image["camcli explain -m gradcam"]
        for label, seconds in per_image.items():
            print(row(label, f"{seconds * 1e3:.0f}", f"{seconds / forward_per_image:.2f}", f"{seconds / ours:.2f}"))
        if pytorch_grad_cam is None:
            print("pytorch-grad-cam: not installed (pip install -e '.[bench]')")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def peak_memory(small: int, large: int) -> None:
    print(f"\n## 4. Peak RSS of `camcli explain` ({small} vs {large} images, 320x240 JPEG, resnet18)\n")
    work = Path(tempfile.mkdtemp(prefix="camcli-bench-"))
    try:
        peaks = {}
        for count in (small, large):
            make_folder(work / f"in{count}", count, 320, 240)
            command = camcli_command(
                work / f"in{count}", work / f"out{count}", "-m", "gradcam", "--model", "resnet18", "--weights", "none"
            )
            peaks[count] = peak_rss_mib(command)
        print(header("images", "peak MiB"))
        for count, mib in peaks.items():
            print(row(count, f"{mib:.0f}"))
        print(f"\n{large} / {small}: {peaks[large] / peaks[small]:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="1,2,3,4,5", help="comma list of 1-5")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and images (a smoke run)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = {int(s) for s in args.sections.split(",")}
    rounds = 2 if args.quick else 5
    print("# camcli benchmarks\n")
    print(
        f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"grad-cam {anchor_version('grad-cam')}, torchcam {anchor_version('torchcam')}"
    )
    print(f"command: python benchmarks/bench.py {' '.join(sys.argv[1:])}".rstrip())
    if 1 in sections:
        gradient_methods(rounds)
    if 2 in sections:
        scorecam(rounds, 1 if args.quick else 2)
    if 3 in sections:
        folder_end_to_end(1 if args.quick else 3, 16, 40 if args.quick else 80)
    if 4 in sections:
        peak_memory(20 if args.quick else 100, 200 if args.quick else 1000)
    if 5 in sections:
        fine_layers(3 if args.quick else 10)


if __name__ == "__main__":
    main()
