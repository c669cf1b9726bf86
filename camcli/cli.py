"""The `camcli` command line: parse options, call the pipeline, report. Nothing else."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from camcli import __version__
from camcli.engine import Explainer, parse_target, resolve_device
from camcli.errors import CamcliError, ExitCode, UsageError
from camcli.io import DEFAULT_MAX_PIXELS, OVERLAY_FORMATS, check_writable, collect_inputs
from camcli.methods import parse_methods
from camcli.models import DEFAULT_MODEL, load_model, resolve_layer
from camcli.pipeline import ExplainRun, RunOptions
from camcli.render import COLORMAPS
from camcli.report import write_report

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


@app.command()
def explain(
    inputs: Annotated[list[str], typer.Argument(help="Images, folders (recursed), or - for paths on stdin.")],
    method: Annotated[
        str, typer.Option("-m", "--method", help="Comma list of methods, or 'all' (`camcli methods`).")
    ] = "gradcam",
    model: Annotated[
        str, typer.Option("--model", help="efficientnet_lite0, a torchvision name, or package.module:factory.")
    ] = DEFAULT_MODEL,
    weights: Annotated[
        str | None, typer.Option("--weights", help="DEFAULT, an enum member (IMAGENET1K_V1), none, or a .pth.")
    ] = None,
    layer: Annotated[str, typer.Option("--layer", help="auto, or a dotted module name.")] = "auto",
    target: Annotated[
        str | None, typer.Option("-t", "--target", help="top1 (default), a class index or a class name.")
    ] = None,
    topk: Annotated[int | None, typer.Option("-k", "--topk", help="Explain the K best classes.", min=1)] = None,
    batch_size: Annotated[int, typer.Option("-b", "--batch-size", min=1, help="Images per forward.")] = 8,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
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
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=1, help="Masked inputs per Score-CAM forward.")] = 32,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Image decoding threads.")] = 2,
    max_pixels: Annotated[
        int, typer.Option("--max-pixels", min=1, help="Refuse larger images from their header (decompression bombs).")
    ] = DEFAULT_MAX_PIXELS,
    report: Annotated[bool, typer.Option("--report", help="Then write OUT/index.html (`camcli report`).")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Explain images: overlays, optional .npy heatmaps and one JSON per image in --out."""
    try:
        code = _explain(**locals())
    except CamcliError as exc:
        if debug:
            raise
        stderr.print(f"camcli: error: {exc}", markup=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("camcli: interrupted", markup=False)
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    raise typer.Exit(code)


def _explain(**opts: Any) -> int:
    if opts["colormap"] not in COLORMAPS:
        raise UsageError(f"unknown colormap {opts['colormap']!r}; use one of {', '.join(COLORMAPS)}")
    if opts["overlay_format"] not in OVERLAY_FORMATS:
        raise UsageError(f"unknown overlay format {opts['overlay_format']!r}; use one of {', '.join(OVERLAY_FORMATS)}")
    if opts["target"] is not None and opts["topk"] is not None:
        raise UsageError("--target and --topk exclude each other")
    methods = parse_methods(opts["method"])
    device = resolve_device(opts["device"])
    stdin = sys.stdin if "-" in opts["inputs"] else None
    items = collect_inputs(
        opts["inputs"], stdin, warn=lambda line: stderr.print(f"camcli: {line}", markup=False, soft_wrap=True)
    )
    check_writable(opts["out"])
    loaded = load_model(
        opts["model"],
        opts["weights"],
        input_size=opts["input_size"],
        mean=_floats(opts["mean"], "--mean"),
        std=_floats(opts["std"], "--std"),
    )
    loaded.model.to(device)
    layer = resolve_layer(loaded.model, opts["layer"], loaded.input, device)
    target = parse_target(opts["target"], opts["topk"], loaded.categories, layer.num_classes)
    explainer = Explainer(loaded.model, layer, methods, chunk_size=opts["chunk_size"])
    if not items:
        stderr.print(f"camcli: no images found in {' '.join(opts['inputs'])}", markup=False, soft_wrap=True)
        return ExitCode.IMAGE_FAILED
    request = {
        "model": loaded.name,
        "weights": loaded.weights,
        "layer": layer.name,
        "methods": [m.name for m in methods],
        "target": opts["target"] or "top1",
        "topk": opts["topk"] or 1,
        "input": loaded.input.to_json(),
        "heatmap": opts["save_heatmap"],
        "overlay_format": opts["overlay_format"],
    }
    options = RunOptions(
        out_dir=opts["out"],
        batch_size=opts["batch_size"],
        colormap=opts["colormap"],
        alpha=opts["alpha"],
        save_heatmap=opts["save_heatmap"],
        overwrite=opts["overwrite"],
        overlay_format=opts["overlay_format"],
        workers=opts["workers"],
        max_pixels=opts["max_pixels"],
    )
    run = ExplainRun(loaded, explainer, target, device, options, request)

    def emit(record: dict[str, Any]) -> None:
        if opts["jsonl"]:
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
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
    try:
        ok = _write_report(out, labels_expected, quiet)
    except CamcliError as exc:
        if debug:
            raise
        stderr.print(f"camcli: error: {exc}", markup=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("camcli: interrupted", markup=False)
        raise typer.Exit(ExitCode.INTERRUPTED) from None
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


def main() -> None:
    """Console-script entry point."""
    app()
