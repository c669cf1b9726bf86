"""The `camcli` command line: parse options, call the pipeline, report. Nothing else."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from camcli import __version__
from camcli.choices import COLORMAPS, FUSIONS, SMOOTHINGS, SUBSTRATES
from camcli.errors import CamcliError, ExitCode, Interrupted, OptionError, UsageError
from camcli.filters import AscentOptions
from camcli.io import (
    DEFAULT_MAX_PIXELS,
    OVERLAY_FORMATS,
    allow_large_images,
    atomic_write,
    check_writable,
    json_text,
    no_images_message,
    stream_inputs,
)
from camcli.methods import added_by_all, cli_settings, list_methods, method_names, parse_methods
from camcli.models.spec import DEFAULT_MODEL, read_labels
from camcli.typerlite import defer_coercion, first_paragraph, plain_metavars

if TYPE_CHECKING:
    from camcli.models import LoadedModel
    from camcli.run.local import LocalRun
    from camcli.run.plan import ExplainConfig
    from camcli.run.reporting import RunSummary
    from camcli.summary import SummaryTable

# Start-up stays instant (`--help`, completion, `camcli methods`): this module imports
# nothing that loads torch, torchvision or cv2. Each command imports what it runs inside
# its body (tests/test_startup.py fails otherwise); a new command does the same.

stderr = Console(stderr=True, highlight=False)

# The CLI words an OptionError with its flags; these keywords are spelled differently.
_FLAGS = {"fill": "--occlusion-fill"}


def _flag(option: str) -> str:
    return _FLAGS.get(option, "--" + option.replace("_", "-"))


# click's UsageError as raised by the click typer runs on (recent typer vendors its own copy)
_CLICK_USAGE_ERROR: type[Exception] = typer.BadParameter.__base__


class _OneLineUsageErrors(typer.core.TyperGroup):
    """Click's own usage errors (a bad option value, an unknown option) as one line and
    exit 2, like camcli's, instead of a usage block and a box."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        defer_coercion(self, ctx)
        return super().parse_args(ctx, _save_heatmap_value(args))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            plain_metavars(command, ctx)
            defer_coercion(command, ctx)
        return command

    def format_help(self, ctx: Any, formatter: Any) -> None:
        plain_metavars(self, ctx)
        super().format_help(ctx, formatter)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """Each command with its whole first paragraph, as the rich help showed it."""
        rows = [(name, first_paragraph(command)) for name, command in self.commands.items() if not command.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _CLICK_USAGE_ERROR as exc:
            stderr.print(f"camcli: error: {exc.format_message()}", markup=False, soft_wrap=True)
            raise typer.Exit(ExitCode.USAGE) from None


def _save_heatmap_value(args: list[str]) -> list[str]:
    """`--save-heatmap [map|raw]`: click options have no optional value, so the word right
    after the flag (or after ``=``) is read here; ``raw`` also writes the raw maps."""
    out: list[str] = []
    for arg in args:
        if arg in ("--save-heatmap=map", "--save-heatmap=raw"):
            out.append("--save-heatmap")
            arg = arg.removeprefix("--save-heatmap=")
        if out and out[-1] == "--save-heatmap" and arg in ("map", "raw"):
            if arg == "raw":
                out.append("--save-heatmap-raw")
            continue
        out.append(arg)
    return out


app = typer.Typer(
    cls=_OneLineUsageErrors,
    help="See where a CNN image classifier looks: heatmap overlays and JSON for images and folders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: rich's layout of explain's ~60 options took a third of its start-up
    context_settings={"max_content_width": 120},
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


def _floats(value: str | None, option: str, lengths: tuple[int, ...] = (3,)) -> tuple[float, ...] | None:
    """Comma-separated numbers: three (R, G, B), or with lengths=(1, 3) one per input channel."""
    if value is None:
        return None
    count = " or ".join(str(n) for n in lengths)
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise UsageError(f"{option} expects {count} comma-separated numbers, not {value!r}") from None
    if len(parts) not in lengths:
        raise UsageError(f"{option} expects {count} comma-separated numbers, not {value!r}")
    return parts


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
        str,
        typer.Option("--model", help="efficientnet_lite0, a torchvision name, timm:NAME, or package.module:factory."),
    ] = DEFAULT_MODEL,
    weights: Annotated[
        str | None, typer.Option("--weights", help="DEFAULT, an enum member (IMAGENET1K_V1), none, or a .pth.")
    ] = None,
    layer: Annotated[
        str,
        typer.Option(
            "--layer",
            help="auto, fine (auto + the last stage at twice its resolution), a dotted name, or a,b to fuse several.",
        ),
    ] = "auto",
    fuse: Annotated[
        str, typer.Option("--fuse", help=f"How several layers' maps become one: {', '.join(FUSIONS)}.")
    ] = "mean",
    target: Annotated[
        str | None,
        typer.Option("-t", "--target", help="top1 (default), positive (multi-label), a class index or a class name."),
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
        bool,
        typer.Option(
            "--save-heatmap",
            help="Also write float32 .npy maps at the image's size; '--save-heatmap raw' also the maps "
            "before ReLU and min-max at the layer's resolution.",
        ),
    ] = False,
    save_heatmap_raw: Annotated[bool, typer.Option("--save-heatmap-raw", hidden=True)] = False,
    output_key: Annotated[
        str | None,
        typer.Option("--output-key", help="Which output holds the logits: a key/attribute NAME or tuple INDEX."),
    ] = None,
    score: Annotated[
        str | None,
        typer.Option("--score", help="softmax (default), sigmoid (default with -t positive, one logit) or logit."),
    ] = None,
    threshold: Annotated[
        float, typer.Option("--threshold", help="-t positive: explain each class whose sigmoid reaches this.")
    ] = 0.5,
    channels: Annotated[
        int | None, typer.Option("--channels", min=1, help="Input channels: 1 (luminance) or 3 (default: the model's).")
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="hf: let the folder run its own model code.")
    ] = False,
    box_threshold: Annotated[
        float | None,
        typer.Option("--box-threshold", min=0.0, max=1.0, help="Boxes around map parts >= F x the maximum (0.15)."),
    ] = None,
    draw_boxes: Annotated[bool, typer.Option("--draw-boxes", help="Draw the --box-threshold boxes.")] = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Print one JSON object per image to stdout.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print errors only.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo images finished by an earlier run.")] = False,
    input_size: Annotated[int | None, typer.Option("--input-size", min=8, help="Model input side.")] = None,
    mean: Annotated[str | None, typer.Option("--mean", help="Normalisation mean, e.g. 0.5,0.5,0.5.")] = None,
    std: Annotated[str | None, typer.Option("--std", help="Normalisation std, e.g. 0.5,0.5,0.5.")] = None,
    # None: tuned on the run's first chunks, at most 32 (camcli.chunking): the fastest size per
    # input depends on the processor's caches, the model and the input size.
    chunk_size: Annotated[
        int | None,
        typer.Option("--chunk-size", min=1, help="Extra inputs per forward (Score-CAM's masks, ...). [default: tuned]"),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Image decoding threads (--engine ray: model actors).")
    ] = 2,
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
    road: Annotated[
        bool, typer.Option("--road", help="With --metrics: also ROAD (noisy linear imputation; 18 solves per map).")
    ] = False,
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
    occlusion_target: Annotated[
        str | None,
        typer.Option("--occlusion-target", help="Occlusion measures: class (default), feature, or winner (label map)."),
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
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="A method's setting, METHOD.NAME=VALUE (repeatable; `camcli methods METHOD` lists them)."
        ),
    ] = None,
    contrast: Annotated[
        str | None,
        typer.Option("--contrast", help="CAM family: why the target rather than this class (index, name or second)."),
    ] = None,
    smooth: Annotated[
        str | None, typer.Option("--smooth", help=f"CAM family: {' or '.join(SMOOTHINGS)} (flips x scales, or PCA).")
    ] = None,
    engine: Annotated[
        str, typer.Option("--engine", help="local (default), or ray: Ray Data actors on this machine or a cluster.")
    ] = "local",
    address: Annotated[
        str | None, typer.Option("--address", help="--engine ray: auto (a running cluster) or ray://HOST:PORT.")
    ] = None,
    gpus_per_worker: Annotated[
        float, typer.Option("--gpus-per-worker", min=0.0, help="--engine ray: GPUs per model actor (0: CPU).")
    ] = 0.0,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Explain images: overlays, optional .npy heatmaps and one JSON per image in --out."""
    with _one_line_errors(debug):
        from camcli.run.plan import ExplainConfig

        config = ExplainConfig(
            model=model,
            weights=weights,
            input_size=input_size,
            mean=_floats(mean, "--mean", (1, 3)),
            std=_floats(std, "--std", (1, 3)),
            labels=None if labels is None else str(labels),
            channels=channels,
            output_key=_output_key(output_key),
            trust_remote_code=trust_remote_code,
            methods=method,
            settings=_method_settings(method, set_, _aliases(locals())),
            layer=layer,
            fuse=fuse,
            target=target,
            topk=topk,
            threshold=threshold,
            score=score,
            contrast=contrast,
            smooth=smooth,
            precision=precision,
            chunk_size=chunk_size,
            metrics=metrics,
            boxes=None if boxes is None else str(boxes),
            steps=steps,
            substrate=substrate,
            road=road,
            out=out,
            overlay_format=overlay_format,
            colormap=colormap,
            alpha=alpha,
            save_heatmap=save_heatmap,
            save_raw=save_heatmap_raw,
            grid=grid,
            box_threshold=box_threshold,
            draw_boxes=draw_boxes,
            overwrite=overwrite,
            device=device,
            batch_size=batch_size,
            workers=workers,
            max_pixels=max_pixels,
        )
        view = RunView(jsonl=jsonl, quiet=quiet, summary_csv=summary_csv, report=report, dry_run=dry_run)
        code = _explain(config, inputs, include, exclude, view, Engine(engine, address, workers, gpus_per_worker))
    raise typer.Exit(code)


@dataclass
class RunView:
    """How a run reports to the user: stdout records, progress and summary lines, files."""

    jsonl: bool = False
    quiet: bool = False
    summary_csv: Path | None = None
    report: bool = False
    dry_run: bool = False
    records: list[dict[str, Any]] | None = None  # `camcli evaluate` averages them


@dataclass(frozen=True)
class Engine:
    """--engine and its options."""

    name: str = "local"
    address: str | None = None
    workers: int = 2  # local: decode threads; ray: model actors
    gpus_per_worker: float = 0.0


def _output_key(text: str | None) -> str | int | None:
    from camcli.models.spec import parse_output_key

    return parse_output_key(text)


def _warn(line: str) -> None:
    stderr.print(f"camcli: {line}", markup=False, soft_wrap=True)


def _load(
    model: str, weights: str | None, input_size: int | None, mean: str | None, std: str | None, device: Any
) -> LoadedModel:
    """--model, --weights, --input-size, --mean, --std, on `device`."""
    from camcli.models import load_model

    loaded = load_model(
        model, weights, input_size=input_size, mean=_floats(mean, "--mean", (1, 3)), std=_floats(std, "--std", (1, 3))
    )
    loaded.model.to(device)
    return loaded


# Older option names of method settings (each declared by its method as `Setting.alias`).
_SETTING_ALIASES = {
    "--samples": "samples",
    "--noise": "noise",
    "--patch": "patch",
    "--stride": "stride",
    "--occlusion-fill": "occlusion_fill",
    "--tiles": "tiles",
    "--scorecam-top": "scorecam_top",
    "--occlusion-target": "occlusion_target",
}


def _aliases(given: dict[str, Any]) -> dict[str, Any]:
    return {alias: given.get(key) for alias, key in _SETTING_ALIASES.items()}


def _method_settings(method: str, assignments: list[str] | None, aliases: dict[str, Any]) -> dict[str, Any]:
    """`--set METHOD.NAME=VALUE` and the older options, as `{"method.name": value}`."""
    return cli_settings(method_names(method), assignments or (), aliases)


def _explain(
    config: ExplainConfig,
    inputs: list[str],
    include: list[str] | None,
    exclude: list[str] | None,
    view: RunView,
    engine: Engine = Engine(),
) -> int:
    """explain, compare and evaluate: check, skip what is done, prepare, run, report."""
    allow_large_images()  # the CLI's process: --max-pixels is camcli's own check
    if engine.name not in ("local", "ray"):
        raise UsageError(f"unknown --engine {engine.name!r}; use local or ray")
    if engine.name == "ray":
        from camcli.run.ray import require_ray

        require_ray()  # before anything is loaded or written
    methods = config.check()  # usage errors before loading
    streamed = "-" in inputs
    items: Any = stream_inputs(inputs, sys.stdin if streamed else None, include or (), exclude or (), warn=_warn)
    if not streamed or engine.name == "ray":  # a stream is explained as it comes; a list is checked first
        items = list(items)
        if not items:
            raise UsageError(no_images_message(inputs))
    if not streamed and not config.overwrite and not config.grid_only and not view.dry_run:
        # -t NAME by --labels (the zoo's class lists would import torch: else by the earlier records)
        categories = read_labels(Path(config.labels)) if config.class_name and config.labels else None
        finished = _all_finished(items, config.out, config.request(methods), added_by_all(config.methods), categories)
        if finished is not None:  # nothing to do: the model is not even loaded
            from camcli.run.reporting import RunSummary

            summary = RunSummary(skipped=len(finished))
            table = _summary_table(view, items, config.out)
            for record in finished:
                _emit(view, table, record)
            return _finish(view, config, items, summary, table)
    config.check_target_early()
    from camcli.run.plan import prepare

    prepared = prepare(config, "cpu" if engine.name == "ray" else None)
    if prepared.explainer.skipped:
        _warn("-m all: skipped " + "; ".join(f"{name} ({why})" for name, why in prepared.explainer.skipped))
    if prepared.explainer.fp32_methods:
        _warn(
            f"{', '.join(prepared.explainer.fp32_methods)} computed in fp32: under {config.precision} "
            "their maps drift from fp32 (or share a pass with one that does)"
        )
    if not view.dry_run:  # only now: a usage error above leaves no empty folder behind
        check_writable(config.out)
    if prepared.boxes is not None and not streamed and not any(prepared.boxes.lookup(item) for item in items):
        _warn(f"warning: {prepared.boxes.source} has boxes for none of the {len(items)} images")
    if prepared.loaded.random_weights and not view.quiet:  # after every usage check: errors stay one line
        _warn(
            f"warning: {prepared.loaded.name} has random weights (--weights none): its predictions and maps "
            "show an untrained network"
        )
    if prepared.loaded.adapted and not view.quiet:
        _warn(f"note: {prepared.loaded.name} was {prepared.loaded.adapted}")
    from camcli.run.local import LocalRun
    from camcli.run.reporting import Reporter

    if view.dry_run:
        return _dry_run(LocalRun(prepared), items, config.out)
    table = _summary_table(view, items if isinstance(items, list) else [], config.out)
    with _progress(view, len(items) if isinstance(items, list) else None, "explaining") as advance:
        reporter = Reporter(lambda record: _emit(view, table, record), _warn, advance)
        if engine.name == "ray":
            from camcli.run.ray import RayOptions, run_on_ray

            summary = run_on_ray(
                prepared, items, reporter, RayOptions(engine.address, engine.workers, engine.gpus_per_worker)
            )
        else:
            summary = LocalRun(prepared).run(items, reporter)
    return _finish(view, config, items, summary, table)


def _summary_table(view: RunView, items: list[Any], out: Path) -> SummaryTable | None:
    from camcli.summary import SummaryTable

    return SummaryTable(items, out) if view.summary_csv else None


def _emit(view: RunView, table: SummaryTable | None, record: dict[str, Any]) -> None:
    """One image's record, once its files are written: to evaluate, the CSV and --jsonl."""
    if view.records is not None:
        view.records.append(record)
    if table is not None:
        table.add(record)
    if view.jsonl:
        sys.stdout.write(json_text(record) + "\n")
        sys.stdout.flush()


@contextmanager
def _progress(view: RunView, total: int | None, description: str) -> Iterator[Any]:
    """A progress bar on a terminal (never under CI or -q); yields its `advance(n)`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    show = stderr.is_terminal and not view.quiet and not os.environ.get("CI")
    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn()]
    with Progress(*columns, TimeRemainingColumn(), console=stderr, disable=not show) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


def _finish(view: RunView, config: ExplainConfig, items: Any, summary: RunSummary, table: SummaryTable | None) -> int:
    """The end of every run: the summary CSV, one line on stderr, the report, the exit code."""
    if table is not None:
        try:
            atomic_write(view.summary_csv, table.to_csv())  # type: ignore[arg-type]
        except OSError as exc:
            _warn(f"{view.summary_csv}: cannot write the summary: {exc.strerror or exc}")
            return ExitCode.IMAGE_FAILED
    if summary.disk_full:
        _warn(
            f"stopped: the disk is full; {summary.seen} of the images seen were handled, nothing is left "
            "half-written; free some space and run the same command again to resume"
        )
        return ExitCode.IMAGE_FAILED
    if not view.quiet or summary.interrupted:
        stopped = ""
        if summary.interrupted:
            left = f"{len(items) - summary.seen} not started" if isinstance(items, list) else "the rest not started"
            stopped = f"interrupted, {left}; "
        counts = f"{summary.done} explained, {summary.skipped} already done, {summary.failed} failed"
        _warn(f"{stopped}{counts} -> {config.out}")
    if summary.interrupted:
        return ExitCode.INTERRUPTED
    report_ok = _write_report(config.out, None, view.quiet) if view.report else True
    return ExitCode.IMAGE_FAILED if summary.failed or not report_ok else ExitCode.OK


def _device(name: str) -> Any:
    from camcli.engine import resolve_device

    return resolve_device(name)


def _all_finished(
    items: list[Any], out: Path, request: dict[str, Any], optional: set[str], categories: list[str] | None
) -> list[dict[str, Any]] | None:
    """Every image's earlier record if an earlier run finished all of them as asked, else None
    (`optional`: the methods only `-m all` brought in, which an earlier run may have skipped;
    `categories`: the class names known before loading, for `-t NAME`)."""
    from camcli.resume import prior_result

    records = []
    for item in items:
        prior = prior_result(out, item, request, loaded=False, optional=optional, categories=categories)
        if not prior.finished:
            return None
        records.append(prior.record)
    return records


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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from camcli.report import write_report

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
    layer: Annotated[str, typer.Option("--layer", help="As for explain: auto, fine, a name, or a,b.")] = "auto",
    fuse: Annotated[str, typer.Option("--fuse", help=f"As for explain: {', '.join(FUSIONS)}.")] = "mean",
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
    chunk_size: Annotated[
        int | None, typer.Option("--chunk-size", min=1, help="Perturbed inputs per forward. [default: tuned]")
    ] = None,
    box_threshold: Annotated[
        float,
        typer.Option("--box-threshold", min=0.0, max=1.0, help="Localisation IoU: map boxes at >= F x the maximum."),
    ] = 0.15,
    output_key: Annotated[str | None, typer.Option("--output-key", help="As for explain.")] = None,
    channels: Annotated[int | None, typer.Option("--channels", min=1, help="As for explain.")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="As for explain.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo images finished by an earlier run.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print errors and the table only.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Score methods over images: a table of metric means per method, also written as CSV and JSON."""
    with _one_line_errors(debug):
        from camcli.evaluate import summarise, table, write_summary
        from camcli.run.plan import ExplainConfig

        config = ExplainConfig(
            model=model,
            weights=weights,
            layer=layer,
            fuse=fuse,
            input_size=input_size,
            mean=_floats(mean, "--mean", (1, 3)),
            std=_floats(std, "--std", (1, 3)),
            target=target,
            methods=method,
            metrics=True,
            boxes=None if boxes is None else str(boxes),
            steps=steps,
            substrate=substrate,
            batch_size=batch_size,
            device=device,
            out=out,
            chunk_size=chunk_size,
            box_threshold=box_threshold,
            output_key=_output_key(output_key),
            channels=channels,
            trust_remote_code=trust_remote_code,
            overwrite=overwrite,
        )
        view = RunView(quiet=quiet, records=[])
        code = _explain(config, folder, None, None, view)
        records = view.records or []
        ran = records[0]["request"]["methods"] if records else [m.name for m in parse_methods(method)]
        summaries = summarise(records, ran)  # -m all: without the methods it skipped
        csv_path, json_path = write_summary(out, summaries, records[0]["request"] if records else {})
    console = Console(highlight=False)
    if not console.is_terminal:  # a file or pipe gets the whole table, not an 80-column squeeze
        console = Console(highlight=False, width=160)
    console.print(table(summaries, f"camcli evaluate: {len(records)} images"))
    if not quiet:
        stderr.print(f"camcli: wrote {csv_path} and {json_path}", markup=False)
    raise typer.Exit(code)


@app.command()
def sanity(
    inputs: Annotated[list[str], typer.Argument(help="Images or folders (recursed).")],
    method: Annotated[
        str, typer.Option("-m", "--method", help="Comma list of methods to test.", autocompletion=_complete_methods)
    ] = "gradcam,gradcam++,guided-backprop,saliency",
    model: Annotated[str, typer.Option("--model", help="As for explain.")] = DEFAULT_MODEL,
    weights: Annotated[str | None, typer.Option("--weights", help="As for explain.")] = None,
    layer: Annotated[str, typer.Option("--layer", help="auto, or a dotted module name (a,b to fuse).")] = "auto",
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for sanity.json and sanity.png.")] = Path(
        "camcli-sanity"
    ),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random weights and random classes.")] = 0,
    input_size: Annotated[int | None, typer.Option("--input-size", min=8, help="Model input side.")] = None,
    batch_size: Annotated[int, typer.Option("-b", "--batch-size", min=1, help="Images per forward.")] = 8,
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=1, help="Extra inputs per forward.")] = 32,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print errors and the table only.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Adebayo et al.'s sanity checks: does each method's map change when the model's weights
    are randomised (head first, block by block) and when a random class is explained?"""
    with _one_line_errors(debug):
        code = _sanity(**locals())
    raise typer.Exit(code)


def _sanity(**opts: Any) -> int:
    import torch
    from rich.table import Table

    from camcli import sanity as checks
    from camcli.errors import ImageError
    from camcli.io import collect_inputs, decode_image
    from camcli.models import load_model, resolve_layers
    from camcli.run.stages import preprocess

    methods = parse_methods(opts["method"])
    device = _device(opts["device"])
    items = collect_inputs(opts["inputs"])
    loaded = load_model(opts["model"], opts["weights"], input_size=opts["input_size"])
    check_writable(opts["out"])  # after loading: a bad model name leaves no folder behind
    loaded.model.to(device)
    layers = resolve_layers(loaded.model, opts["layer"], loaded.input, device)
    tensors, keys, failed = [], [], 0
    for item in items:
        try:
            tensors.append(preprocess(decode_image(item.path), loaded.input))
            keys.append(item.key)
        except ImageError as exc:
            failed += 1
            stderr.print(f"camcli: {item.path}: {exc}", markup=False, soft_wrap=True)
    if not tensors:
        stderr.print("camcli: no image to test", markup=False)
        return ExitCode.IMAGE_FAILED
    inputs = torch.stack(tensors).to(device)
    steps = len(checks.blocks(loaded.model))
    if not opts["quiet"]:
        stderr.print(f"camcli: {len(keys)} images, {len(methods)} methods, {steps} blocks to randomise", markup=False)
    result = checks.run_sanity(
        loaded.model,
        layers,
        methods,
        inputs,
        keys,
        seed=opts["seed"],
        batch_size=opts["batch_size"],
        chunk_size=opts["chunk_size"],
    )
    request = {"model": loaded.name, "weights": loaded.weights, "layer": ",".join(n.name for n in layers)}
    request |= {"methods": [m.name for m in methods], "seed": opts["seed"]}
    title = f"camcli sanity: {loaded.name}, layer {request['layer']}, {len(keys)} images"
    json_path, png_path = checks.write(result, opts["out"], request, title)
    rows = Table(title=title)
    for heading in (
        "method",
        "head random ρ / SSIM",
        "half random ρ / SSIM",
        "all random ρ / SSIM",
        "model test",
        "random logit ρ / SSIM",
        "logit test",
    ):
        rows.add_column(heading, justify="left" if heading == "method" else "right")
    for row in checks.format_table(result):
        rows.add_row(*row)
    Console(highlight=False, width=160).print(rows)
    if not opts["quiet"]:
        stderr.print(f"camcli: wrote {json_path} and {png_path}", markup=False)
    return ExitCode.IMAGE_FAILED if failed else ExitCode.OK


@contextmanager
def _one_line_errors(debug: bool = False) -> Iterator[None]:
    """Every command's error handling, in one place: a camcli error is one line on stderr
    and its exit code (a traceback only with --debug); Ctrl-C outside a run is exit 130."""
    try:
        yield
    except CamcliError as exc:
        if debug:
            raise
        message = exc.worded(_flag) if isinstance(exc, OptionError) else str(exc)
        stderr.print(f"camcli: error: {message}", markup=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except (KeyboardInterrupt, Interrupted):
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
    layer: Annotated[str, typer.Option("--layer", help="As for explain: auto, fine, a name, or a,b.")] = "auto",
    fuse: Annotated[str, typer.Option("--fuse", help=f"As for explain: {', '.join(FUSIONS)}.")] = "mean",
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
    set_: Annotated[list[str] | None, typer.Option("--set", help="A method's setting, METHOD.NAME=VALUE.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Side-by-side grids: OUT/<name>.grid.png with the image, then one overlay per method (and target)."""
    with _one_line_errors(debug):
        from camcli.run.plan import ExplainConfig

        config = ExplainConfig(
            methods=method,
            model=model,
            weights=weights,
            layer=layer,
            fuse=fuse,
            target=target,
            topk=topk,
            out=out,
            device=device,
            colormap=colormap,
            alpha=alpha,
            panel_size=panel_size,
            input_size=input_size,
            batch_size=batch_size,
            labels=None if labels is None else str(labels),
            settings=_method_settings(method, set_, {}),
            grid_only=True,
            overwrite=True,
        )
        code = _explain(config, inputs, None, None, RunView(quiet=quiet))
    raise typer.Exit(code)


@app.command()
def methods(
    name: Annotated[str | None, typer.Argument(help="One method: its paper and settings (--set).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="JSON for machines.")] = False,
) -> None:
    """Every method: name, paper, what it needs from the model, relative cost; or one method's settings."""
    from camcli import commands

    with _one_line_errors():
        rows = commands.method_rows(name)
    if json_out:
        _print_json(rows[0] if name else rows)
    else:
        typer.echo(commands.format_method(rows[0]) if name else commands.format_methods(rows))


@app.command()
def models(
    pattern: Annotated[str | None, typer.Argument(help="Glob on the name, e.g. 'resnet*' or 'timm:convnext*'.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="JSON for machines.")] = False,
    wide: Annotated[bool, typer.Option("--wide", help="Never cut long lines to the terminal's width.")] = False,
) -> None:
    """Models --model accepts: the embedded default, torchvision's, timm's (when installed)."""
    from camcli import commands

    entries = commands.model_entries(pattern)
    if json_out:
        _print_json(commands.models_json(entries))
        return
    if not entries:
        stderr.print(f"camcli: no model matches {pattern!r}", markup=False)
        raise typer.Exit(ExitCode.USAGE)
    width = None if wide or not sys.stdout.isatty() else shutil.get_terminal_size().columns
    typer.echo(commands.format_models(entries, width))


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
    """The model's modules with output shapes (one dry forward); the layers --layer auto and fine pick are marked."""
    with _one_line_errors(debug):
        from camcli import commands
        from camcli.models import load_model

        loaded = load_model(model, weights, input_size=input_size)
        torch_device = _device(device)
        loaded.model.to(torch_device)
        rows, auto, logits, fine = commands.layer_rows(loaded.model, loaded.input, torch_device)
    if json_out:
        rows_json = [vars(r) for r in rows]
        _print_json(
            {
                "model": loaded.name,
                "auto": auto,
                "fine": commands.fine_json(fine),
                "logits": logits,
                "layers": rows_json,
            }
            | ({"adapted": loaded.adapted} if loaded.adapted else {})
        )
    else:
        if loaded.adapted:
            _warn(f"note: {loaded.name} was {loaded.adapted}")
        typer.echo(commands.format_layers(rows, auto, logits, loaded.name, depth, fine))


@app.command()
def schema() -> None:
    """Print the JSON Schema of the per-image JSON files."""
    from camcli.schema import schema_text

    typer.echo(schema_text(), nl=False)


@app.command()
def version(json_out: Annotated[bool, typer.Option("--json", help="JSON for machines.")] = False) -> None:
    """Versions of camcli, torch, torchvision, OpenCV, timm and the devices camcli can use."""
    from camcli import commands

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
    kernels: Annotated[
        bool, typer.Option("--kernels", help="Also draw the first conv's kernels as RGB; dead ones listed in JSON.")
    ] = False,
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
    from camcli.filters import filter_grid, kernel_grid, kernels_report
    from camcli.io import encode_image, json_bytes
    from camcli.models import load_model, resolve_layer

    device = _device(device_name)
    loaded = load_model(model, weights)
    check_writable(out)  # after loading: a bad model name leaves no folder behind
    loaded.model.to(device)
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in loaded.name)
    pictures = {}
    if layer is not None:
        info = resolve_layer(loaded.model, layer, loaded.input, device)
        grid = filter_grid(loaded.model, info, loaded.input, count, AscentOptions(steps=steps, size=size))
        pictures[out / f"{stem}.{info.name}.filters.png"] = grid
    written = []
    if kernels:
        report = {"model": loaded.name, "weights": loaded.weights, **kernels_report(loaded.model)}
        pictures[out / f"{stem}.kernels.png"] = kernel_grid(loaded.model, report["dead"])
        atomic_write(out / f"{stem}.kernels.json", json_bytes(report))
        written.append(out / f"{stem}.kernels.json")
    for path, picture in pictures.items():
        atomic_write(path, encode_image(picture))
    return list(pictures) + written


@app.command()
def channels(
    inputs: Annotated[list[str], typer.Argument(help="Images, folders (recursed), or - for paths on stdin.")],
    layer: Annotated[str, typer.Option("--layer", help="Dotted module name (auto: the last feature map).")] = "auto",
    channel_spec: Annotated[
        str, typer.Option("--channels", help="Channels: all, or indices and ranges like 0-15,32.")
    ] = "0-15",
    top: Annotated[int, typer.Option("--top", min=1, help="Strongest activations kept per channel.")] = 9,
    projection: Annotated[
        str, typer.Option("--projection", help="guided-backprop, or deconvnet (meaningful with max pooling).")
    ] = "guided-backprop",
    model: Annotated[str, typer.Option("--model", help="As for explain.")] = DEFAULT_MODEL,
    weights: Annotated[str | None, typer.Option("--weights", help="As for explain.")] = None,
    input_size: Annotated[int | None, typer.Option("--input-size", min=8, help="Model input side.")] = None,
    mean: Annotated[str | None, typer.Option("--mean", help="Normalisation mean, e.g. 0.5,0.5,0.5.")] = None,
    std: Annotated[str | None, typer.Option("--std", help="Normalisation std, e.g. 0.5,0.5,0.5.")] = None,
    batch_size: Annotated[int, typer.Option("-b", "--batch-size", min=1, help="Images per forward.")] = 8,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Image decoding threads.")] = 2,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")] = Path("camcli-out"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start again instead of resuming.")] = False,
    max_pixels: Annotated[
        int, typer.Option("--max-pixels", min=1, help="Refuse larger images from their header.")
    ] = DEFAULT_MAX_PIXELS,
    include: Annotated[list[str] | None, typer.Option("--include", help="Only inputs matching this glob.")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Skip inputs matching this glob.")] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print errors only.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """What each channel of a layer responds to over a folder (Zeiler & Fergus fig. 2): its
    strongest activations, their receptive-field patches and projections, grids and JSON."""
    with _one_line_errors(debug):
        code = _channels(**locals())
    raise typer.Exit(code)


def _channels(**opts: Any) -> int:
    from camcli.channels import ChannelsOptions, ChannelsRun, parse_channels
    from camcli.io import collect_inputs
    from camcli.models import resolve_layer

    device = _device(opts["device"])
    items = collect_inputs(
        opts["inputs"],
        sys.stdin if "-" in opts["inputs"] else None,
        opts["include"] or (),
        opts["exclude"] or (),
        warn=_warn,
    )
    check_writable(opts["out"])
    loaded = _load(opts["model"], opts["weights"], opts["input_size"], opts["mean"], opts["std"], device)
    info = resolve_layer(loaded.model, opts["layer"], loaded.input, device)
    options = ChannelsOptions(
        out_dir=opts["out"],
        channels=parse_channels(opts["channel_spec"], info.channels),
        top=opts["top"],
        projection=opts["projection"],
        batch_size=opts["batch_size"],
        workers=opts["workers"],
        overwrite=opts["overwrite"],
        max_pixels=opts["max_pixels"],
    )
    run = ChannelsRun(loaded, info, device, options)
    if not items:
        stderr.print(f"camcli: no images found in {' '.join(opts['inputs'])}", markup=False, soft_wrap=True)
        return ExitCode.IMAGE_FAILED
    summary = run.run(items, lambda line: stderr.print(f"camcli: {line}", markup=False, soft_wrap=True))
    if not opts["quiet"] or summary.interrupted:
        state = "interrupted (run again to resume); " if summary.interrupted else ""
        state += "already done; " if summary.skipped else ""
        stderr.print(
            f"camcli: {state}{summary.images} images, {summary.failed} failed, {len(options.channels)} channels of "
            f"{info.name} -> {run.sheet_path()}",
            markup=False,
            soft_wrap=True,
        )
    if summary.interrupted:
        return ExitCode.INTERRUPTED
    return ExitCode.IMAGE_FAILED if summary.failed else ExitCode.OK


def _dry_run(run: LocalRun, items: list[Any], out: Path) -> int:
    """Print one line per input: what a real run would do with it."""
    todo = 0
    for item in items:
        done = run.is_finished(item)
        todo += not done
        typer.echo(f"{'skip' if done else 'explain'}\t{item.path}\t{out / item.key}.json")
    stderr.print(f"camcli: dry run: {todo} to explain, {len(items) - todo} already done; nothing written", markup=False)
    return ExitCode.OK


def main() -> None:
    """Console-script entry point (kept for installs made before `camcli.entry`)."""
    from camcli.entry import main as entry

    entry()
