"""The `camcli` console script: Ctrl-C at any moment, start-up included, is one line and exit 130.

Nothing is imported before the SIGINT handler is in place; the handler raises
`Interrupted`, which click does not turn into 'Aborted!' (exit 1) as it does a
KeyboardInterrupt, and which every command's error handling reports as one line.
"""

from __future__ import annotations

import signal
import sys

from camcli.errors import Interrupted  # a light module: the handler must exist before anything heavy


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted


def main() -> None:
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not under nohup (SIG_IGN)
        signal.signal(signal.SIGINT, _interrupt)
    try:
        from camcli.allocator import reuse_freed_memory

        reuse_freed_memory()  # before torch allocates anything: this process is camcli's
        from camcli.cli import app

        app()
    except (Interrupted, KeyboardInterrupt):
        sys.stderr.write("camcli: interrupted\n")
        raise SystemExit(130) from None
