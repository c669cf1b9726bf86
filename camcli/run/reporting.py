"""What a run reports: its counts, and where each record and problem goes (torch-free:
a re-run with nothing to do reports through these without loading torch)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    interrupted: bool = False  # Ctrl-C: stopped after the batch on the model, writes finished
    disk_full: str | None = None  # the first write that found the disk full: the run stopped there
    errors: list[str] = field(default_factory=list)

    @property
    def seen(self) -> int:
        return self.done + self.skipped + self.failed

    def ended(self, reporter: Reporter, record: dict[str, Any], error: str | None) -> None:
        """One image explained (`error` None) or failed: counted, its error said once on
        stderr, its record out, the progress advanced; every engine reports through this."""
        if error is None:
            self.done += 1
        else:
            self.failed += 1
            self.errors.append(error)
            reporter.report_error(error)
        reporter.emit(record)
        reporter.advance(1)


@dataclass
class Reporter:
    """Where a run's results go: each record once written, each problem as one line, progress."""

    emit: Callable[[dict[str, Any]], None]
    report_error: Callable[[str], None]
    advance: Callable[[int], None] = lambda n: None
