"""typer without its heavy parts on the light paths: `--help`, completion, `camcli methods`.

typer 0.29 lays help out with rich (a table of ~60 rows for `explain --help`: about a third
of that command's start-up, with the import of `typer.rich_utils` and rich's markdown) and
coerces every parameter through a pydantic `TypeAdapter` it builds on first use, even for an
option that was not given (pydantic is ~80 ms to import). The CLI uses click's plain help
formatter instead (`rich_markup_mode=None`) and defers building the adapter until a value
is there to coerce (shell completion, which fills in every default, coerces nothing).
Everything here sets instance attributes on this CLI's own objects.
"""

from __future__ import annotations

import inspect
from typing import Any


def plain_metavars(command: Any, ctx: Any = None) -> None:
    """Help shows no Python types (typer 0.29 prints `<bool>`, `<list[str]>`, `{inputs}`):
    flags take no value, list options show their name (INCLUDE), and arguments show
    their name as click does (INPUTS..., [NAME] when optional), with no type column."""
    params = list(command.params)
    if ctx is not None and command.get_help_option(ctx) is not None:
        params.append(command.get_help_option(ctx))
    for param in params:
        if param.param_type_name == "argument":
            name = param.name.upper() + ("..." if param.nargs != 1 else "")
            name = name if param.required else f"[{name}]"
            param._usage_display_name = lambda name=name: name
            param.display_type_rich = lambda ctx: None
        elif param.metavar is None and getattr(param, "is_flag", False):
            param.metavar = ""
        elif param.metavar is None and param.multiple:
            param.metavar = param.name.upper().rstrip("_")  # --set SET, not SET_ (`set_` in Python)


def defer_coercion(command: Any, ctx: Any) -> None:
    """A parameter not given (None) is coerced by typer's own rule for a missing value
    (None, or () for a list), which needs no pydantic adapter; during shell completion
    values stay as parsed; any other value builds the adapter as typer does. Parameters
    of typer versions without adapters are left as they are."""
    try:
        from typer._coercion import PassThroughRuntimeParam
    except ImportError:  # a typer that coerces through click types: nothing to defer
        return
    for param in command.get_params(ctx):  # with --help, whose value is None unless given
        build = getattr(param, "get_runtime_param", None)
        if build is None or getattr(param, "_runtime_param", None) is not None or hasattr(build, "deferred"):
            continue
        descriptor = param.type_descriptor
        missing = PassThroughRuntimeParam(parameter_info=descriptor.parameter_info, annotation=descriptor.annotation)
        param.get_runtime_param = _Deferred(build, missing)


class _Deferred:
    """`get_runtime_param` that answers with typer's missing-value coercion until a value
    is given; the real runtime parameter is built (once, by typer) for the first value
    outside shell completion."""

    deferred = True

    def __init__(self, build: Any, missing: Any) -> None:
        self.build = build
        self.missing = missing

    def __call__(self) -> Any:
        return self

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        if value is None:
            return self.missing.coerce(value, param=param, ctx=ctx)
        if ctx.resilient_parsing:  # shell completion: camcli's completers read only the word being completed
            return value
        return self.build().coerce(value, param=param, ctx=ctx)


def first_paragraph(command: Any) -> str:
    """What `camcli --help` lists for a command: its short help, else the whole first
    paragraph of its docstring on one line (click cuts it at 45 characters or the first
    full stop, e.g. after "fig.")."""
    if command.short_help:
        return inspect.cleandoc(command.short_help)
    text = inspect.cleandoc(command.help or "").partition("\f")[0]
    return " ".join(text.split("\n\n")[0].split())
