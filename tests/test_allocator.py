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
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(16 * 2**20)  # 64 MiB, written once: an activation of a batch
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[4:]))  # the heap at its working size: the rounds after the first few
"""


def fewest_faults_of_later_rounds(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True)
    return int(run.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    pages = 64 * 2**20 // 4096
    assert fewest_faults_of_later_rounds("default") > pages // 2  # mapped, faulted and zeroed afresh
    assert fewest_faults_of_later_rounds("reuse") < pages // 20  # the heap's block, already resident


def test_the_console_script_reuses_and_the_api_does_not_change_the_process() -> None:
    entry = (
        "import sys, camcli.allocator as a; calls = []; a.reuse_freed_memory = lambda: calls.append(1) or True; "
        "import camcli; import camcli.api; assert not calls, 'the API changed the allocator'; "
        "sys.argv = ['camcli', 'methods']; import camcli.entry as e; e.reuse_freed_memory = a.reuse_freed_memory\n"
        "try:\n    e.main()\nexcept SystemExit:\n    pass\nprint(len(calls))"
    )
    run = subprocess.run([sys.executable, "-c", entry], capture_output=True, text=True, check=True)
    assert run.stdout.strip().splitlines()[-1] == "1"
