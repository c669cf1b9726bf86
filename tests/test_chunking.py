"""The chunk sizer: every extra input once and in order, the search for the fastest size per
input on the run's own chunks, a fixed --chunk-size obeyed, and maps that do not depend on it."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

from camcli.chunking import DEFAULT_LIMIT, ChunkSizer
from camcli.engine import Explainer, TargetSpec
from camcli.methods import parse_methods
from camcli.models import resolve_layer
from camcli.models.spec import InputSpec


class VirtualClock(ChunkSizer):
    """A sizer whose clock is the work the test says each chunk cost (no wall time in a test)."""

    def __init__(self, per_input_ms: dict[int, float], limit: int | None = None) -> None:
        super().__init__(limit)
        self.per_input_ms = per_input_ms
        self.now = 0.0

    def _clock(self) -> float:
        return self.now

    def run(self, count: int, key: tuple[int, ...] = ()) -> list[int]:
        """Chunk `count` items as a method's loop would; returns the chunk sizes in order."""
        items = torch.arange(count)
        seen = []
        for chunk in self.split(items, key):
            seen.append(chunk)
            self.now += self.per_input_ms.get(len(chunk), 1.0) * len(chunk) / 1e3
        assert torch.equal(torch.cat([items[:0], *seen]), items)  # each item once, in order
        return [len(c) for c in seen]


CACHE_CLIFF = {4: 11.0, 8: 10.0, 16: 14.0, 32: 17.0}  # a CPU, default allocator: best at 8 (ms per input)
STEEP = {4: 10.0, 8: 16.0, 16: 30.0, 32: 60.0}  # past a cliff at 8: larger sizes are not worth a try
FILLS_UP = {4: 8.0, 8: 4.0, 16: 2.0, 32: 1.0}  # a GPU: the bigger the better


def test_search_keeps_the_size_with_the_least_time_per_input() -> None:
    sizer = VirtualClock(CACHE_CLIFF)
    sizes = sizer.run(300)
    assert sizes[:12] == [4] * 3 + [8] * 3 + [16] * 3 + [32] * 3  # three timings per size, growing
    assert set(sizes[12:-1]) == {8} and sizer.chosen() == 8
    assert sizer.run(40) == [8] * 5  # kept for the rest of the run


def test_search_stops_at_a_cliff() -> None:
    sizer = VirtualClock(STEEP)
    sizes = sizer.run(100)
    assert sizes[:6] == [4] * 3 + [8] * 3 and 16 not in sizes  # 8 is 1.6x slower than 4: a cliff
    assert sizer.chosen() == 4


def test_search_goes_up_to_the_limit_while_larger_is_faster() -> None:
    sizer = VirtualClock(FILLS_UP)
    sizer.run(300)
    assert sizer.chosen() == DEFAULT_LIMIT
    limited = VirtualClock(FILLS_UP, limit=None)
    limited.limit = 12  # not a power of two: 4, 8, then 12
    assert limited.run(90)[:9] == [4] * 3 + [8] * 3 + [12] * 3 and limited.chosen() == 12


def test_a_fixed_chunk_size_is_obeyed_and_never_searched() -> None:
    sizer = VirtualClock(CACHE_CLIFF, limit=5)
    assert sizer.run(23) == [5, 5, 5, 5, 3]
    assert sizer.chosen() == 5


def test_short_runs_and_partial_chunks_do_not_decide() -> None:
    sizer = VirtualClock(CACHE_CLIFF)
    assert sizer.run(3) == [3]  # fewer items than the smallest size: one partial chunk, not timed
    assert sizer.run(10) == [4, 4, 2]  # the partial one is not counted as a timing of 4
    assert sizer.run(5) == [4, 1]  # the third timing of 4: the search goes on at 8
    assert sizer.run(8) == [8] and sizer.chosen() is None
    assert sizer.run(0) == []


def test_each_input_shape_is_searched_on_its_own() -> None:
    sizer = VirtualClock(CACHE_CLIFF)
    sizer.run(200, key=(3, 224, 224))
    assert sizer.chosen((3, 224, 224)) == 8
    assert sizer.chosen((3, 320, 320)) is None
    assert sizer.run(8, key=(3, 320, 320)) == [4, 4]  # from the start


@pytest.fixture(scope="module")
def resnet() -> tuple[torch.nn.Module, object, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    info = resolve_layer(model, "layer3", InputSpec(64, (0.0,) * 3, (1.0,) * 3), torch.device("cpu"))
    return model, info, x


@pytest.mark.parametrize("methods", ["scorecam", "rise", "occlusion"])
def test_tuned_chunks_give_the_fixed_chunks_maps(resnet, methods: str) -> None:
    model, info, x = resnet
    settings = {"rise": {"masks": 40}, "occlusion": {"patch": 8, "stride": 4}}.get(methods, {})
    parsed = parse_methods(methods, settings)
    tuned = Explainer(copy.deepcopy(model), info, parsed)
    fixed = Explainer(copy.deepcopy(model), info, parsed, chunk_size=7)
    assert tuned.chunk_sizer.chosen((3, 64, 64)) is None
    for _ in range(2):  # the second call runs at the size the first one found, where it found one
        a = tuned.explain(x, TargetSpec()).explanations[0].maps
        b = fixed.explain(x, TargetSpec()).explanations[0].maps
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert fixed.chunk_sizer.chosen() == 7
