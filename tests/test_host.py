"""The machine a probe runs on: the CPUs it may use, torch's threads, and a process ra-probe owns."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

REFAULTS = """
import resource, sys, torch
if sys.argv[1] == "owned":
    from ra_probe.host import own_process
    own_process()
faults = []
for _ in range(6):  # a step's temporaries: three 24 MB blocks at once, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(6 << 20) for _ in range(3)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[2:]))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_a_process_ra_probe_owns_keeps_freed_memory():
    """Temporaries of a few tens of MB, made and freed at every step: with glibc's defaults the freed
    heap top goes back to the system and every step faults in fresh pages; in a process set up by
    `own_process` (the command line, a sweep worker) they are reused."""
    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", REFAULTS, mode], capture_output=True, text=True, check=True,
                              env={"PATH": "/usr/bin:/bin"})
        return int(done.stdout)
    pages = 3 * (24 << 20) // 4096
    assert faults("default") >= pages  # each of the last four steps faults at least one block in anew
    assert faults("owned") < pages // 10
