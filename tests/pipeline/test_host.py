"""The machine a probe runs on: the CPUs it may use, torch's threads, and a process ra-probe owns."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from ra_probe import host, probe
from ra_probe.errors import UserError
from ra_probe.host import available_cpus

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
print(sum(faults[1:]))  # after the first step, which faults its blocks in either way
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
    block = (24 << 20) // 4096  # pages of one 24 MB block
    # glibc's dynamic mmap threshold lets the default trim less as steps go on (seen: 8 to 10 blocks over
    # the five steps); an owned process faults at most one block in again (seen: 0 or 1)
    assert faults("default") >= 4 * block
    assert faults("owned") < 2 * block


ONE_CORE = """
import json, os, torch
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
torch.set_num_threads(4)  # more than the process may use: the probe must not take them
from ra_probe import probe
seen = []
report = probe("bundled/fc-digits", samples=16, k=4, device="cpu", progress=lambda *a: seen.append(torch.get_num_threads()))
print(json.dumps({"during": sorted(set(seen)), "after": torch.get_num_threads(),
                  "threads": report["environment"]["threads"], "values": [s["singular_values"] for s in report.sites]}))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_a_probe_limited_to_one_core_uses_one_thread_and_gives_the_same_numbers():
    """A process allowed one core (its affinity) whose torch has 4 threads: the probe runs on one thread,
    records it, puts the caller's 4 back, and its spectra are those of a probe with all the CPUs."""
    done = subprocess.run([sys.executable, "-c", ONE_CORE], capture_output=True, text=True, check=True)
    alone = json.loads(done.stdout.strip().splitlines()[-1])
    assert alone["during"] == [1] and alone["threads"] == 1 and alone["after"] == 4
    before = torch.get_num_threads()
    report = probe("bundled/fc-digits", samples=16, k=4, device="cpu", threads=available_cpus())
    assert torch.get_num_threads() == before and report["environment"]["threads"] == available_cpus()
    for ours, theirs in zip(alone["values"], [s["singular_values"] for s in report.sites]):
        assert ours == pytest.approx(theirs, rel=1e-5)


def test_threads_never_exceed_the_cpus_and_are_put_back():
    before = torch.get_num_threads()
    seen = []
    report = probe("bundled/fc-digits", samples=8, k=2, device="cpu", threads=available_cpus() + 7,
                   progress=lambda *a: seen.append(torch.get_num_threads()))
    assert set(seen) == {available_cpus()} == {report["environment"]["threads"]}
    assert report["settings"]["threads"] == available_cpus() + 7 and torch.get_num_threads() == before


@pytest.mark.parametrize("text, cpus", [("150000 100000\n", 2), ("100000 100000\n", 1), ("max 100000\n", None)])
def test_the_cgroup_quota_caps_the_cpus(tmp_path, monkeypatch, text, cpus):
    (tmp_path / "cpu.max").write_text(text)
    monkeypatch.setattr(host, "CGROUP_V2", str(tmp_path / "cpu.max"))
    assert host.cgroup_quota() == cpus
    assert host.available_cpus() == min(len(os.sched_getaffinity(0)), cpus or 10 ** 6)


def test_threads_must_be_positive(cli):
    code, _, err = cli("bundled/fc-digits", "--threads", "0", "--samples", "8")
    assert code == 2 and "threads" in err and "Traceback" not in err
    with pytest.raises(UserError, match="threads must be a positive integer"):
        probe("bundled/fc-digits", samples=8, threads=0)


def test_by_default_a_probe_leaves_out_the_cpus_busy_with_other_work(monkeypatch):
    """Of four CPUs the process may use, one is busy with another process: by default the probe takes
    at most the three idle ones (a thread on a busy core stalls every parallel kernel); asked for
    threads, it gets them up to the four."""
    looks = iter([{0: (0, 0), 1: (0, 0), 2: (0, 0), 3: (0, 0), 9: (0, 0)},
                  {0: (10, 100), 1: (90, 100), 2: (100, 100), 3: (60, 100), 9: (100, 100)}])
    monkeypatch.setattr(host, "_cpu_times", lambda: next(looks))
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(host, "cgroup_quota", lambda: None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert host.probe_threads(None) == 3
    assert host.probe_threads(4) == 4 and host.probe_threads(8) == 4


@pytest.mark.skipif(platform.system() != "Linux", reason="the carried-over peak is Linux's")
def test_a_fresh_process_measures_its_own_peak_not_its_parents():
    """A process started by one that holds 1.5 GB: getrusage's maxrss reports the parent's resident set
    (carried over fork and exec); the probe's peak is the child's own, a few hundred MB."""
    held = torch.ones(1_500_000_000 // 4)  # touched: resident in this process
    code = "import torch; from ra_probe.host import peak_memory; print(peak_memory(torch.device('cpu')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    del held
    assert 0 < int(done.stdout) < 1_000_000_000
