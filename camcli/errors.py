"""One exception hierarchy, so the CLI maps failures to exit codes in one place."""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes, documented in README."""

    OK = 0
    IMAGE_FAILED = 1  # the run finished but at least one image failed
    USAGE = 2  # bad option, model, layer, weights or path: nothing was processed
    INTERRUPTED = 130


class CamcliError(Exception):
    """Base of every error camcli reports as one line."""

    exit_code: ExitCode = ExitCode.IMAGE_FAILED


class UsageError(CamcliError):
    """The request cannot run at all (exit 2 before any image is processed)."""

    exit_code = ExitCode.USAGE


class MethodNotApplicable(UsageError):
    """A method cannot explain this model/layer (e.g. CAM without a GAP + linear head)."""


class ImageError(CamcliError):
    """One input image could not be read; the run goes on without it."""


class OptionError(UsageError):
    """A bad value for a named option, worded for whoever passed it.

    The message names each option as ``{name}`` (its Python keyword): ``str()`` says
    ``samples must be at least 1``, for API callers; the CLI words the same error with
    its flags (``--samples must be at least 1``) through `worded`.
    """

    def __init__(self, template: str, *options: str) -> None:
        self.template = template
        self.options = options
        super().__init__(self.worded(lambda name: name))

    def worded(self, spell: Callable[[str], str]) -> str:
        """The message with every ``{option}`` spelled by `spell` (keyword -> flag)."""
        text = self.template
        for name in self.options:
            text = text.replace("{" + name + "}", spell(name))
        return text


class OutputError(CamcliError):
    """An output file could not be written (disk full, permissions); names the file."""

    def __init__(self, path: object, reason: str, disk_full: bool = False) -> None:
        super().__init__(f"cannot write {path}: {reason}")
        self.disk_full = disk_full


class Interrupted(BaseException):  # noqa: N818 - the CLI's Ctrl-C, not an error
    """SIGINT, raised by the CLI's own handler: click turns KeyboardInterrupt into
    'Aborted!' and exit 1; this passes through click to exit 130 with one line."""
