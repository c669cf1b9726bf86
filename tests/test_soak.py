"""Soak: 2,000 small generated images through the whole pipeline in this process. Every
image gets a complete JSON, resident memory stays flat, no file descriptor leaks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from camcli.io import collect_inputs
from camcli.models import load_model
from camcli.run.local import LocalRun
from camcli.run.plan import ExplainConfig, prepare
from camcli.run.reporting import Reporter

IMAGES = 2000
CPU = torch.device("cpu")


def resident_kib() -> int:
    """This process's resident set size (VmRSS) from the kernel."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_soak_2000_images_memory_flat_and_no_fd_leak(tmp_path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        folder = src / f"part{i // 500}"
        folder.mkdir(exist_ok=True)
        assert cv2.imwrite(str(folder / f"img{i:04d}.png"), (rng.random((24, 32, 3)) * 255).astype(np.uint8))

    loaded = load_model("tiny_models:brightness", input_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    config = ExplainConfig(methods="gradcam,gradcam++", out=out, batch_size=16, save_heatmap=True)
    run = LocalRun(prepare(config, CPU, loaded=loaded))
    items = collect_inputs([str(src)])
    assert len(items) == IMAGES

    samples: list[int] = []
    errors: list[str] = []
    fds_before = open_fds()
    start = time.perf_counter()
    summary = run.run(items, Reporter(lambda _: samples.append(resident_kib()), errors.append))
    elapsed = time.perf_counter() - start
    fds_after = open_fds()

    assert (summary.done, summary.failed, errors) == (IMAGES, 0, [])
    assert fds_after <= fds_before, f"{fds_after - fds_before} file descriptors leaked"
    after_100, peak = samples[99], max(samples)
    print(f"\n{IMAGES / elapsed:.0f} images/s; RSS after 100: {after_100 / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB")
    assert peak <= 1.1 * after_100, f"RSS grew from {after_100} KiB to {peak} KiB"
    assert peak - after_100 < 32 * 1024, "no steady growth either (the bound above allows ~70 MiB)"
    for item in items:
        record = json.loads((out / f"{item.key}.json").read_text())
        assert record["error"] is None and [e["method"] for e in record["explanations"]] == ["gradcam", "gradcam++"]
        assert all((out / item.key).parent.joinpath(e["overlay"]).is_file() for e in record["explanations"])
    assert not list(out.rglob(".*.tmp"))
