"""Pasted-object benchmark: how well each CAM recipe finds an object, by the object's size.

    python benchmarks/pasted.py               # 80 images, ~25 min on 2 CPU cores shared by 8 jobs
    python benchmarks/pasted.py --images 400  # tighter numbers (~5x the time)

Objects with exact boxes: the cat's head and the espresso cup of `samples/` (their boxes in
`samples/labels.json`), each cropped and pasted, randomly flipped, at a random position into
a random 480 x 360 crop of another licensed photo (`benchmarks/data/`, README there), at a
size drawn uniformly inside one of five bins of the object's longer side over the image's
short side (5-10, 10-15, 15-25, 25-40, 40-60 %), the bins in turn, all from one seed. The box
is the pasted rectangle, so it is exact. Each map explains the object's class (of its labels'
acceptable classes, the one the model scores highest on the crop alone).

Per recipe (method x layer choice x fusion x input size) and size bin: the pointing game
(Zhang et al. 2016, 15 px tolerance) and the energy in the box, both from camcli.metrics,
on the default pretrained EfficientNet-Lite0. pytorch-grad-cam's RefineCAM runs on the same
layers (`--layer fine`) as the anchor for the product rule. Then the cost: time per batch of
`--layer fine` and of larger `--input-size` against the single-layer 224 px pass, contenders
interleaved, best of several rounds.

Writes benchmarks/PASTED.md (tables), benchmarks/pasted.png (pointing and energy vs size,
one line per recipe) and benchmarks/pasted.json (every number).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import anchor_version, best_times, header, row  # noqa: E402

from camcli.allocator import reuse_freed_memory  # noqa: E402
from camcli.engine import Explainer, TargetSpec  # noqa: E402
from camcli.io import decode_image  # noqa: E402
from camcli.methods import parse_methods  # noqa: E402
from camcli.metrics import box_masks, box_tensor, energy_in_box, pointing_game, resize_to_images, saliency  # noqa: E402
from camcli.models import load_model, resolve_layers  # noqa: E402
from camcli.run.stages import preprocess  # noqa: E402

CPU = torch.device("cpu")
CANVAS = (480, 360)  # width, height: a VOC-sized photo; the short side is 360 px
BINS = ((0.05, 0.10), (0.10, 0.15), (0.15, 0.25), (0.25, 0.40), (0.40, 0.60))
OBJECTS = ("skimage_chelsea.png", "skimage_coffee.png")
BATCH = 8
METHODS = ("gradcam", "gradcam++", "layercam")
OUT = Path(__file__).resolve().parent


# --- the data set -----------------------------------------------------------------------------


@dataclass
class Pasted:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    box: tuple[int, int, int, int]  # inclusive x0, y0, x1, y1
    size: float  # object's longer side / image's short side
    bin: int
    target: int  # ImageNet class explained
    obj: str
    background: str


def objects() -> list[tuple[str, np.ndarray, list[int]]]:
    labels = {e["file"]: e for e in json.loads((ROOT / "samples" / "labels.json").read_text())}
    crops = []
    for name in OBJECTS:
        x0, y0, x1, y1 = labels[name]["bbox"]
        crops.append(
            (name, decode_image(ROOT / "samples" / name)[y0 : y1 + 1, x0 : x1 + 1], labels[name]["acceptable_classes"])
        )
    return crops


def backgrounds() -> list[tuple[str, np.ndarray]]:
    files = sorted(p for p in (OUT / "data").iterdir() if p.suffix in (".png", ".jpg"))
    return [(p.name, decode_image(p)) for p in files]


def paste_set(count: int, seed: int, targets: dict[str, int]) -> list[Pasted]:
    """`count` images, the size bins in turn; everything else drawn from `seed`."""
    rng = np.random.default_rng(seed)
    crops, scenes = objects(), backgrounds()
    width, height = CANVAS
    short = min(width, height)
    images = []
    for i in range(count):
        bin_index = i % len(BINS)
        size = float(rng.uniform(*BINS[bin_index]))
        name, crop, _ = crops[int(rng.integers(len(crops)))]
        scene_name, scene = scenes[int(rng.integers(len(scenes)))]
        # a random 4:3 window of the scene, 60-100 % of the largest one, resized to the canvas
        largest = min(scene.shape[1] / width, scene.shape[0] / height)
        scale = largest * rng.uniform(0.6, 1.0)
        w, h = int(width * scale), int(height * scale)
        sx, sy = int(rng.integers(scene.shape[1] - w + 1)), int(rng.integers(scene.shape[0] - h + 1))
        canvas = cv2.resize(scene[sy : sy + h, sx : sx + w], (width, height), interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            canvas = canvas[:, ::-1]
        longer = max(1, round(size * short))
        factor = longer / max(crop.shape[:2])
        ow, oh = max(1, round(crop.shape[1] * factor)), max(1, round(crop.shape[0] * factor))
        piece = cv2.resize(crop, (ow, oh), interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            piece = piece[:, ::-1]
        x, y = int(rng.integers(width - ow + 1)), int(rng.integers(height - oh + 1))
        canvas = np.ascontiguousarray(canvas)
        canvas[y : y + oh, x : x + ow] = piece
        images.append(Pasted(canvas, (x, y, x + ow - 1, y + oh - 1), size, bin_index, targets[name], name, scene_name))
    return images


def object_targets(loaded) -> dict[str, int]:
    """Per object, the acceptable class the model scores highest on the crop alone."""
    found = {}
    for name, crop, acceptable in objects():
        with torch.inference_mode():
            logits = loaded.model(preprocess(crop, loaded.input)[None])
        found[name] = max(acceptable, key=lambda c: float(logits[0, c]))
    return found


# --- the recipes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """One pass: every method of `methods` at one layer choice, fusion and input size."""

    layer: str  # auto | fine
    fuse: str
    size: int
    methods: tuple[str, ...] = METHODS

    def label(self, method: str) -> str:
        layers = "auto" if self.layer == "auto" else f"fine {self.fuse}"
        return f"{method} {layers}" + ("" if self.size == 224 else f" @{self.size}")


GROUPS = (
    Group("auto", "mean", 224, (*METHODS, "center")),
    Group("fine", "mean", 224),
    Group("fine", "product", 224),
    Group("auto", "mean", 320),
    Group("fine", "product", 320),
)


def scores(maps: torch.Tensor, batch: list[Pasted]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointing hits and energy in box of (B, h, w) maps, in each image's pixels."""
    sizes = torch.tensor([p.image.shape[:2] for p in batch])
    image_maps = resize_to_images(saliency(maps), sizes)
    coords, valid = box_tensor([[p.box] for p in batch], CPU)
    masks = box_masks(coords, valid, *image_maps.shape[-2:])
    return pointing_game(image_maps, coords, valid).float(), energy_in_box(image_maps, masks)


def evaluate(images: list[Pasted]) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """Per recipe label: (N,) pointing hits and energies; and each group's resolved layers."""
    results: dict[str, dict[str, list[float]]] = {}
    layer_names: dict[str, str] = {}
    for group in GROUPS:
        loaded = load_model("efficientnet_lite0", None, input_size=group.size)
        layers = resolve_layers(loaded.model, group.layer, loaded.input, CPU)
        explainer = Explainer(loaded.model, layers, parse_methods(",".join(group.methods)), fuse=group.fuse)
        layer_names[f"{group.layer} @{group.size}"] = explainer.layer_name
        started = time.perf_counter()
        for start in range(0, len(images), BATCH):
            batch = images[start : start + BATCH]
            x = torch.stack([preprocess(p.image, loaded.input) for p in batch])
            target = TargetSpec(per_sample=tuple(p.target for p in batch))
            for e in explainer.explain(x, target).explanations:
                hits, energy = scores(e.maps, batch)
                entry = results.setdefault(group.label(e.method), {"pointing": [], "energy": []})
                entry["pointing"] += hits.tolist()
                entry["energy"] += energy.tolist()
        print(f"  {group}: {explainer.layer_name}, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    results.update(refinecam(images))
    arrays = {k: {m: np.asarray(v) for m, v in d.items()} for k, d in results.items()}
    return arrays, layer_names


def refinecam(images: list[Pasted]) -> dict[str, dict[str, list[float]]]:
    """pytorch-grad-cam's RefineCAM on the same layers as `--layer fine`, 224 px."""
    try:
        import pytorch_grad_cam as grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        print("  pytorch-grad-cam not installed: no RefineCAM anchor", file=sys.stderr)
        return {}
    if not hasattr(grad_cam, "RefineCAM"):
        print("  this pytorch-grad-cam has no RefineCAM", file=sys.stderr)
        return {}
    loaded = load_model("efficientnet_lite0", None)
    names = [info.name for info in resolve_layers(loaded.model, "fine", loaded.input, CPU)]
    results: dict[str, dict[str, list[float]]] = {}
    for base, label in ((grad_cam.GradCAMPlusPlus, "RefineCAM gradcam++"), (grad_cam.LayerCAM, "RefineCAM layercam")):
        model = copy.deepcopy(loaded.model).eval()
        modules = dict(model.named_modules())
        cam = grad_cam.RefineCAM(model, [modules[n] for n in names], base_method=base)
        started = time.perf_counter()
        entry = results.setdefault(label, {"pointing": [], "energy": []})
        for start in range(0, len(images), BATCH):
            batch = images[start : start + BATCH]
            x = torch.stack([preprocess(p.image, loaded.input) for p in batch])
            maps = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(p.target) for p in batch]))
            hits, energy = scores(maps, batch)
            entry["pointing"] += hits.tolist()
            entry["energy"] += energy.tolist()
        for base_cam in cam.base_cam_per_layer:  # its hooks stay on until released
            base_cam.activations_and_grads.release()
        print(f"  {label} on {','.join(names)}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return results


# --- cost -------------------------------------------------------------------------------------


def costs(rounds: int) -> dict[str, float]:
    """ms per batch of 8 (gradcam): single layer vs fine (mean, product) at 224, and larger inputs."""
    contenders = {}
    for layer, fuse, size in (
        ("auto", "mean", 224),
        ("fine", "mean", 224),
        ("fine", "product", 224),
        ("auto", "mean", 320),
        ("fine", "product", 320),
    ):
        loaded = load_model("efficientnet_lite0", None, input_size=size)
        layers = resolve_layers(loaded.model, layer, loaded.input, CPU)
        explainer = Explainer(loaded.model, layers, parse_methods("gradcam"), fuse=fuse)
        x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
        label = (f"gradcam {layer}" + ("" if layer == "auto" else f" {fuse}")) + f" @{size}"
        contenders[label] = lambda e=explainer, x=x: e.explain(x, TargetSpec())
    return {k: v * 1e3 for k, v in best_times(contenders, rounds).items()}


# --- report -----------------------------------------------------------------------------------


def bin_label(i: int) -> str:
    lo, hi = BINS[i]
    return f"{lo * 100:.0f}-{hi * 100:.0f} %"


def summarise(results, images: list[Pasted]) -> dict[str, dict[str, list[float]]]:
    bins = np.asarray([p.bin for p in images])
    small = np.asarray([p.size <= 0.15 for p in images])
    large = np.asarray([p.size >= 0.40 for p in images])
    table = {}
    for label, metric in results.items():
        table[label] = {
            name: [float(values[bins == b].mean()) for b in range(len(BINS))]
            + [float(values[small].mean()), float(values[large].mean()), float(values.mean())]
            for name, values in metric.items()
        }
    return table


PLOTTED = (  # (label, colour, line style)
    ("center auto", "0.6", ":"),
    ("gradcam auto", "tab:blue", "-"),
    ("gradcam fine mean", "tab:blue", "--"),
    ("gradcam fine product", "tab:blue", "-."),
    ("layercam fine mean", "tab:green", "--"),
    ("layercam fine product", "tab:green", "-."),
    ("gradcam++ fine product", "tab:orange", "-."),
    ("RefineCAM gradcam++", "tab:red", ":"),
    ("RefineCAM layercam", "tab:purple", ":"),
    ("gradcam auto @320", "tab:cyan", "-"),
    ("layercam fine product @320", "tab:olive", "-."),
)


def plot(table, path: Path, count: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = [100 * (lo + hi) / 2 for lo, hi in BINS]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6))
    for label, colour, style in PLOTTED:
        if label not in table:
            continue
        for axis, metric in zip(axes, ("pointing", "energy"), strict=True):
            axis.plot(centres, table[label][metric][: len(BINS)], style, color=colour, marker="o", ms=4, label=label)
    for axis, title in zip(axes, ("pointing game (hit rate)", "energy in box"), strict=True):
        axis.set_xscale("log")
        axis.set_xticks(centres, [bin_label(i) for i in range(len(BINS))])
        axis.minorticks_off()
        axis.set_xlabel("object's longer side / image's short side")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.set_ylim(0, 1)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(f"Pasted objects, EfficientNet-Lite0 (pretrained), {count} images; 224 px unless @size")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(table, layer_names, timing, count: int, seed: int, wall: float) -> str:
    lines = [
        "# Pasted-object benchmark",
        "",
        f"`python benchmarks/pasted.py --images {count} --seed {seed}`: {count} images "
        f"({count // len(BINS)} per size bin), EfficientNet-Lite0 (pretrained, embedded), CPU, "
        f"torch {torch.__version__}, pytorch-grad-cam {anchor_version('grad-cam')}, {platform.machine()}; "
        f"{wall / 60:.0f} min in all.",
        "",
        "Layers: " + "; ".join(f"{k} = `{v}`" for k, v in layer_names.items()) + ".",
        "",
        "Size = the object's longer side over the image's short side. Pointing: share of maps whose",
        "maximum lies within 15 px of the box; energy: share of the map's mass inside the box.",
        "",
    ]
    heads = [bin_label(i) for i in range(len(BINS))] + ["<= 15 %", ">= 40 %", "all"]
    for metric, title in (("pointing", "Pointing game"), ("energy", "Energy in box")):
        lines += [f"## {title}", "", header("recipe", *heads)]
        for label, metric_values in sorted(table.items(), key=lambda kv: -kv[1][metric][len(BINS)]):
            lines.append(row(label, *(f"{v:.3f}" for v in metric_values[metric])))
        lines.append("")
    return "\n".join(lines) + "\n" + cost_section(timing, "")


COST_HEADING = "## Cost (gradcam, batch of 8, best of rounds, interleaved)"


def cost_section(timing: dict[str, float], note: str) -> str:
    base = timing["gradcam auto @224"]
    lines = [COST_HEADING, "", *([note, ""] if note else []), header("pass", "ms/batch", "x single")]
    lines += [row(label, f"{ms:.0f}", f"{ms / base:.2f}") for label, ms in timing.items()]
    return "\n".join(lines) + "\n"


def retime(rounds: int) -> None:
    """`--costs`: time the passes again (on a quiet machine) and replace only the cost table
    of PASTED.md and pasted.json; the accuracy tables stay as their run left them."""
    timing = costs(rounds)
    note = (
        f"Re-timed alone with `python benchmarks/pasted.py --costs --rounds {rounds}` "
        f"({time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.machine()}, {torch.get_num_threads()} threads, "
        "freed memory kept for reuse as in the CLI), not during the accuracy run."
    )
    report_path, saved_path = OUT / "PASTED.md", OUT / "pasted.json"
    text = report_path.read_text()
    report_path.write_text(text[: text.index(COST_HEADING)] + cost_section(timing, note))
    saved = json.loads(saved_path.read_text())
    saved_path.write_text(json.dumps(saved | {"timing_ms": timing}, indent=1))
    print(cost_section(timing, note))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds")
    parser.add_argument("--examples", action="store_true", help="also write a few pasted images to /tmp")
    parser.add_argument("--replot", action="store_true", help="only redraw pasted.png from pasted.json")
    parser.add_argument("--costs", action="store_true", help="only re-time the passes (the cost table)")
    args = parser.parse_args()
    reuse_freed_memory()  # as the CLI's process does
    if args.costs:
        retime(args.rounds)
        return
    if args.replot:
        saved = json.loads((OUT / "pasted.json").read_text())
        plot(saved["table"], OUT / "pasted.png", saved["images"])
        return
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    targets = object_targets(load_model("efficientnet_lite0", None))
    print(f"targets: {targets}", file=sys.stderr)
    images = paste_set(args.images, args.seed, targets)
    if args.examples:
        for i, p in enumerate(images[:10]):
            shot = np.ascontiguousarray(p.image[:, :, ::-1])
            cv2.rectangle(shot, p.box[:2], p.box[2:], (0, 255, 0), 1)
            cv2.imwrite(f"/tmp/pasted_{i}.png", shot)
    results, layer_names = evaluate(images)
    timing = costs(args.rounds)
    table = summarise(results, images)
    wall = time.perf_counter() - started
    plot(table, OUT / "pasted.png", len(images))
    (OUT / "PASTED.md").write_text(report(table, layer_names, timing, len(images), args.seed, wall))
    (OUT / "pasted.json").write_text(
        json.dumps(
            {
                "images": len(images),
                "seed": args.seed,
                "bins": BINS,
                "layers": layer_names,
                "timing_ms": timing,
                "table": table,
                "columns": [*(bin_label(i) for i in range(len(BINS))), "<=15%", ">=40%", "all"],
            },
            indent=1,
        )
    )
    print((OUT / "PASTED.md").read_text())


if __name__ == "__main__":
    main()
