"""Freed memory kept for reuse, in the processes camcli owns (the CLI, its Ray actors).

glibc's malloc hands every block above its mmap threshold (at most 32 MiB) to the kernel
and unmaps it again on free. A CNN's early activations at batch 8 and 224 px are 13-40 MB,
so each forward maps them afresh, page-faults them in and has the kernel zero them: on a
2-core VM that was 45 % of a Lite0 forward (about 240 vs 130 ms per batch of 8,
benchmarks/RESULTS.md). With mmap off for the heap's large blocks and trimming only above
2 GiB, a freed activation stays in the heap and the next batch reuses it; the peak
resident memory is the same, it is only kept until the process ends.

The Python API leaves the caller's process as it is: `reuse_freed_memory()` is opt-in there.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_KEEP_BELOW = 2**31 - 1  # trim the heap's top only above 2 GiB of free memory (mallopt takes an int)


def reuse_freed_memory() -> bool:
    """Large blocks from the heap, kept after free (glibc on Linux); False where that does
    not apply (another C library or system), which changes nothing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no glibc mallopt
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW))
