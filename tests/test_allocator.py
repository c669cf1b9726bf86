"""camcli's processes keep freed large blocks for reuse: a second forward-sized allocation
page-faults nothing in again, where glibc's default maps and zeroes it afresh each time."""

from __future__ import annotations

import subprocess
import sys

import pytest

ROUNDS = """
import resource, sys
if sys.argv[1] == "reuse":
    from camcli.allocator import reuse_freed_memory
    assert reuse_freed_memory()
import torch
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1))
x = torch.randn(8, 3, 224, 224)  # 51 MB activations: above glibc's 32 MiB mmap ceiling
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.inference_mode():
        net.eval()(x)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[2:]))  # once the heap has grown to the forward's working set
"""
ACTIVATION_PAGES = 8 * 32 * 224 * 224 * 4 // 4096


def faults_of_later_forwards(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True)
    return int(run.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    default = faults_of_later_forwards("default")
    assert default > 4 * ACTIVATION_PAGES  # every activation mapped, faulted and zeroed each time
    # the heap's blocks, already resident (0 in most runs; a stray re-placed block is allowed)
    assert faults_of_later_forwards("reuse") < default / 4


def test_the_console_script_reuses_and_the_api_does_not_change_the_process() -> None:
    entry = (
        "import sys, camcli.allocator as a; calls = []; a.reuse_freed_memory = lambda: calls.append(1) or True; "
        "import camcli; import camcli.api; assert not calls, 'the API changed the allocator'; "
        "sys.argv = ['camcli', 'methods']; import camcli.entry as e; e.reuse_freed_memory = a.reuse_freed_memory\n"
        "try:\n    e.main()\nexcept SystemExit:\n    pass\nprint(len(calls))"
    )
    run = subprocess.run([sys.executable, "-c", entry], capture_output=True, text=True, check=True)
    assert run.stdout.strip().splitlines()[-1] == "1"
