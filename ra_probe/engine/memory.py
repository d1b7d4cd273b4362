"""Memory control (spec §4): how many samples one chunk may hold so that a probe fits the device."""
from __future__ import annotations

import os

import torch

from ra_probe.engine.solvers import basis_size

# What one Jacobian product of one sample holds, in units of the site's input + output size: the
# branch's intermediate activations and their tangents (a bottleneck's are about 2–3× its input).
ACTIVATIONS_PER_VECTOR = 4
SAVED_PER_OPERATOR = 4  # the linearized / vjp programs' saved primals, per site
SHARE_OF_FREE = 0.5  # leave room for the allocator, the model and everything else


def free_bytes(device: torch.device) -> int:
    """Memory available on `device` now: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def bytes_per_sample(groups: list[list[tuple[int, int]]], *, k: int, align_k: int, block: int, chunk: int,
                     itemsize: int) -> int:
    """Peak bytes one sample costs in a probe of sites with (n, m) = (input, output) dimensions, listed
    by group: every site's captured x and y, plus for the heaviest group its operators, singular vectors
    and RA2 products, plus the heaviest single solve (Krylov bases U, V and one chunk of products)."""
    captured = sum(n + m for group in groups for n, m in group)
    heaviest_group = max((sum(n + m for n, m in group) * (SAVED_PER_OPERATOR + k)
                          + max(n + m for n, m in group) * 2 * align_k * (len(group) - 1)
                          for group in groups), default=0)
    heaviest_solve = max(((n + m) * (basis_size(k, block, min(n, m)) + block + ACTIVATIONS_PER_VECTOR * chunk)
                          for group in groups for n, m in group), default=0)
    return itemsize * (captured + heaviest_group + heaviest_solve)


def auto_batch_size(groups: list[list[tuple[int, int]]], samples: int, device: torch.device, *, k: int,
                    align_k: int, block: int, chunk: int, itemsize: int, free: int | None = None) -> int:
    """The most samples per chunk (at most `samples`, at least 1) whose estimated peak fits in half of
    the device's free memory."""
    per_sample = bytes_per_sample(groups, k=k, align_k=align_k, block=block, chunk=chunk, itemsize=itemsize)
    budget = SHARE_OF_FREE * (free_bytes(device) if free is None else free)
    return max(1, min(samples, int(budget // max(per_sample, 1))))
