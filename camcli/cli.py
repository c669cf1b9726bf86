"""The `camcli` command line: parse options, call the pipeline, report. Nothing else."""

from __future__ import annotations

import inspect
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from camcli import __version__, commands
from camcli.boxes import load_boxes
from camcli.engine import Explainer, parse_target, resolve_device
from camcli.errors import CamcliError, ExitCode, UsageError
from camcli.evaluate import summarise, table, write_summary
from camcli.filters import AscentOptions, filter_grid, kernel_grid
from camcli.io import (
    DEFAULT_MAX_PIXELS,
    OVERLAY_FORMATS,
    atomic_write,
    check_writable,
    collect_inputs,
    encode_image,
    json_text,
)
from camcli.methods import list_methods, parse_methods
from camcli.metrics import SUBSTRATES, MetricOptions
from camcli.models import DEFAULT_MODEL, InputSpec, check_labels, load_model, resolve_layer
from camcli.pipeline import ExplainRun, RunOptions
from camcli.precision import autocast_dtype
from camcli.render import COLORMAPS
from camcli.report import write_report
from camcli.schema import schema_text
from camcli.summary import SummaryTable

stderr = Console(stderr=True, highlight=False)

# click's UsageError as raised by the click typer runs on (recent typer vendors its own copy)
_CLICK_USAGE_ERROR: type[Exception] = typer.BadParameter.__base__


class _OneLineUsageErrors(typer.core.TyperGroup):
    """Click's own usage errors (a bad option value, an unknown option) as one line and
    exit 2, like camcli's, instead of a usage block and a box."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _CLICK_USAGE_ERROR as exc:
            stderr.print(f"camcli: error: {exc.format_message()}", markup=False, soft_wrap=True)
            raise typer.Exit(ExitCode.USAGE) from None


app = typer.Typer(
    cls=_OneLineUsageErrors,
    help="See where a CNN image classifier looks: heatmap overlays and JSON for images and folders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _versions() -> str:
    import cv2
    import torch
    import torchvision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return (
        f"camcli {__version__} (torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"opencv {cv2.__version__}, device {device})"
    )


def _show_version(value: bool) -> None:
    if value:
        typer.echo(_versions())
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Show versions and exit.")
    ] = False,
) -> None:
    """camcli: class activation maps from the command line."""


def _floats(value: str | None, option: str) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise UsageError(f"{option} expects three comma-separated numbers, not {value!r}") from None
    if len(parts) != 3:
        raise UsageError(f"{option} expects three comma-separated numbers, not {value!r}")
    return parts  # type: ignore[return-value]


def _complete_methods(incomplete: str) -> list[str]:
    """Shell completion of `-m a,b,c`: completes the last name of the comma list."""
    done, _, last = incomplete.rpartition(",")
    prefix = f"{done}," if done else ""
    return [prefix + name for name in [*list_methods(), "all"] if name.startswith(last)]


@app.command()
def explain(
    inputs: Annotated[list[str], typer.Argument(help="Images, folders (recursed), or - for paths on stdin.")],
    method: Annotated[
        str,
        typer.Option(
            "-m",
            "--method",
            help="Comma list of methods, or 'all' (`camcli methods`).",
            autocompletion=_complete_methods,
        ),
    ] = "gradcam",
    model: Annotated[
        str, typer.Option("--model", help="efficientnet_lite0, a torchvision name, or package.module:factory.")
    ] = DEFAULT_MODEL,
    weights: Annotated[
        str | None, typer.Option("--weights", help="DEFAULT, an enum member (IMAGENET1K_V1), none, or a .pth.")
    ] = None,
    layer: Annotated[
        str, typer.Option("--layer", help="auto, a dotted module name, or a,b to fuse CAM maps of several.")
    ] = "auto",
    target: Annotated[
        str | None, typer.Option("-t", "--target", help="top1 (default), a class index or a class name.")
    ] = None,
    topk: Annotated[int | None, typer.Option("-k", "--topk", help="Explain the K best classes.", min=1)] = None,
    batch_size: Annotated[int, typer.Option("-b", "--batch-size", min=1, help="Images per forward.")] = 8,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    precision: Annotated[
        str,
        typer.Option(
            "--precision", help="fp32 (exact), or bf16 / fp16 autocast where the device has it (maps reduced in fp32)."
        ),
    ] = "fp32",
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")] = Path("camcli-out"),
    colormap: Annotated[str, typer.Option("--colormap", help=f"One of {', '.join(COLORMAPS)}.")] = "jet",
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Heatmap opacity.")] = 0.5,
    overlay_format: Annotated[
        str, typer.Option("--overlay-format", help=f"Overlay file format: {', '.join(OVERLAY_FORMATS)}.")
    ] = "png",
    save_heatmap: Annotated[
        bool, typer.Option("--save-heatmap", help="Also write float32 .npy maps at the image's size.")
    ] = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Print one JSON object per image to stdout.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print errors only.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo images finished by an earlier run.")] = False,
    input_size: Annotated[int | None, typer.Option("--input-size", min=8, help="Model input side.")] = None,
    mean: Annotated[str | None, typer.Option("--mean", help="Normalisation mean, e.g. 0.5,0.5,0.5.")] = None,
    std: Annotated[str | None, typer.Option("--std", help="Normalisation std, e.g. 0.5,0.5,0.5.")] = None,
    # 32: the fastest per input on a 2-core CPU (Lite0, channels_last: 17.2 / 15.4 / 28.3 ms per
    # input at 16 / 32 / 64, benchmarks/RESULTS.md), and ~20 MB of input per chunk at 224 px.
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=1, help="Masked inputs per Score-CAM forward.")] = 32,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Image decoding threads.")] = 2,
    max_pixels: Annotated[
        int, typer.Option("--max-pixels", min=1, help="Refuse larger images from their header (decompression bombs).")
    ] = DEFAULT_MAX_PIXELS,
    report: Annotated[bool, typer.Option("--report", help="Then write OUT/index.html (`camcli report`).")] = False,
    metrics: Annotated[
        bool, typer.Option("--metrics", help="Score each map: deletion/insertion AUC, average drop, increase.")
    ] = False,
    boxes: Annotated[
        Path | None, typer.Option("--boxes", help="JSON boxes per image: adds pointing game, energy in box.")
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Deletion/insertion steps.")] = 20,
    substrate: Annotated[
        str, typer.Option("--substrate", help=f"What deletion puts in: {', '.join(SUBSTRATES)}.")
    ] = "zero",
    labels: Annotated[
        Path | None, typer.Option("--labels", help="Class names: one per line, or a JSON list (for your own models).")
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option("--include", help="Only inputs matching this glob (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Skip inputs matching this glob (repeatable).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be explained or skipped; explain and write nothing.")
    ] = False,
    summary_csv: Annotated[
        Path | None, typer.Option("--summary", help="Also write a CSV: one row per image x method.")
    ] = None,
    grid: Annotated[
        bool, typer.Option("--grid", help="Also write <name>.grid.png: the image and every method side by side.")
    ] = False,
    samples: Annotated[int | None, typer.Option("--samples", min=1, help="SmoothGrad: noisy copies (25).")] = None,
    noise: Annotated[
        float | None, typer.Option("--noise", min=0.0, help="SmoothGrad: noise std / input range (0.15).")
    ] = None,
    patch: Annotated[int | None, typer.Option("--patch", min=1, help="Occlusion: patch side in px (32).")] = None,
    stride: Annotated[
        int | None, typer.Option("--stride", min=1, help="Occlusion: patch step in px (patch/2).")
    ] = None,
    occlusion_fill: Annotated[
        str | None, typer.Option("--occlusion-fill", help="Occlusion: mean (default), blur, or R,G,B in 0-255.")
    ] = None,
    tiles: Annotated[int | None, typer.Option("--tiles", min=1, help="activations: channels shown (16).")] = None,
    scorecam_top: Annotated[
        int | None,
        typer.Option(
            "--scorecam-top",
            min=1,
            help="Score-CAM: score only the N strongest channels (an approximation; default: all).",
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Explain images: overlays, optional .npy heatmaps and one JSON per image in --out."""
    with _one_line_errors(debug):
        code = _explain(**locals())
    raise typer.Exit(code)


def _method_settings(opts: dict[str, Any], spec: InputSpec | None) -> dict[str, Any]:
    """The options methods take. An `--occlusion-fill R,G,B` colour (0-255) becomes
    normalised model input once the model's normalisation (`spec`) is known."""
    fill = opts["occlusion_fill"]
    if fill is not None and fill.lower() in ("mean", "blur"):
        fill = fill.lower()
    elif fill is not None:
        rgb = _floats(fill, "--occlusion-fill")
        assert rgb is not None
        if spec is None:  # checked now, converted once the model is loaded
            fill = None
        else:
            fill = tuple((v / 255.0 - m) / s for v, m, s in zip(rgb, spec.mean, spec.std, strict=True))
    settings = {
        "samples": opts["samples"],
        "noise": opts["noise"],
        "patch": opts["patch"],
        "stride": opts["stride"],
        "fill": fill,
        "tiles": opts["tiles"],
        "scorecam_top": opts["scorecam_top"],
    }
    return {key: value for key, value in settings.items() if value is not None}


_METHOD_OPTIONS = ("samples", "noise", "patch", "stride", "occlusion_fill", "tiles", "scorecam_top")


def _explain(**opts: Any) -> int:
    if opts["colormap"] not in COLORMAPS:
        raise UsageError(f"unknown colormap {opts['colormap']!r}; use one of {', '.join(COLORMAPS)}")
    if opts["overlay_format"] not in OVERLAY_FORMATS:
        raise UsageError(f"unknown overlay format {opts['overlay_format']!r}; use one of {', '.join(OVERLAY_FORMATS)}")
    if opts["target"] is not None and opts["topk"] is not None:
        raise UsageError("--target and --topk exclude each other")
    methods = parse_methods(opts["method"], _method_settings(opts, None))  # usage errors before loading
    metric_options, box_index = _metric_options(opts)
    device = resolve_device(opts["device"])
    autocast_dtype(opts["precision"], device)  # refused before anything is loaded
    stdin = sys.stdin if "-" in opts["inputs"] else None
    items = collect_inputs(
        opts["inputs"],
        stdin,
        opts["include"] or (),
        opts["exclude"] or (),
        warn=lambda line: stderr.print(f"camcli: {line}", markup=False, soft_wrap=True),
    )
    if not opts["dry_run"]:
        check_writable(opts["out"])
    loaded = load_model(
        opts["model"],
        opts["weights"],
        input_size=opts["input_size"],
        mean=_floats(opts["mean"], "--mean"),
        std=_floats(opts["std"], "--std"),
        labels=opts["labels"],
    )
    loaded.model.to(device)
    methods = parse_methods(opts["method"], _method_settings(opts, loaded.input))
    names = dict.fromkeys(name.strip() for name in opts["layer"].split(",") if name.strip())
    layers = [resolve_layer(loaded.model, name, loaded.input, device) for name in names or ["auto"]]
    layer = layers[0]
    check_labels(loaded, layer.num_classes)
    target = parse_target(opts["target"], opts["topk"], loaded.categories, layer.num_classes)
    explainer = Explainer(loaded.model, layers, methods, chunk_size=opts["chunk_size"], precision=opts["precision"])
    if not items:
        stderr.print(f"camcli: no images found in {' '.join(opts['inputs'])}", markup=False, soft_wrap=True)
        return ExitCode.IMAGE_FAILED
    if box_index is not None and not any(box_index.lookup(item) for item in items):
        stderr.print(
            f"camcli: warning: {box_index.source} has boxes for none of the {len(items)} images",
            markup=False,
            soft_wrap=True,
        )
    request = {
        "model": loaded.name,
        "weights": loaded.weights,
        "layer": explainer.layer_name,
        "methods": [m.name for m in methods],
        "target": opts["target"] or "top1",
        "topk": opts["topk"] or 1,
        "input": loaded.input.to_json(),
        "heatmap": opts["save_heatmap"],
        "overlay_format": opts["overlay_format"],
    }
    if metric_options is not None:
        request["metrics"] = {
            "steps": metric_options.steps,
            "substrate": metric_options.substrate,
            "boxes": None if box_index is None else box_index.source,
        }
    if opts["precision"] != "fp32":  # only then, so earlier runs' JSON still matches for resuming
        request["precision"] = opts["precision"]
        if explainer.fp32_methods:
            request["fp32_methods"] = explainer.fp32_methods
            stderr.print(
                f"camcli: {', '.join(explainer.fp32_methods)} computed in fp32: under {opts['precision']} "
                "their maps drift from fp32 (or share a pass with one that does)",
                markup=False,
                soft_wrap=True,
            )
    if opts["grid"]:  # only then, so earlier runs' JSON still matches for resuming
        request["grid"] = True
    method_options = {name: opts[name] for name in _METHOD_OPTIONS if opts[name] is not None}
    if method_options:  # a changed --samples or --scorecam-top redoes the images
        request["method_options"] = method_options
    options = RunOptions(
        out_dir=opts["out"],
        batch_size=opts["batch_size"],
        colormap=opts["colormap"],
        alpha=opts["alpha"],
        save_heatmap=opts["save_heatmap"],
        overwrite=opts["overwrite"],
        overlay_format=opts["overlay_format"],
        workers=opts["workers"],
        metrics=metric_options,
        boxes=box_index,
        grid=opts["grid"],
        grid_only=opts.get("grid_only", False),
        panel_size=opts.get("panel_size", 224),
        max_pixels=opts["max_pixels"],
    )
    run = ExplainRun(loaded, explainer, target, device, options, request)
    if opts["dry_run"]:
        return _dry_run(run, items, opts["out"])
    summary_table = SummaryTable(items, opts["out"]) if opts["summary_csv"] else None

    def emit(record: dict[str, Any]) -> None:
        if opts.get("records") is not None:  # `camcli evaluate` averages them
            opts["records"].append(record)
        if summary_table is not None:
            summary_table.add(record)
        if opts["jsonl"]:
            sys.stdout.write(json_text(record) + "\n")
            sys.stdout.flush()

    def report_error(message: str) -> None:
        stderr.print(f"camcli: {message}", markup=False, soft_wrap=True)

    show_progress = stderr.is_terminal and not opts["quiet"] and not os.environ.get("CI")
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=stderr,
        disable=not show_progress,
    ) as progress:
        task = progress.add_task("explaining", total=len(items))
        summary = run.run(items, emit, report_error, lambda n: progress.advance(task, n))
    if summary_table is not None:
        try:
            atomic_write(opts["summary_csv"], summary_table.to_csv())
        except OSError as exc:
            report_error(f"{opts['summary_csv']}: cannot write the summary: {exc.strerror or exc}")
            return ExitCode.IMAGE_FAILED
    if not opts["quiet"] or summary.interrupted:
        stopped = ""
        if summary.interrupted:
            stopped = f"interrupted, {len(items) - summary.done - summary.skipped - summary.failed} not started; "
        stderr.print(
            f"camcli: {stopped}{summary.done} explained, {summary.skipped} already done, "
            f"{summary.failed} failed -> {opts['out']}",
            markup=False,
            soft_wrap=True,
        )
    if summary.interrupted:
        return ExitCode.INTERRUPTED
    report_ok = _write_report(opts["out"], None, opts["quiet"]) if opts["report"] else True
    return ExitCode.IMAGE_FAILED if summary.failed or not report_ok else ExitCode.OK


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="An output folder of `camcli explain`.")],
    labels_expected: Annotated[
        Path | None,
        typer.Option(
            "--labels-expected", help="JSON {image: expected class name or index}; marks images whose top-1 differs."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print errors only.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Write OUT/index.html: every image's thumbnail, top-5 and overlays on one static page."""
    with _one_line_errors(debug):
        ok = _write_report(out, labels_expected, quiet)
    typer.echo(out / "index.html")
    raise typer.Exit(ExitCode.OK if ok else ExitCode.IMAGE_FAILED)


def _write_report(out: Path, labels_expected: Path | None, quiet: bool) -> bool:
    """Write the report with a progress bar over the thumbnails; False if a file was unusable."""
    show_progress = stderr.is_terminal and not quiet and not os.environ.get("CI")
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=stderr,
        disable=not show_progress,
    ) as progress:
        task = progress.add_task("thumbnails", total=None)
        summary = write_report(
            out,
            labels_expected,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            report_problem=lambda message: stderr.print(f"camcli: {message}", markup=False, soft_wrap=True),
        )
    if not quiet:
        mismatched = f", {summary.mismatched} not the expected class" if labels_expected is not None else ""
        unmatched = f" ({summary.unmatched_labels} expected labels named no image)" if summary.unmatched_labels else ""
        stderr.print(
            f"camcli: report of {summary.images} images ({summary.failed} failed, {summary.warned} with warnings"
            f"{mismatched}){unmatched} -> {summary.path}",
            markup=False,
            soft_wrap=True,
        )
    return not summary.problems


def _metric_options(opts: dict[str, Any]) -> tuple[MetricOptions | None, Any]:
    """--metrics, --boxes (implies --metrics), --steps, --substrate."""
    if opts["substrate"] not in SUBSTRATES:
        raise UsageError(f"unknown substrate {opts['substrate']!r}; use one of {', '.join(SUBSTRATES)}")
    if opts["boxes"] is not None and opts["topk"] is not None:
        raise UsageError("--boxes and --topk exclude each other: a box names one target per image")
    box_index = load_boxes(opts["boxes"]) if opts["boxes"] is not None else None
    if not opts["metrics"] and box_index is None:
        return None, None
    return MetricOptions(steps=opts["steps"], substrate=opts["substrate"], chunk_size=opts["chunk_size"]), box_index


@app.command()
def evaluate(
    folder: Annotated[list[str], typer.Argument(help="Images or folders (recursed).")],
    boxes: Annotated[
        Path | None, typer.Option("--boxes", help="JSON boxes per image: adds pointing game, energy in box.")
    ] = None,
    method: Annotated[
        str, typer.Option("-m", "--method", help="Comma list of methods to compare.")
    ] = "gradcam,gradcam++,scorecam",
    model: Annotated[str, typer.Option("--model", help="As for explain.")] = DEFAULT_MODEL,
    weights: Annotated[str | None, typer.Option("--weights", help="As for explain.")] = None,
    layer: Annotated[str, typer.Option("--layer", help="auto, or a dotted module name.")] = "auto",
    input_size: Annotated[int | None, typer.Option("--input-size", min=8, help="Model input side.")] = None,
    mean: Annotated[str | None, typer.Option("--mean", help="Normalisation mean, e.g. 0.5,0.5,0.5.")] = None,
    std: Annotated[str | None, typer.Option("--std", help="Normalisation std, e.g. 0.5,0.5,0.5.")] = None,
    target: Annotated[
        str | None, typer.Option("-t", "--target", help="top1 (default), a class index or name; a box's class wins.")
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Deletion/insertion steps.")] = 20,
    substrate: Annotated[
        str, typer.Option("--substrate", help=f"What deletion puts in: {', '.join(SUBSTRATES)}.")
    ] = "zero",
    batch_size: Annotated[int, typer.Option("-b", "--batch-size", min=1, help="Images per forward.")] = 8,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    out: Annotated[
        Path, typer.Option("-o", "--out", help="Folder for summary.csv, summary.json and the per-image outputs.")
    ] = Path("camcli-eval"),
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=1, help="Perturbed inputs per forward.")] = 32,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo images finished by an earlier run.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print errors and the table only.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Score methods over images: a table of metric means per method, also written as CSV and JSON."""
    given = dict(locals())
    opts = {n: p.default for n, p in inspect.signature(explain).parameters.items() if p.default is not p.empty}
    opts.update({k: v for k, v in given.items() if k != "folder"})
    opts.update(inputs=given["folder"], metrics=True, records=[])
    with _one_line_errors(debug):
        code = _explain(**opts)
        summaries = summarise(opts["records"], [m.name for m in parse_methods(method)])
        csv_path, json_path = write_summary(out, summaries, opts["records"][0]["request"] if opts["records"] else {})
    console = Console(highlight=False)
    if not console.is_terminal:  # a file or pipe gets the whole table, not an 80-column squeeze
        console = Console(highlight=False, width=160)
    console.print(table(summaries, f"camcli evaluate: {len(opts['records'])} images"))
    if not quiet:
        stderr.print(f"camcli: wrote {csv_path} and {json_path}", markup=False)
    raise typer.Exit(code)


@contextmanager
def _one_line_errors(debug: bool = False) -> Iterator[None]:
    """Every command's error handling, in one place: a camcli error is one line on stderr
    and its exit code (a traceback only with --debug); Ctrl-C outside a run is exit 130."""
    try:
        yield
    except CamcliError as exc:
        if debug:
            raise
        stderr.print(f"camcli: error: {exc}", markup=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("camcli: interrupted", markup=False)
        raise typer.Exit(ExitCode.INTERRUPTED) from None


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


@app.command()
def compare(
    inputs: Annotated[list[str], typer.Argument(help="Images, folders (recursed), or - for paths on stdin.")],
    method: Annotated[
        str, typer.Option("-m", "--method", help="Comma list of methods, or 'all'.", autocompletion=_complete_methods)
    ] = "cam,gradcam,gradcam++,scorecam",
    model: Annotated[str, typer.Option("--model", help="As for explain.")] = DEFAULT_MODEL,
    weights: Annotated[str | None, typer.Option("--weights", help="As for explain.")] = None,
    layer: Annotated[str, typer.Option("--layer", help="auto, or a dotted module name.")] = "auto",
    target: Annotated[str | None, typer.Option("-t", "--target", help="top1, a class index or name.")] = None,
    topk: Annotated[
        int | None, typer.Option("-k", "--topk", min=1, help="One row per each of the K best classes.")
    ] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")] = Path("camcli-out"),
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    colormap: Annotated[str, typer.Option("--colormap", help=f"One of {', '.join(COLORMAPS)}.")] = "jet",
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Heatmap opacity.")] = 0.5,
    panel_size: Annotated[int, typer.Option("--panel-size", min=32, help="Panel height in pixels.")] = 224,
    input_size: Annotated[int | None, typer.Option("--input-size", min=8, help="Model input side.")] = None,
    batch_size: Annotated[int, typer.Option("-b", "--batch-size", min=1, help="Images per forward.")] = 8,
    labels: Annotated[Path | None, typer.Option("--labels", help="Class names: one per line, or a JSON list.")] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print errors only.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Side-by-side grids: OUT/<name>.grid.png with the image, then one overlay per method (and target)."""
    given = dict(locals())
    # every other explain option at its default, so options added to explain later just work
    opts = {
        name: param.default
        for name, param in inspect.signature(explain).parameters.items()
        if param.default is not inspect.Parameter.empty
    }
    opts |= given | {"grid_only": True, "overwrite": True}
    with _one_line_errors(debug):
        code = _explain(**opts)
    raise typer.Exit(code)


@app.command()
def methods(json_out: Annotated[bool, typer.Option("--json", help="JSON for machines.")] = False) -> None:
    """Every method: name, paper, what it needs from the model, relative cost."""
    rows = commands.method_rows()
    if json_out:
        _print_json(rows)
    else:
        typer.echo(commands.format_methods(rows))


@app.command()
def models(
    pattern: Annotated[str | None, typer.Argument(help="Glob on the name, e.g. 'resnet*' or 'timm:convnext*'.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="JSON for machines.")] = False,
) -> None:
    """Models --model accepts: the embedded default, torchvision's, timm's (when installed)."""
    entries = commands.model_entries(pattern)
    if json_out:
        _print_json(commands.models_json(entries))
        return
    if not entries:
        stderr.print(f"camcli: no model matches {pattern!r}", markup=False)
        raise typer.Exit(ExitCode.USAGE)
    typer.echo(commands.format_models(entries))


@app.command()
def layers(
    model: Annotated[
        str, typer.Argument(help="A --model name: efficientnet_lite0, resnet50, timm:NAME, pkg.mod:fn.")
    ] = (DEFAULT_MODEL),
    weights: Annotated[
        str | None,
        typer.Option("--weights", help="Weights to build with (default: none, shapes do not depend on them)."),
    ] = "none",
    input_size: Annotated[int | None, typer.Option("--input-size", min=8, help="Model input side.")] = None,
    depth: Annotated[int | None, typer.Option("--depth", min=1, help="Show modules up to this nesting depth.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "cpu",
    json_out: Annotated[bool, typer.Option("--json", help="JSON for machines.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """The model's modules with output shapes (one dry forward); the layer --layer auto picks is marked."""
    with _one_line_errors(debug):
        loaded = load_model(model, weights, input_size=input_size)
        torch_device = resolve_device(device)
        loaded.model.to(torch_device)
        rows, auto, logits = commands.layer_rows(loaded.model, loaded.input, torch_device)
    if json_out:
        _print_json({"model": loaded.name, "auto": auto, "logits": logits, "layers": [vars(r) for r in rows]})
    else:
        typer.echo(commands.format_layers(rows, auto, logits, loaded.name, depth))


@app.command()
def schema() -> None:
    """Print the JSON Schema of the per-image JSON files."""
    typer.echo(schema_text(), nl=False)


@app.command()
def version(json_out: Annotated[bool, typer.Option("--json", help="JSON for machines.")] = False) -> None:
    """Versions of camcli, torch, torchvision, OpenCV, timm and the devices camcli can use."""
    info = commands.version_info()
    if json_out:
        _print_json(info)
    else:
        typer.echo(commands.format_version(info))


@app.command()
def filters(
    model: Annotated[str, typer.Argument(help="efficientnet_lite0, a torchvision name, or package.module:factory.")],
    layer: Annotated[
        str | None, typer.Option("--layer", help="Dotted module name whose channels to visualise.")
    ] = None,
    count: Annotated[int, typer.Option("-n", "--count", min=1, help="The first N channels.")] = 16,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Gradient-ascent steps.")] = AscentOptions.steps,
    size: Annotated[int, typer.Option("--size", min=8, help="Side of the optimised images.")] = AscentOptions.size,
    kernels: Annotated[bool, typer.Option("--kernels", help="Also draw the first conv's kernels as RGB.")] = False,
    weights: Annotated[
        str | None, typer.Option("--weights", help="DEFAULT, an enum member (IMAGENET1K_V1), none, or a .pth.")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")] = Path("camcli-out"),
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """What a layer's filters respond to: activation maximisation of its first N channels
    as a grid PNG, and with --kernels the raw first-layer kernels."""
    with _one_line_errors(debug):
        for path in _filters(model, layer, count, steps, size, kernels, weights, device, out):
            stderr.print(f"camcli: wrote {path}", markup=False)


def _filters(
    model: str,
    layer: str | None,
    count: int,
    steps: int,
    size: int,
    kernels: bool,
    weights: str | None,
    device_name: str,
    out: Path,
) -> list[Path]:
    if layer is None and not kernels:
        raise UsageError("name a layer with --layer, or ask for --kernels")
    device = resolve_device(device_name)
    check_writable(out)
    loaded = load_model(model, weights)
    loaded.model.to(device)
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in loaded.name)
    pictures = {}
    if layer is not None:
        info = resolve_layer(loaded.model, layer, loaded.input, device)
        grid = filter_grid(loaded.model, info, loaded.input, count, AscentOptions(steps=steps, size=size))
        pictures[out / f"{stem}.{info.name}.filters.png"] = grid
    if kernels:
        pictures[out / f"{stem}.kernels.png"] = kernel_grid(loaded.model)
    for path, picture in pictures.items():
        atomic_write(path, encode_image(picture))
    return list(pictures)


def _dry_run(run: ExplainRun, items: list[Any], out: Path) -> int:
    """Print one line per input: what a real run would do with it."""
    todo = 0
    for item in items:
        done = run.is_finished(item)
        todo += not done
        typer.echo(f"{'skip' if done else 'explain'}\t{item.path}\t{out / item.key}.json")
    stderr.print(f"camcli: dry run: {todo} to explain, {len(items) - todo} already done; nothing written", markup=False)
    return ExitCode.OK


def main() -> None:
    """Console-script entry point."""
    app()
