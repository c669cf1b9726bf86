"""camcli: see where a convolutional image classifier looks, from the command line.

The Python API (`explain`, `load_model`, `list_methods`, in `camcli.api`) is imported
on first use, so `import camcli` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "explain", "list_methods", "load_model"]

if TYPE_CHECKING:
    from camcli.api import explain, list_methods, load_model


def __getattr__(name: str) -> Any:
    if name in {"explain", "list_methods", "load_model"}:
        from camcli import api

        return getattr(api, name)
    raise AttributeError(f"module 'camcli' has no attribute {name!r}")
