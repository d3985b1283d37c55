"""A step's memory figure is its own: `VmHWM` of its process, not `ru_maxrss`, which Linux carries
from the parent across `exec` (found in the 1,000,000-record run: every step read the benchmark
process's own 2,040 MiB)."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.scale import vm_hwm_mib
from sandbox.process import PROJECT_ROOT

CHILD = (
    "import resource\n"
    "from bench.scale import vm_hwm_mib\n"
    "print(vm_hwm_mib('self'), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
)


def test_a_child_of_a_large_process_reads_its_own_peak() -> None:
    ballast = bytearray(1024 * 2**20)
    for page in range(0, len(ballast), 4096):  # resident, not just reserved
        ballast[page] = 1
    assert (vm_hwm_mib(os.getpid()) or 0) >= 1024
    child = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    own, carried = (float(v) for v in child.stdout.split())
    assert carried >= 1024  # what the old figure read: the parent's peak
    assert own < 512  # the child's own: the interpreter and its imports
    del ballast


def test_an_ended_process_has_no_figure_left_to_read() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert vm_hwm_mib(child.pid) is None
