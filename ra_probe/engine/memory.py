"""Memory control: how many columns a Krylov basis may hold, how many samples one chunk may hold so
that a probe fits the device, and what a dense solve holds."""
from __future__ import annotations

import os

import torch

from ra_probe.engine.operators import LINEARIZE_MIN_DIM

# What one Jacobian product of one sample holds, in units of the site's input + output size: the
# branch's intermediate activations and their tangents (a bottleneck's are about 2–3× its input).
ACTIVATIONS_PER_VECTOR = 4
SAVED_PER_OPERATOR = 4  # a vjp program's saved primals, per site; a site that is linearized too holds twice that
SHARE_OF_FREE = 0.5  # leave room for the allocator, the model and everything else

# Krylov basis columns per side. On a CPU, Gram–Schmidt against a basis of j columns costs ~j/50
# products per step (memory-bound skinny GEMMs), so a small basis with thick restarts is fastest
# (resnet18 layer1, top 10 at tol 1e-3, blocks of 4: basis 48 took 1.09 s per sample with 584
# products, basis 160 1.76 s with 532 products). On a GPU the GEMMs are cheap next to the products
# and restarts only cost products: the basis is as large as memory allows, up to this many per triplet.
CPU_COLUMNS_PER_K, CPU_MIN_COLUMNS = 5, 48
COLUMNS_PER_K, MIN_COLUMNS = 32, 96


def basis_size(k: int, width: int, dim: int, device: str | torch.device = "cpu") -> int:
    """Krylov basis columns a solve holds at once per side (it restarts when they are full), capped
    by the dimension."""
    if torch.device(device).type == "cpu":
        return min(dim, max(CPU_COLUMNS_PER_K * k, CPU_MIN_COLUMNS) + 2 * width)
    return min(dim, max(COLUMNS_PER_K * k, MIN_COLUMNS) + 2 * width)


def kept_columns(k: int, width: int, cols: int) -> int:
    """Ritz vectors a thick restart keeps: the top k and two blocks more, or a quarter of a large basis.
    Keeping fewer makes a restart's rotation (kept × basis × d) and the Gram–Schmidt passes until the
    next one cheaper, for about the same products. Measured on a CPU against keeping half the basis:
    resnet18 layer1 at 112 px, top 10, 752 vs 750 products and 0.90 vs 1.00 s a sample; a whole
    resnet50 probe at 112 px (k = 16) 1055 vs 1212 network forwards a sample."""
    return max(k + 2 * width, cols // 4)


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


def solve_elements(n: int, m: int, *, method: str, k: int, width: int, vectors_per_call: int,
                   device: str | torch.device = "cpu") -> int:
    """Elements one sample's solve of a site with (n, m) = (input, output) dimensions holds at its
    peak: a dense solve J (m × n) with its SVD factors (U, Vᵀ and the LAPACK workspace: about two
    more copies of the smaller square); a Krylov solve its bases U, V, its workspace (two blocks a side
    and a restart's rotated vectors) and one call's products."""
    if method == "dense":
        return m * n + 3 * min(m, n) ** 2 + (m + n) * min(m, n)
    basis = basis_size(k, width, min(n, m), device)
    workspace = 2 * width + kept_columns(k, width, basis)
    return (n + m) * (basis + width + workspace + ACTIVATIONS_PER_VECTOR * vectors_per_call)


def bytes_per_sample(groups: list[list[tuple]], *, k: int, align_k: int, width: int, vectors_per_call: int,
                     itemsize: int, device: str | torch.device = "cpu") -> int:
    """Peak bytes one sample costs in a probe of sites with (n, m, method) = (input dimension, output
    dimension, solver chosen; "block" when left out), listed by group: every site's captured x and
    y; for the heaviest group its operators (a dense site's J is kept for RA2), singular vectors and
    RA2 products; and the heaviest single solve."""
    groups = [[(n, m, *rest, "block")[:3] for n, m, *rest in group] for group in groups]
    captured = sum(n + m for group in groups for n, m, _ in group)

    def kept(n: int, m: int, method: str) -> int:  # what stays while the group's other sites are solved
        if method == "dense":
            return m * n
        return (n + m) * SAVED_PER_OPERATOR * (2 if n >= LINEARIZE_MIN_DIM else 1)

    heaviest_group = max((sum(kept(*site) + (n + m) * k for site in group for n, m, _ in [site])
                          + max(n + m for n, m, _ in group) * 2 * align_k * (len(group) - 1)
                          for group in groups), default=0)
    heaviest_solve = max((solve_elements(n, m, method=method, k=k, width=width, vectors_per_call=vectors_per_call, device=device)
                          for group in groups for n, m, method in group), default=0)
    return itemsize * (captured + heaviest_group + heaviest_solve)


def auto_batch_size(groups: list[list[tuple]], samples: int, device: torch.device, *, k: int,
                    align_k: int, width: int, vectors_per_call: int, itemsize: int, free: int | None = None,
                    held: int = 0) -> int:
    """The most samples per chunk (at most `samples`, at least 1) whose estimated peak fits in half of
    the device's free memory less `held` bytes the probe takes besides (offloaded weights made resident)."""
    per_sample = bytes_per_sample(groups, k=k, align_k=align_k, width=width, vectors_per_call=vectors_per_call, itemsize=itemsize,
                                  device=device)
    budget = SHARE_OF_FREE * max(0, (free_bytes(device) if free is None else free) - held)
    return max(1, min(samples, int(budget // max(per_sample, 1))))
