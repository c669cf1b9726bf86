"""One exception hierarchy, so the CLI maps failures to exit codes in one place."""

from __future__ import annotations

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
