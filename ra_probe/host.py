"""The machine a probe runs on: the CPUs this process may use, torch's threads for the duration of a
probe, and the settings of a process that ra-probe owns (the command line, a sweep's worker)."""
from __future__ import annotations

import ctypes
import math
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

CGROUP_V2 = "/sys/fs/cgroup/cpu.max"
CGROUP_V1 = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by its cgroup's CPU quota (a container's
    `--cpus`), never os.cpu_count() (the machine's)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_quota()
    return max(1, min(cpus, quota) if quota else cpus)


def cgroup_quota() -> int | None:
    """The cgroup's CPU quota in whole CPUs, rounded up (v2's cpu.max, else v1's CFS files); None
    when there is none."""
    try:
        with open(CGROUP_V2) as file:
            limit, period = file.read().split()[:2]
        return None if limit == "max" else math.ceil(int(limit) / int(period))
    except (OSError, ValueError):
        pass
    try:
        with open(CGROUP_V1[0]) as quota, open(CGROUP_V1[1]) as period:
            limit, every = int(quota.read()), int(period.read())
        return None if limit <= 0 else math.ceil(limit / every)
    except (OSError, ValueError):
        return None


def probe_threads(requested: int | None) -> int:
    """torch threads for a probe: `requested`, never more than the CPUs this process may use; by
    default the caller's count, never more than those of its CPUs that are idle now. A thread whose
    core is busy with other work makes every parallel kernel wait for it at its barrier: beside busy
    processes, a CLI probe of the bundled model took 61 s with two threads and 8.7 s with one."""
    if requested:
        return max(1, min(requested, available_cpus()))
    return max(1, min(torch.get_num_threads(), available_cpus(), idle_cpus()))


def idle_cpus(seconds: float = 0.1) -> int:
    """How many of the CPUs this process may run on were idle at least half of a short look at the
    kernel's counters (/proc/stat); all of them where those cannot be read."""
    try:
        allowed = os.sched_getaffinity(0)
        first = _cpu_times()
        time.sleep(seconds)
        second = _cpu_times()
    except (AttributeError, OSError, ValueError, IndexError):
        return available_cpus()
    idle = 0
    for cpu in allowed & first.keys() & second.keys():
        spent, total = (b - a for a, b in zip(first[cpu], second[cpu]))
        idle += total <= 0 or spent >= total / 2
    return idle


def _cpu_times() -> dict[int, tuple[int, int]]:
    """Per CPU, the clock ticks spent idle (idle, iowait) and in all (user … steal)."""
    times = {}
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith("cpu") and line[3].isdigit():
                name, *fields = line.split()
                ticks = [int(value) for value in fields[:8]]
                times[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))
    return times


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block, the caller's count put back after."""
    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# glibc's malloc settings for a process ra-probe owns (mallopt's parameter numbers). torch's kernels
# allocate their temporaries at every product call; by default glibc gives a freed heap top above
# 2 × its dynamic mmap threshold (≤ 64 MB) back to the system, and blocks above that threshold (≤ 32 MB)
# are mapped anew each time, so every call had the kernel map and zero fresh pages: 21–45 % of a
# probe's CPU time. Kept instead (what MALLOC_MMAP_THRESHOLD_=32M MALLOC_TRIM_THRESHOLD_=1G
# MALLOC_TOP_PAD_=256M do): the largest heap blocks glibc allows, freed memory kept up to 1 GiB.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 256 << 20}
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def trim_freed_memory() -> None:
    """Give the memory glibc's malloc holds freed back to the system (malloc_trim: free pages anywhere in
    the heap, not only at its top); nothing elsewhere. Between a probe's sites: each solve frees its
    activations, but what is allocated meanwhile pins the heap's holes. qwen3_vit_88m at 768 px (2304
    tokens), one sample: 1.8–2.0 GB resident between the sites of two blocks, 1.0–1.1 GB after a
    trim, 0.3 GB of live tensors; with all twelve blocks, untrimmed, past 9.5 GB."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def own_process() -> None:
    """Settings for a process that ra-probe owns, applied first thing (the library never applies them
    in its caller's process): subnormal floats flushed to zero (engine.krylov; torch's CPU threads
    take the mode from this thread when they start) and glibc's malloc keeping freed memory, unless
    the environment already sets it."""
    torch.set_flush_denormal(True)
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or any(name in os.environ
                                                                                for name in MALLOC_ENV):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    for parameter, value in MALLOC_SETTINGS.items():
        mallopt(parameter, value)


def memory_in_use(device: torch.device) -> int | None:
    """Bytes in use now where a probe on `device` keeps its tensors: CUDA's allocated memory there, or
    this process's resident set (Linux's /proc/self/statm); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_memory(device: torch.device) -> int | None:
    """The most bytes ever in use there: `torch.cuda.max_memory_allocated`, or this process's peak
    resident set (Linux's VmHWM, else getrusage); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:  # Linux: the high-water mark of this process's own memory, which starts anew at exec
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # elsewhere getrusage: on Linux its maxrss would carry the parent's resident set over fork and exec
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024
