"""Memory control: what a site's branch saves of its forward (measured on one sample), how many
vectors one product call takes, how many columns a Krylov basis may hold, how many samples one chunk
may hold so that a probe fits the device, and what a dense solve holds."""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.autograd.graph import saved_tensors_hooks

SHARE_OF_FREE = 0.5  # leave room for the allocator, the model and everything else
# What a product's call allocates for one vector of one sample, in units of what the branch's forward
# saves for backward (`saved_bytes`): its tangents or gradients of the same activations, and their
# operations' temporaries. Measured peaks of one call: a ViT attention branch at 577 tokens 2.0×
# (J·v of the linearized program) and 2.2× (Jᵀ·u), an EfficientNet inverted residual 0.8×.
TEMPORARIES_PER_SAVED = 2
# What a linearized program keeps as constants (what J·v needs of the primal: softmax outputs, activation
# derivatives), in the same units: measured 1.8× on a ViT attention branch at 1521 tokens, 1.6× on its MLP.
LINEARIZED_PER_SAVED = 2
# A CPU call's temporaries: at most this many bytes (see `call_width`)
CPU_CALL_BYTES = 8 << 20

# Krylov basis columns per side. On a CPU, Gram–Schmidt against a basis of j columns costs ~j/50
# products per step (memory-bound skinny GEMMs), so a small basis with thick restarts is fastest
# (resnet18 layer1, top 10 at tol 1e-3, blocks of 4: basis 48 took 1.09 s per sample with 584
# products, basis 160 1.76 s with 532 products). On a GPU the GEMMs are cheap next to the products
# and restarts only cost products: the basis is as large as memory allows, up to this many per triplet.
CPU_COLUMNS_PER_K, CPU_MIN_COLUMNS = 5, 48
COLUMNS_PER_K, MIN_COLUMNS = 32, 96


def saved_bytes(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """Bytes that f's forward at x (one sample) saves for backward, each storage once: the activations
    that depend on x (attention maps, an inverted residual's expanded channels), not the weights. A
    branch's vjp function keeps that much per sample, its linearized program's constants
    `LINEARIZED_PER_SAVED` times it, and a product allocates `TEMPORARIES_PER_SAVED` times it per
    vector. A branch whose forward cannot run with gradients counts its input and output."""
    storages: dict[int, torch.Tensor] = {}  # by address, each kept alive (detached) so that none is reused
    leaf = x.detach().requires_grad_()

    def pack(t: torch.Tensor) -> None:  # the graph keeps nothing: a saved output holding its node is a cycle gc misses
        if t.requires_grad and (t is leaf or not t.is_leaf):  # a weight that requires grad is a leaf
            storages[t.untyped_storage().data_ptr()] = t.detach()
    try:
        with torch.enable_grad(), saved_tensors_hooks(pack, lambda _: None):
            out = f(leaf)
    except (RuntimeError, NotImplementedError):
        with torch.no_grad():
            return x.nbytes + f(x).nbytes
    return max(sum(t.untyped_storage().nbytes() for t in storages.values()), x.nbytes + out.nbytes)


def call_width(limit: int, samples: int, saved: int, device: torch.device) -> int:
    """Vectors one product call of `samples` samples takes, whose branch saves `saved` bytes a sample:
    at most `limit`, and as few as keep the call's temporaries within `CPU_CALL_BYTES` on a CPU, or
    within `SHARE_OF_FREE` of the free memory on an accelerator (never fewer than one). On a CPU each
    call allocates its temporaries anew and glibc's malloc takes large ones from the kernel as fresh
    pages every time (mmap, then a page fault per page touched), reusing smaller ones: on a 224-px
    convolution site, 8 samples, calls of 4 vectors spent a fifth of the CPU time in the kernel, calls
    of 1 under 5 %, at the same user time. A caching allocator reuses its blocks: there wide calls only
    save overhead, as long as they fit."""
    per_vector = max(1, samples * saved * TEMPORARIES_PER_SAVED)
    room = CPU_CALL_BYTES if device.type == "cpu" else SHARE_OF_FREE * free_bytes(device)
    return max(1, min(limit, int(room // per_vector)))


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


def solve_bytes(n: int, m: int, saved: int, *, method: str, k: int, width: int, vectors_per_call: int,
                itemsize: int, device: torch.device) -> int:
    """Bytes one sample's solve of a site with (n, m) = (input, output) dimensions, whose branch saves
    `saved` bytes a sample, holds at its peak: the products' programs (the vjp function's saved
    tensors, the linearized program's constants) and one call's temporaries; besides, a dense solve J
    (m × n) with its SVD factors (U, Vᵀ and the LAPACK workspace: about two more copies of the smaller
    square); a Krylov solve its bases U, V and its workspace (two blocks a side and a restart's rotated
    vectors)."""
    products = saved * (1 + LINEARIZED_PER_SAVED + TEMPORARIES_PER_SAVED * call_width(vectors_per_call, 1, saved, device))
    if method == "dense":
        return products + itemsize * (m * n + 3 * min(m, n) ** 2 + (m + n) * min(m, n))
    basis = basis_size(k, width, min(n, m), device)
    workspace = 2 * width + kept_columns(k, width, basis)
    return products + itemsize * (n + m) * (basis + width + workspace)


def bytes_per_sample(groups: list[list[tuple[int, int, str, int]]], *, k: int, align_k: int, width: int,
                     vectors_per_call: int, itemsize: int, device: str | torch.device = "cpu") -> int:
    """Peak bytes one sample costs in a probe of sites with (n, m, method, saved) = (input dimension,
    output dimension, solver chosen, bytes its branch saves a sample: `saved_bytes`), listed by group:
    every site's captured x and y; for the heaviest group what its operators keep between their
    solves (their output; a dense site's J, for RA2), singular vectors and RA2 products; and the
    heaviest single solve."""
    device = torch.device(device)
    captured = sum(n + m for group in groups for n, m, *_ in group)

    def kept(n: int, m: int, method: str) -> int:
        return m * n if method == "dense" else m

    heaviest_group = max((sum(kept(n, m, method) + (n + m) * k for n, m, method, _ in group)
                          + max(n + m for n, m, *_ in group) * 2 * align_k * (len(group) - 1)
                          for group in groups), default=0)
    heaviest_solve = max((solve_bytes(n, m, saved, method=method, k=k, width=width, vectors_per_call=vectors_per_call,
                                      itemsize=itemsize, device=device)
                          for group in groups for n, m, method, saved in group), default=0)
    return itemsize * (captured + heaviest_group) + heaviest_solve


def auto_batch_size(groups: list[list[tuple]], samples: int, device: torch.device, *, k: int,
                    align_k: int, width: int, vectors_per_call: int, itemsize: int, free: int | None = None,
                    held: int = 0) -> int:
    """The most samples per chunk (at most `samples`, at least 1) whose estimated peak fits in half of
    the device's free memory less `held` bytes the probe takes besides (offloaded weights made resident)."""
    per_sample = bytes_per_sample(groups, k=k, align_k=align_k, width=width, vectors_per_call=vectors_per_call, itemsize=itemsize,
                                  device=device)
    budget = SHARE_OF_FREE * max(0, (free_bytes(device) if free is None else free) - held)
    return max(1, min(samples, int(budget // max(per_sample, 1))))
