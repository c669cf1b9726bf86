"""How many extra inputs one hook-free forward takes (Score-CAM's masked copies, RISE,
occlusion, SS-CAM, IS-CAM).

The time per input of a forward is not flat in the batch. On a CPU it rises once a
batch's activations outgrow the caches or, with glibc's default allocator, the 32 MiB above
which every block is mapped and faulted in afresh (`camcli.allocator`): EfficientNet-Lite0's
inference copy on a 2-core AVX2 VM cost 10 ms per input at 4, 11.5 at 8 and 17 at 32 in a
process with the default allocator, about 9-10 ms at every size in camcli's own; on an
AVX512 machine 16 was best (benchmarks/RESULTS.md). On a GPU it falls until the device is
full. No fixed chunk suits every machine, process, model and input size, so unless the user fixes
`--chunk-size`, a `ChunkSizer` times the run's first real chunks at growing sizes and keeps
the fastest per input: the calibration is work the method had to do anyway, no extra
forward. Each input's forward is independent of its batch-mates, so the maps are the same
whatever the sizes, up to float rounding; a fixed `--chunk-size` makes re-runs bit-identical.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor

DEFAULT_LIMIT = 32  # the largest chunk tried unless --chunk-size says otherwise: ~20 MB of input at 224 px
SMALLEST = 4
# The first chunk of a new size also pays for its kernels' set-up, and a shared machine adds
# bursts of noise (10-20 % here): the best of three counts.
TIMINGS_PER_SIZE = 3
# A size this much slower per input than the best so far ends the search: a cliff (the caches
# or the allocator outgrown), not noise, and larger sizes are worse still.
CLIFF = 1.5


class ChunkSizer:
    """Splits work into chunks whose size is tuned on the run's own chunks, or fixed.

    Sizes are tried from `SMALLEST` upwards in powers of two up to `limit`, each for
    `TIMINGS_PER_SIZE` full chunks; the search ends at `limit`, or early at a size `CLIFF`
    times slower per input than the best so far, and the size with the least time per input
    is kept for the rest of the run (per input shape: the sizer serves one model)."""

    def __init__(self, limit: int | None = None, device: torch.device | None = None) -> None:
        """`limit` None: tuned, at most `DEFAULT_LIMIT`; a number: every chunk that size (--chunk-size)."""
        self.fixed = limit is not None
        self.limit = DEFAULT_LIMIT if limit is None else limit
        self.device = device
        self._best_per_input: dict[tuple[int, ...], dict[int, float]] = {}
        self._counts: dict[tuple[int, ...], dict[int, int]] = {}
        self._chosen: dict[tuple[int, ...], int] = {}

    def chosen(self, key: tuple[int, ...] = ()) -> int | None:
        """The size kept for inputs shaped `key`, once the search has ended (the limit when fixed)."""
        return self.limit if self.fixed else self._chosen.get(key)

    def split(self, items: Tensor, key: tuple[int, ...] = ()) -> Iterator[Tensor]:
        """`items` (one row per extra input) in consecutive chunks. While tuning, each chunk's
        time is the time until the next is asked for: the caller's whole loop body."""
        start = 0
        while start < len(items):
            size = self._next_size(key)
            chunk = items[start : start + size]
            start += len(chunk)
            if self.chosen(key) is not None or len(chunk) < size:
                yield chunk
                continue
            began = self._clock()
            yield chunk
            self._record(key, size, (self._clock() - began) / size)

    def _next_size(self, key: tuple[int, ...]) -> int:
        chosen = self.chosen(key)
        if chosen is not None:
            return chosen
        seen = self._best_per_input.setdefault(key, {})
        counts = self._counts.setdefault(key, {})
        size = max(seen, default=min(SMALLEST, self.limit))
        if counts.get(size, 0) >= TIMINGS_PER_SIZE:
            size = min(size * 2, self.limit)
        return size

    def _record(self, key: tuple[int, ...], size: int, per_input: float) -> None:
        seen = self._best_per_input[key]
        counts = self._counts[key]
        seen[size] = min(seen.get(size, float("inf")), per_input)
        counts[size] = counts.get(size, 0) + 1
        if counts[size] < TIMINGS_PER_SIZE:
            return
        best = min(seen, key=seen.__getitem__)
        if seen[size] > CLIFF * seen[best] or size >= self.limit:
            self._chosen[key] = best

    def _clock(self) -> float:
        """Wall time, after the device has finished what was queued (CUDA runs asynchronously)."""
        if self.device is not None and self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        return time.perf_counter()
