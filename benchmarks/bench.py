"""camcli's speed and memory against the physical limit of each method and against
pytorch-grad-cam, measured in one run on one machine (ratios; absolute times for context).

    python benchmarks/bench.py                 # every section, ~40 min on 2 CPU cores
    python benchmarks/bench.py --sections 1,2  # a subset
    python benchmarks/bench.py --quick         # fewer repeats and images, a smoke run

1. gradient methods: camcli batch time / forward-only time (inference_mode, default memory
   format), efficientnet_lite0 and resnet50, batch 8, 224 px;
2. Score-CAM on Lite0, photo by photo (samples/ and benchmarks/data): camcli fp32 and bf16
   (where the CPU has it) per image / the time of (1 + K non-constant channels) forwards of its
   inference copy at the best batch, run back to back as a contender (and / K times the best
   burst's time per input, which flatters the limit), and against pytorch-grad-cam's ScoreCAM
   as a user runs it (default batch 16, timm's tf_efficientnet_lite0 holding the same weights)
   and as the earlier bench ran it (on camcli's own Lite0), with the Pearson of the maps;
3. a folder end to end (`camcli explain DIR -m gradcam --model resnet50 --weights none`),
   per image beyond start-up, against forward-only and a plain pytorch-grad-cam loop;
4. peak RSS of `camcli explain` on 100 vs 1,000 images;
5. `--layer fine` (the auto layer fused with the last stage at twice its resolution) on
   Lite0, batch 8, 224 px: its batch time / the single auto layer's, beside forward-only,
   and a folder end to end with `--layer fine` against `--layer auto` per image;
6. overlays: PNG encoder settings (time and size) on 640x480 overlays, a grid and tiles, and
   a folder with `-m cam,gradcam,gradcam++` against `-m gradcam` per image beyond start-up;
7. on a CUDA device (skipped without one): images/s of Grad-CAM and Score-CAM on resnet50 and
   vit_b_16 in fp32 and bf16, and the share of a folder run's time in decode, model and writes.

The machine is shared and noisy: contenders run interleaved, round after round, and each
keeps its best time, so a burst of load slows one round, not one contender. pytorch-grad-cam
is optional (`pip install -e '.[bench]'`); without it its columns say so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import platform
import resource
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

from camcli.allocator import reuse_freed_memory  # noqa: E402
from camcli.engine import Explainer, TargetSpec  # noqa: E402
from camcli.errors import UsageError  # noqa: E402
from camcli.io import decode_image  # noqa: E402
from camcli.methods import parse_methods  # noqa: E402
from camcli.methods.scorecam import ScoreCAM  # noqa: E402
from camcli.models import load_model, resolve_layer, resolve_layers  # noqa: E402
from camcli.precision import autocast_dtype  # noqa: E402
from camcli.run.stages import preprocess  # noqa: E402

CPU = torch.device("cpu")
PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
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
        unfolded = Explainer(copy.deepcopy(plain), layer, parse_methods("guided-backprop"))
        unfolded.folds.disabled = True  # batch norm as a multiply-add after its conv (camcli.bnfold off)
        contenders["guided-backprop, batch norm not folded"] = lambda e=unfolded, x=x: e.explain(x, TargetSpec())
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


def photos(count: int) -> list[Path]:
    """Licensed photos for Score-CAM: samples/ (scikit-image's, CC0/public domain), the two
    colour photos of benchmarks/data, then any colour photo scikit-image ships, if installed."""
    found = sorted((ROOT / "samples").glob("*.png")) + [
        ROOT / "benchmarks/data" / n for n in ("astronaut.jpg", "rocket.jpg")
    ]
    try:
        import skimage

        data = Path(skimage.__file__).parent / "data"
        names = {p.stem.removeprefix("skimage_") for p in found}
        found += [
            data / n for n in ("motorcycle_left.png", "ihc.png", "hubble_deep_field.jpg") if Path(n).stem not in names
        ]
    except ImportError:
        pass
    return [p for p in found if p.is_file()][:count]


def live_channels(model: torch.nn.Module, layer_name: str, x: torch.Tensor) -> tuple[list[int], int]:
    """K per image (the layer's channels whose activation is not constant), and the layer's channels."""
    acts = {}
    handle = dict(model.named_modules())[layer_name].register_forward_hook(
        lambda _m, _i, out: acts.setdefault("a", out)
    )
    try:
        with torch.inference_mode():
            model(x)
    finally:
        handle.remove()
    flat = acts["a"].flatten(2)
    return (flat.amax(-1) > flat.amin(-1)).sum(1).tolist(), flat.shape[1]


def forwards(
    nets: dict[str, tuple[torch.nn.Module, bool, torch.dtype | None]], batches: tuple[int, ...]
) -> dict[str, Callable[[], None]]:
    """One inference-mode forward of each net at each batch: '{net} @ {batch}' -> a callable."""
    contenders = {}
    for label, (net, channels_last, dtype) in nets.items():
        for batch in batches:
            x = torch.randn(batch, 3, SIZE, SIZE)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)

            def forward(net: torch.nn.Module = net, x: torch.Tensor = x, dtype: torch.dtype | None = dtype) -> None:
                with (
                    torch.inference_mode(),
                    torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None),
                ):
                    net(x)

            contenders[f"{label} @ {batch}"] = forward
    return contenders


def sustained_forwards(
    net: torch.nn.Module, dtype: torch.dtype | None, batch: int, counts: list[int]
) -> Callable[[int], None]:
    """Image i's limit as a contender: counts[i] inputs through `net`, `batch` at a time."""
    x = torch.randn(batch, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)

    def run(i: int) -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            for start in range(0, counts[i], batch):
                net(x[: min(batch, counts[i] - start)])

    return run


def scorecam(rounds: int, images: int) -> None:
    print("\n## 2. Score-CAM on EfficientNet-Lite0 (embedded weights), per image, 224 px\n")
    from camcli.lite0 import timm_lite0

    loaded = load_model("efficientnet_lite0", None)
    model = loaded.model.eval()
    layer = resolve_layer(model, "auto", loaded.input, CPU)
    paths = photos(images)
    x = sample_batch(paths, loaded.input)
    with torch.inference_mode():
        targets = model(x).argmax(1).tolist()  # fp32 top-1: every contender explains the same class
    ks, channels = live_channels(model, layer.name, x)
    precisions = ["fp32"]
    try:
        autocast_dtype("bf16", CPU)
        precisions.append("bf16")
    except UsageError as error:
        print(f"bf16 contenders skipped: {error}\n")
    # the chunks of masked inputs are tuned on the run (camcli.chunking), as the CLI's default
    explainers = {
        f"camcli {p}": Explainer(copy.deepcopy(model), layer, parse_methods("scorecam"), precision=p)
        for p in precisions
    }
    fused = explainers["camcli fp32"].inference_model(x[:1])  # camcli's own forward: the folded copy
    user = timm_lite0() if timm_available() else None

    print(f"images: {', '.join(p.name for p in paths)}; K (non-constant of {channels}): {ks}")
    print("\n### One forward, ms per input (the limits' unit; best of interleaved rounds)\n")
    nets = {f"camcli copy {p} (channels_last)": (fused, True, PRECISION_DTYPES[p]) for p in precisions}
    nets["camcli Lite0 as loaded (NCHW)"] = (model, False, None)
    if user is not None:
        nets["timm tf_efficientnet_lite0 (NCHW)"] = (user, False, None)
    batches = (4, 8, 16, 32, 64)
    limit_forwards = forwards(nets, batches)
    # a new explainer's first image pays for the chunk-size search: timed once, before the rounds
    cold: dict[str, float] = {}
    for name in explainers:
        fresh = Explainer(copy.deepcopy(model), layer, parse_methods("scorecam"), precision=name.split()[-1])
        fresh.inference_model(x[:1])
        start = time.perf_counter()
        fresh.explain(x[:1], TargetSpec(index=targets[0]))
        cold[name] = time.perf_counter() - start

    maps: dict[tuple[str, int], np.ndarray] = {}

    def ours(name: str) -> Callable[[int], object]:
        def run(i: int) -> None:
            result = explainers[name].explain(x[i : i + 1], TargetSpec(index=targets[i])).explanations[0]
            maps[name, i] = upsampled(result.maps)

        return run

    contenders: dict[str, Callable[[int], object]] = {name: ours(name) for name in explainers}
    if pytorch_grad_cam is not None:
        # (net, its module equal to camcli's layer): timm's head is conv_head -> bn2, a
        # BatchNormAct2d with the ReLU6 inside, whose output is camcli's _head_act
        anchors = {"pytorch-grad-cam on camcli's Lite0 (the earlier bench)": (model, layer.name)}
        if user is not None:
            anchors["pytorch-grad-cam on timm tf_efficientnet_lite0"] = (user, "bn2")
        for label, (net, target_name) in anchors.items():
            net = copy.deepcopy(net)
            target = dict(net.named_modules())[target_name]
            cam = pytorch_grad_cam.ScoreCAM(net, [target])  # its default batch_size: 16

            def theirs(i: int, cam=cam, label=label) -> None:
                # log-probability targets make its softmax over channels proportional to the paper's weights
                with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
                    heat = cam(
                        input_tensor=x[i : i + 1].clone(), targets=[lambda out, c=targets[i]: out.log_softmax(-1)[c]]
                    )
                maps[label, i] = heat[0]

            contenders[label] = theirs
    # The limit itself, run as Score-CAM runs: (1 + K) forwards of the copy back to back, at
    # the batch one burst of forwards finds fastest, interleaved with the contenders. A best
    # short burst times the machine at its quietest moment, a sustained run of seconds does
    # not, so K times the burst's time per input (also printed) flatters the limit.
    # Its batch: the best per input over three interleaved rounds of bursts (one burst each
    # picked a batch 20 % slower than the best on this noisy machine).
    burst = {k: v / int(k.rsplit("@", 1)[1]) for k, v in best_times(limit_forwards, 3).items()}
    for p in precisions:
        net_label = f"camcli copy {p} (channels_last)"
        batch = min(batches, key=lambda b, n=net_label: burst[f"{n} @ {b}"])
        contenders[f"limit, sustained: (1 + K) forwards of the copy {p} @ {batch}"] = sustained_forwards(
            fused, PRECISION_DTYPES[p], batch, [1 + k for k in ks]
        )
    # interleaved image by image, round by round, with the forwards that give the limits;
    # each keeps its best time (per image for the contenders)
    best = {(name, i): float("inf") for name in contenders for i in range(len(paths))}
    fastest = dict.fromkeys(limit_forwards, float("inf"))
    for _ in range(rounds):
        for i in range(len(paths)):
            for name, run in contenders.items():
                start = time.perf_counter()
                run(i)
                best[name, i] = min(best[name, i], time.perf_counter() - start)
            for name, forward in limit_forwards.items():
                start = time.perf_counter()
                forward()
                fastest[name] = min(fastest[name], time.perf_counter() - start)
    per_input = {k: v / int(k.rsplit("@", 1)[1]) for k, v in fastest.items()}
    print(header("net", *(f"@ {b}" for b in batches)))
    for label in nets:
        print(row(label, *(f"{per_input[f'{label} @ {b}'] * 1e3:.1f}" for b in batches)))
    one = {p: min(v for k, v in per_input.items() if k.startswith(f"camcli copy {p}")) for p in precisions}
    # pytorch-grad-cam's convention (align_corners=True masks), untimed: the same cost as camcli fp32
    aligned = Explainer(copy.deepcopy(model), layer, [ScoreCAM(align_corners=True)])
    for i in range(len(paths)):
        maps["aligned", i] = upsampled(aligned.explain(x[i : i + 1], TargetSpec(index=targets[i])).explanations[0].maps)

    print("\n### Seconds per image (best of interleaved rounds)\n")
    bursts = {p: [(1 + k) * one[p] for k in ks] for p in precisions}
    totals = {name: sum(best[name, i] for i in range(len(paths))) for name in contenders}
    sustained = {p: next(n for n in contenders if n.startswith("limit") and f"copy {p} @" in n) for p in precisions}
    limits = {p: [best[sustained[p], i] for i in range(len(paths))] for p in precisions}
    print(header("contender", *(p.name for p in paths), "total", "x limit", "x burst limit"))
    for p in precisions:
        cells = [f"{v:.2f}" for v in bursts[p]]
        print(row(f"limit, burst: (1 + K) x best ms per input of the copy {p}", *cells, f"{sum(bursts[p]):.2f}"))
    for name in contenders:
        p = "bf16" if "bf16" in name else "fp32"
        cells = [f"{best[name, i]:.2f}" for i in range(len(paths))]
        ratios = f"{totals[name] / sum(limits[p]):.2f}", f"{totals[name] / sum(bursts[p]):.2f}"
        print(row(name, *cells, f"{totals[name]:.2f}", *ratios))
    print()
    for name, explainer in explainers.items():
        limit = limits[name.split()[-1]][0]
        print(
            f"- {name}: chunks of {explainer.chunk_sizer.chosen((3, SIZE, SIZE))} masked inputs (tuned); a new "
            f"explainer's first image, the search included: {cold[name]:.2f} s, {cold[name] / limit:.2f}x its "
            "sustained limit"
        )
    anchor = "pytorch-grad-cam on timm tf_efficientnet_lite0"
    if anchor not in contenders:
        print("\npytorch-grad-cam or timm: not installed (pip install -e '.[bench,timm]')")
        return
    print()
    for name in explainers:
        speedups = [best[anchor, i] / best[name, i] for i in range(len(paths))]
        earlier = "pytorch-grad-cam on camcli's Lite0 (the earlier bench)"
        was = totals[earlier] / totals[name] if earlier in totals else float("nan")
        print(
            f"- {name}: {totals[anchor] / totals[name]:.2f}x faster than {anchor} over the images "
            f"(per image {min(speedups):.2f}-{max(speedups):.2f}x); {was:.2f}x against it on camcli's model"
        )
    convention = [pearson(maps["aligned", i], maps[anchor, i]) for i in range(len(paths))]
    default = [pearson(maps["camcli fp32", i], maps[anchor, i]) for i in range(len(paths))]
    pearsons = {
        "camcli fp32 with its align_corners=True masks vs pytorch-grad-cam": convention,
        "camcli fp32 (default, align_corners=False) vs pytorch-grad-cam": default,
    }
    if "bf16" in precisions:
        pearsons["camcli bf16 vs camcli fp32"] = [
            pearson(maps["camcli bf16", i], maps["camcli fp32", i]) for i in range(len(paths))
        ]
    for what, values in pearsons.items():
        print(f"- Pearson {what}: {', '.join(f'{v:.5f}' for v in values)} (worst {min(values):.5f})")


def upsampled(maps: torch.Tensor) -> np.ndarray:
    """A (1, h, w) map at the input's size, as pytorch-grad-cam returns it, for Pearson."""
    return F.interpolate(maps[:, None].float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0].numpy()


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def plain_graph(explainer: Explainer, x: torch.Tensor) -> object:
    """`explainer` on `x` with autograd's plain graph after the layer (no `_LeanGraph`): the
    cost without the lean ops, measured beside them."""
    import contextlib

    import camcli.engine as engine

    lean = engine.lean_graph_from
    engine.lean_graph_from = lambda modules, folds=None: contextlib.nullcontext()  # type: ignore[assignment]
    try:
        return explainer.explain(x, TargetSpec())
    finally:
        engine.lean_graph_from = lean


# --- 5 ----------------------------------------------------------------------------------------


def fine_layers(rounds: int, folder_rounds: int, small: int, large: int) -> None:
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
    unfolded = Explainer(model, fine, parse_methods("gradcam"))
    unfolded.folds.disabled = True
    contenders["gradcam fine mean, batch norm not folded"] = lambda: unfolded.explain(x, TargetSpec())
    times = best_times(contenders, rounds)
    single = times[next(iter(explainers))]
    print(header("contender", "ms/batch", "x forward", "x auto"))
    base = times["forward (inference_mode, channels_last)"]
    for label, seconds in times.items():
        print(row(label, f"{seconds * 1e3:.0f}", f"{seconds / base:.2f}", f"{seconds / single:.2f}"))
    print(f"\nfine (mean) / single auto layer: {times[fine_label] / single:.2f}")
    print(f"the same with the plain graph (no _LeanGraph): {times['gradcam fine mean, plain graph'] / single:.2f}")
    fine_end_to_end(folder_rounds, small, large)


def fine_end_to_end(rounds: int, small: int, large: int) -> None:
    """What `--layer fine` costs a user on a folder: the CLI with the default model, per image
    beyond start-up (decode, model, overlays, JSON), against `--layer auto`."""
    work = Path(tempfile.mkdtemp(prefix="camcli-bench-"))
    try:
        for count in (small, large):
            make_folder(work / f"in{count}", count)
        runs = {
            f"--layer {layer}": lambda n, layer=layer: camcli_command(
                work / f"in{n}", work / f"out-{layer}-{n}", "--layer", layer, "--overwrite"
            )
            for layer in ("auto", "fine")
        }
        per_image = per_image_beyond_startup(runs, small, large, rounds)
        print(f"\n`camcli explain DIR --layer ...` (Lite0, gradcam), {large} - {small} images, 640x480 JPEG\n")
        print(header("layer", "wall ms/image beyond start-up", "x auto", "CPU ms/image", "x auto"))
        one, one_cpu = per_image["--layer auto"]
        for label, (seconds, cpu) in per_image.items():
            print(
                row(label, f"{seconds * 1e3:.0f}", f"{seconds / one:.2f}", f"{cpu * 1e3:.0f}", f"{cpu / one_cpu:.2f}")
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


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


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, all its threads) of a command; the CPU
    time barely moves with other load on the machine, the wall time does."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def camcli_command(folder: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "camcli", "explain", str(folder), "-o", str(out), "-q", *extra]


def per_image_beyond_startup(
    runs: dict[str, Callable[[int], list[str]]], small: int, large: int, rounds: int
) -> dict[str, tuple[float, float]]:
    """Wall and CPU seconds per image of each command beyond its start-up: (best time on
    `large` images - best on `small`) / (large - small), runs interleaved so that a burst of
    load hits one round, not one contender."""
    best = {(label, n): (float("inf"), float("inf")) for label in runs for n in (small, large)}
    for _ in range(rounds):
        for label, n in best:
            wall, cpu = timed(runs[label](n))
            best[label, n] = (min(best[label, n][0], wall), min(best[label, n][1], cpu))
    return {
        label: tuple((best[label, large][k] - best[label, small][k]) / (large - small) for k in (0, 1))
        for label in runs
    }


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
        per_image = per_image_beyond_startup(runs, small, large, rounds)

        torch.manual_seed(0)
        loaded = load_model("resnet50", "none")
        x = torch.randn(BATCH, 3, SIZE, SIZE)

        def forward() -> None:
            with torch.inference_mode():
                loaded.model.eval()(x)

        forward_per_image = best_times({"f": forward}, 5)["f"] / BATCH
        print(header("contender", "ms/image", "x forward", "x camcli"))
        print(row("forward only (batch 8)", f"{forward_per_image * 1e3:.0f}", "1.00"))
        ours, _ = per_image["camcli explain -m gradcam"]
        for label, (seconds, _) in per_image.items():
            print(row(label, f"{seconds * 1e3:.0f}", f"{seconds / forward_per_image:.2f}", f"{seconds / ours:.2f}"))
        if pytorch_grad_cam is None:
            print("pytorch-grad-cam: not installed (pip install -e '.[bench]')")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- 5 ----------------------------------------------------------------------------------------

PNG_SETTINGS = {  # label: cv2.imencode parameters (names), as the alternatives measured
    "level 1, adaptive filter (camcli two rounds ago)": (("IMWRITE_PNG_COMPRESSION", 1),),
    "level 3, adaptive filter": (("IMWRITE_PNG_COMPRESSION", 3),),
    **{
        f"level 1, {f.lower()} filter, {strategy.lower()}": (
            ("IMWRITE_PNG_COMPRESSION", 1),
            ("IMWRITE_PNG_FILTER", f"IMWRITE_PNG_FILTER_{f}"),
            ("IMWRITE_PNG_STRATEGY", f"IMWRITE_PNG_STRATEGY_{strategy}"),
        )
        for f in ("SUB", "UP", "PAETH")
        for strategy in ("DEFAULT", "RLE", "HUFFMAN_ONLY")
    },
}


def overlay_pictures() -> dict[str, np.ndarray]:
    """What camcli encodes, at 640x480: Grad-CAM overlays of the photos (Lite0's real maps),
    a comparison grid and a channels tile grid (flat cells); BGR, as cv2 takes them."""
    from camcli.render import colorize, comparison_grid, heatmap_at_size, overlay, tile_grid

    loaded = load_model("efficientnet_lite0", None)
    layer = resolve_layer(loaded.model, "auto", loaded.input, CPU)
    paths = photos(5)
    maps = Explainer(loaded.model, layer, parse_methods("gradcam")).explain(
        sample_batch(paths, loaded.input), TargetSpec()
    )
    heat = maps.explanations[0].maps.numpy()
    pictures = {}
    for path, h in zip(paths, heat, strict=True):
        image = cv2.resize(decode_image(path), (640, 480), interpolation=cv2.INTER_AREA)
        pictures[f"overlay {path.stem}"] = overlay(image, heatmap_at_size(h, 640, 480))
    image = cv2.resize(decode_image(paths[1]), (640, 480), interpolation=cv2.INTER_AREA)
    panel = pictures[f"overlay {paths[1].stem}"]
    pictures["comparison grid"] = comparison_grid(
        [[(image, "image", "cat"), (panel, "gradcam", "0.91"), (panel, "cam", "")]]
    )
    pictures["channel tiles"] = tile_grid(colorize(np.random.default_rng(0).random((64, 7, 7), dtype=np.float32)))
    return {name: cv2.cvtColor(picture, cv2.COLOR_RGB2BGR) for name, picture in pictures.items()}


def overlays(rounds: int, small: int, large: int) -> None:
    print("\n## 6. Overlays: PNG settings, and three methods vs one end to end\n")
    from camcli.io import encode_png

    pictures = overlay_pictures()
    rgb = {name: cv2.cvtColor(picture, cv2.COLOR_BGR2RGB) for name, picture in pictures.items()}

    def imencode(ext: str, params: list[int]) -> Callable[[str], bytes]:
        return lambda name: cv2.imencode(ext, pictures[name], params)[1].tobytes()

    encoders = {
        label: imencode(".png", [getattr(cv2, v) if isinstance(v, str) else v for pair in setting for v in pair])
        for label, setting in PNG_SETTINGS.items()
    }
    now = "fpng (camcli now)"
    encoders[now] = lambda name: encode_png(rgb[name])
    encoders["JPEG quality 92 (--overlay-format jpg, lossy)"] = imencode(".jpg", [cv2.IMWRITE_JPEG_QUALITY, 92])
    best = {(label, name): float("inf") for label in encoders for name in pictures}
    size = {}
    for _ in range(rounds * 3):  # interleaved; each encode keeps its best time
        for label, encode in encoders.items():
            for name in pictures:
                start = time.perf_counter()
                data = encode(name)
                best[label, name] = min(best[label, name], time.perf_counter() - start)
                size[label, name] = len(data)
    photo_names = [n for n in pictures if n.startswith("overlay")]
    print(
        f"overlays of {len(photo_names)} photos at 640x480 (Lite0 Grad-CAM maps), a comparison grid, 64 channel tiles"
    )
    print(f"camcli's PNG now: {now}; the others are libpng through cv2.imencode\n")
    print(header("setting", "ms/overlay", "KiB/overlay", "grid ms", "grid KiB", "tiles ms", "tiles KiB"))
    for label in encoders:
        mean_ms = np.mean([best[label, n] for n in photo_names]) * 1e3
        mean_kib = np.mean([size[label, n] for n in photo_names]) / 1024
        cells = [f"{mean_ms:.1f}", f"{mean_kib:.0f}"]
        for other in ("comparison grid", "channel tiles"):
            cells += [f"{best[label, other] * 1e3:.1f}", f"{size[label, other] / 1024:.0f}"]
        print(row(label, *cells))

    work = Path(tempfile.mkdtemp(prefix="camcli-bench-"))
    try:
        for count in (small, large):
            make_folder(work / f"in{count}", count)
        model = ("--model", "resnet50", "--weights", "none", "--overwrite")
        runs = {
            f"-m {methods}": lambda n, methods=methods: camcli_command(
                work / f"in{n}", work / f"out-{methods}-{n}", "-m", methods, *model
            )
            for methods in ("gradcam", "cam,gradcam,gradcam++")
        }
        per_image = per_image_beyond_startup(runs, small, large, rounds)
        print(
            f"\n`camcli explain DIR -m ... --model resnet50 --weights none`, {large} - {small} images, 640x480 JPEG\n"
        )
        print(header("methods", "wall ms/image beyond start-up", "x -m gradcam", "CPU ms/image", "x -m gradcam"))
        one, one_cpu = per_image["-m gradcam"]
        for label, (seconds, cpu) in per_image.items():
            cells = (f"{seconds * 1e3:.0f}", f"{seconds / one:.2f}", f"{cpu * 1e3:.0f}", f"{cpu / one_cpu:.2f}")
            print(row(label, *cells))
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


# --- 6 ----------------------------------------------------------------------------------------


def device_throughput(
    device: torch.device,
    rounds: int,
    size: int = SIZE,
    batch: int = 32,
    folder_images: int = 64,
    models: tuple[str, ...] = ("resnet50", "vit_b_16"),
    methods: tuple[str, ...] = ("gradcam", "scorecam"),
) -> None:
    """Images/s of Grad-CAM and Score-CAM on resnet50 and vit_b_16 (random weights) on
    `device` in fp32 and bf16, and where a folder run's time goes (decode, model, writes)."""
    from camcli.engine import stack_to_device
    from camcli.errors import UsageError
    from camcli.io import atomic_write, encode_image
    from camcli.precision import autocast_dtype
    from camcli.render import heatmap_at_size, overlay

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    print(header("model", "method", "precision", "batch", "images/s"))
    for name in models:
        torch.manual_seed(0)
        loaded = load_model(name, "none")
        model = loaded.model.to(device).eval()
        layer = resolve_layer(model, "auto", loaded.input, device)
        x = torch.randn(batch, 3, size, size, device=device)
        for precision in ("fp32", "bf16"):
            try:
                autocast_dtype(precision, device)
            except UsageError as refused:
                print(row(name, "-", precision, "-", f"skipped: {refused}"))
                continue
            for method in methods:
                count = batch if method == "gradcam" else max(1, batch // 8)  # Score-CAM: 1 + K forwards each
                explainer = Explainer(model, layer, parse_methods(method), chunk_size=256, precision=precision)

                def run(e: Explainer = explainer, inputs: torch.Tensor = x[:count]) -> None:
                    e.explain(inputs, TargetSpec())
                    synchronize()

                seconds = best_times({"run": run}, rounds)["run"]
                print(row(name, method, precision, count, f"{count / seconds:.3g}"))

    # where a folder run's time goes, stage by stage (serial, so the shares add up)
    torch.manual_seed(0)
    loaded = load_model("resnet50", "none")
    model = loaded.model.to(device).eval()
    explainer = Explainer(model, resolve_layer(model, "auto", loaded.input, device), parse_methods("gradcam"))
    work = Path(tempfile.mkdtemp(prefix="camcli-bench-"))
    try:
        make_folder(work / "in", folder_images)
        paths = sorted((work / "in").glob("*.jpg"))
        spent = dict.fromkeys(("decode", "model", "writes"), 0.0)
        explainer.explain(stack_to_device([preprocess(decode_image(paths[0]), loaded.input)], device), TargetSpec())
        for start in range(0, len(paths), batch):
            t0 = time.perf_counter()
            images = [decode_image(p) for p in paths[start : start + batch]]
            tensors = [preprocess(image, loaded.input) for image in images]
            t1 = time.perf_counter()
            result = explainer.explain(stack_to_device(tensors, device), TargetSpec())
            maps = result.explanations[0].maps.float().cpu().numpy()
            t2 = time.perf_counter()
            for n, (image, heat) in enumerate(zip(images, maps, strict=True)):
                picture = overlay(image, heatmap_at_size(heat, image.shape[1], image.shape[0]))
                atomic_write(work / f"{start + n}.png", encode_image(picture))
            t3 = time.perf_counter()
            spent["decode"] += t1 - t0
            spent["model"] += t2 - t1
            spent["writes"] += t3 - t2
        total = sum(spent.values())
        print(f"\nresnet50 Grad-CAM fp32 on {len(paths)} 640x480 JPEGs, batch {batch}, one thread per stage in turn:")
        print(header("stage", "ms/image", "share"))
        for stage, seconds in spent.items():
            print(row(stage, f"{seconds / len(paths) * 1e3:.1f}", f"{seconds / total:.0%}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cuda(rounds: int) -> None:
    print("\n## 7. On a CUDA device: images/s, and the share of decode, model and writes\n")
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}\n")
    device_throughput(device, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="1,2,3,4,5,6,7", help="comma list of 1-7")
    parser.add_argument("--photos", type=int, default=5, help="photos for Score-CAM (section 2)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and images (a smoke run)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a busy machine")
    args = parser.parse_args()
    # as in camcli's own processes (the CLI, the Ray actors); the anchors measured in this
    # process get the same allocator, so their times here are, if anything, too good
    reused = reuse_freed_memory()
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
    print(f"freed memory kept for reuse (camcli.allocator, as the CLI): {'yes' if reused else 'no (not glibc)'}")
    if 1 in sections:
        gradient_methods(rounds)
    if 2 in sections:
        scorecam(1 if args.quick else 2, 1 if args.quick else args.photos)
    if 3 in sections:
        folder_end_to_end(1 if args.quick else 3, 16, 40 if args.quick else 80)
    if 4 in sections:
        peak_memory(20 if args.quick else 100, 200 if args.quick else 1000)
    if 5 in sections:
        fine_layers(3 if args.quick else 10, 1 if args.quick else 3, 8 if args.quick else 16, 24 if args.quick else 112)
    if 6 in sections:
        overlays(1 if args.quick else 3, 8 if args.quick else 16, 24 if args.quick else 160)
    if 7 in sections:
        cuda(2 if args.quick else 5)


if __name__ == "__main__":
    main()
