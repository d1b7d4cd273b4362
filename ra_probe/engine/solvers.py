"""Top-k singular triplets of a batch of operators (spec §4), each sample solved on its own but in
lock-step: every step is one batched product. Solvers see only `BatchedOperator`s."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ra_probe.engine.operators import BatchedOperator

SOLVERS = ("auto", "dense", "block", "lanczos")


@dataclass
class SVDResult:
    """Per sample b: `S[b]` (k,) best first, `U[b]` (m, k), `V[b]` (n, k), and bounds on the residual
    norms ‖J v − σ u‖ (`res_left`) and ‖Jᵀ u − σ v‖ (`res_right`) of each triplet, (B, k). `products`
    counts products of J or Jᵀ with one vector of one sample; `iterations` the most Krylov steps any
    sample took."""

    S: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    res_left: torch.Tensor
    res_right: torch.Tensor
    products: int
    iterations: int
    method: str
    converged: torch.Tensor  # (B,) bool


def dense_svd(op: BatchedOperator, k: int) -> SVDResult:
    """Exact: form J (B, m, n) and take its SVD. Residuals are measured, not assumed."""
    before = op.products
    matrices = op.dense()
    U, S, Vh = torch.linalg.svd(matrices, full_matrices=False)
    k = min(k, S.shape[1])
    U, S, V = U[..., :k], S[:, :k], Vh[:, :k].mT
    res_left = (matrices @ V - U * S[:, None]).norm(dim=1)
    res_right = (matrices.mT @ U - V * S[:, None]).norm(dim=1)
    return SVDResult(S, U, V, res_left, res_right, op.products - before, 1, "dense",
                     torch.ones(S.shape[0], dtype=torch.bool, device=S.device))


# Vectors per product call that keep the device busy: a call applies J to `block` vectors of each of
# the B samples, so with many samples a small block is as fast per vector as a large one, and a
# small block reaches a given residual in fewer products (measured on trained ResNet sites, top 10
# at tol 1e-3: block 2 ~150, block 4 ~170, block 10 ~250, block 16 ~330 products per sample).
CALL_WIDTH = {"cpu": 8, "cuda": 64}
MIN_BLOCK, MAX_BLOCK = 2, 16  # a block of 1 cannot see a cluster of equal values and may skip one


def default_block(k: int, samples: int = 1, device: str | torch.device = "cpu") -> int:
    """Block size of the block Krylov solver for top-`k` triplets of `samples` samples at a time on
    `device`: enough vectors per call to fill the device (`CALL_WIDTH`), at least 2, at most 16."""
    width = CALL_WIDTH.get(torch.device(device).type, CALL_WIDTH["cuda"])
    return max(MIN_BLOCK, min(-(-width // max(samples, 1)), MAX_BLOCK, k))


def basis_size(k: int, block: int, dim: int) -> int:
    """Krylov basis columns a solve holds at once (it restarts when they are full), capped by the
    dimension: room for the k wanted triplets, as many again kept as a buffer, and a few blocks."""
    return min(dim, max(2 * k + 6 * block, 48))


# Columns a solve may visit per sample (restarts included) before it stops unconverged: trained conv
# sites need ~10k-25k at tol 1e-3; beyond 60k the spectrum is too flat for the tolerance.
MAX_COLUMNS_PER_K = 60


def _orthonormal_extension(Y: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor,
                           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Y (B, d, b) = basisᵀ C + Q R with Q (B, d, b) orthonormal and orthogonal to the rows of `basis`
    (B, j, d): classical Gram–Schmidt twice, then QR. Directions Y lacks (|R_ii| at rounding level
    against `scale` (B,), a breakdown: an invariant subspace was found) are filled with random ones,
    so the basis keeps growing; their rows of R are zero. Returns Q, C (B, j, b), R (B, b, b)."""
    C = basis @ Y
    Y = Y - basis.mT @ C
    C2 = basis @ Y
    Y = Y - basis.mT @ C2
    Q, R = torch.linalg.qr(Y)
    eps = torch.finfo(Y.dtype).eps
    lacking = R.diagonal(dim1=1, dim2=2).abs() <= 100 * eps * scale[:, None]
    if bool(lacking.any()):
        fresh = torch.randn(Q.shape, dtype=Q.dtype, device=Q.device, generator=generator)
        Q = torch.where(lacking[:, None, :], fresh, Q)
        R = R.masked_fill(lacking[:, :, None], 0.0)
        for _ in range(2):
            Q = Q - basis.mT @ (basis @ Q)
        Q, R2 = torch.linalg.qr(Q)
        R = R2 @ R  # Y − basisᵀC = Q_old R = Q R2 R, exactly
    return Q, C + C2, R


def flushing_denormals() -> bool:
    """Whether this thread flushes subnormal floats to zero (torch has a setter for the mode, no getter)."""
    return (torch.tensor(1e-40) * 1.0).item() == 0.0


def _flushing_denormals(solve):
    """Run `solve` with subnormal floats flushed to zero, then restore the previous mode. Krylov
    vectors fill with subnormals (components that every product shrinks) and x86 CPUs compute on them
    ~100× slower: flushing made a CPU probe of a ResNet-50 2.3× faster. A spectrum never shows values
    below 1e-38 (float32) or 1e-308 (float64). The mode is per thread and torch's CPU worker threads
    take it from the main thread when they start: the CLI sets it first thing, for the process."""
    @functools.wraps(solve)
    def wrapper(*args, **kwargs):
        was_flushing = flushing_denormals()
        torch.set_flush_denormal(True)
        try:
            return solve(*args, **kwargs)
        finally:
            torch.set_flush_denormal(was_flushing)
    return wrapper


@_flushing_denormals
def krylov_svd(op: BatchedOperator, k: int, *, block: int = 1, tol: float = 1e-3, max_basis: int | None = None,
               max_columns: int | None = None, seed: int = 0) -> SVDResult:
    """Top-k triplets by block Golub–Kahan–Lanczos bidiagonalization with full re-orthogonalization
    and thick restarts (block = 1: classical GKL; block > 1: randomized block Krylov), lock-step over
    the samples.

    From a random orthonormal block V_1 (n × b), each step applies J to one block and Jᵀ to one block
    per sample: J V_i = U_{≤i} C + U_i R and Jᵀ U_i = V_{≤i}(…) + V_{i+1} R_i. So J V = U T with
    T = Uᵀ J V (jb × jb, upper triangular), and for the SVD T = P Σ Qᵀ each Ritz triplet
    (σ, u = U p, v = V q) satisfies J v = σ u and ‖Jᵀ u − σ v‖ = ‖R_j p_j‖ (p_j: p's last block), up
    to rounding, bounded by eps·(√(m+n) + basis + columns visited)·σ₁ and added to both sides. A sample has
    converged when the bound of each of its top-k triplets, rounding included, is ≤ tol·σ₁ (a tol
    below the rounding level is never met); it stops when all have.

    When the `max_basis` columns are full, the basis is replaced by its leading Ritz vectors (half of
    it, at least k + b): they span the best part of the Krylov space, T becomes diag(Σ), and the next
    block V_{j+1} carries on, so both relations above still hold (Wu & Simon's thick restart). A solve
    stops unconverged after `max_columns` columns per sample. Converged samples leave the batch once
    they are half of it, when the operator can be split."""
    batch, m, n = op.shape
    k = min(k, m, n)
    block = max(1, min(block, m, n))
    cols = max(max_basis or basis_size(k, block, min(m, n)), k + 2 * block)
    keep = max(k + block, cols // 2)  # Ritz vectors kept at a restart
    if cols + block > min(m, n):  # the basis would fill the space: the dense SVD is exact and cheaper
        return dense_svd(op, k)
    steps_cap = -(-(max_columns or MAX_COLUMNS_PER_K * k) // block)
    dtype, device = op.dtype, op.device
    eps = torch.finfo(dtype).eps
    generator = torch.Generator(device=device).manual_seed(seed)

    out_S = torch.zeros(batch, k, dtype=dtype, device=device)
    out_U = torch.zeros(batch, m, k, dtype=dtype, device=device)
    out_V = torch.zeros(batch, n, k, dtype=dtype, device=device)
    out_res = torch.zeros(batch, k, dtype=dtype, device=device)
    out_conv = torch.zeros(batch, dtype=torch.bool, device=device)
    products, iterations = -op.products, 0

    rows = torch.arange(batch, device=device)  # the samples still in the working batch
    Vb = torch.zeros(batch, cols + block, n, dtype=dtype, device=device)
    Ub = torch.zeros(batch, cols, m, dtype=dtype, device=device)
    T = torch.zeros(batch, cols, cols, dtype=torch.float64)  # the projected matrix, on the CPU
    scale = torch.zeros(batch, dtype=dtype, device=device)
    start = torch.randn(batch, n, block, dtype=dtype, device=device, generator=generator)
    Vb[:, :block] = torch.linalg.qr(start)[0].mT
    splittable = True

    def finish(which: torch.Tensor, width: int, ritz) -> None:
        S, P, Q, bound = (t[..., :k] for t in ritz)
        sel = which.cpu()
        S, P, Q, bound = (t[sel].to(device, dtype) for t in (S, P, Q, bound))
        target = rows[which]
        out_S[target] = S
        out_U[target] = Ub[which, :width].mT @ P
        out_V[target] = Vb[which, :width].mT @ Q
        out_res[target] = bound
        out_conv[target] = converged[which]

    lo = 0  # columns in use
    while True:
        hi = lo + block
        Y = op.matmat(Vb[:, lo:hi].mT)
        Q, C, R = _orthonormal_extension(Y, Ub[:, :lo], scale, generator)
        scale = torch.maximum(scale, R.diagonal(dim1=1, dim2=2).abs().amax(dim=1))
        Ub[:, lo:hi] = Q.mT
        T[:, :lo, lo:hi] = C.cpu().double()
        T[:, lo:hi, lo:hi] = R.cpu().double()
        Z = op.rmatmat(Q)
        Qv, _, Rv = _orthonormal_extension(Z, Vb[:, :hi], scale, generator)
        scale = torch.maximum(scale, Rv.diagonal(dim1=1, dim2=2).abs().amax(dim=1))
        Vb[:, hi:hi + block] = Qv.mT
        iterations += 1

        # rounding relative to σ₁: of a product, of forming a Ritz vector from the basis, and of
        # every rotation through the columns visited before (restarts)
        rounding = eps * (math.sqrt(m + n) + cols + iterations * block)
        ritz = _ritz(T[:, :hi, :hi], Rv.cpu().double(), k)
        S, bound = ritz[0][:, :k], ritz[3]
        converged = ((bound <= (tol - rounding) * S[:, :1]) | (S[:, :1] <= 0)).all(dim=1).to(device) & (hi >= k)
        if bool(converged.all()) or iterations >= steps_cap:
            finish(torch.ones_like(converged), hi, ritz)
            break
        done = int(converged.sum())
        if splittable and done and 2 * done >= len(rows):
            keep_rows = (~converged).nonzero().squeeze(1)
            smaller = op.select(keep_rows)
            if smaller is None:
                splittable = False
            else:
                products += op.products
                finish(converged, hi, ritz)
                op, rows = smaller, rows[keep_rows]
                keep_cpu = keep_rows.cpu()
                Vb, Ub, T, scale = Vb[keep_rows], Ub[keep_rows], T[keep_cpu], scale[keep_rows]
                ritz = tuple(t[keep_cpu] for t in ritz)
        if hi + block > cols:  # full: restart from the leading Ritz vectors and the next block
            P, Q = (t.to(device, dtype) for t in ritz[1:3])
            Ub[:, :keep] = (Ub[:, :hi].mT @ P[..., :keep]).mT
            Vb[:, :keep] = (Vb[:, :hi].mT @ Q[..., :keep]).mT
            Vb[:, keep:keep + block] = Vb[:, hi:hi + block].clone()
            T.zero_()
            T[:, :keep, :keep] = torch.diag_embed(ritz[0][:, :keep])
            hi = keep
        lo = hi
    products += op.products
    floor = rounding * out_S[:, :1].expand_as(out_S)
    return SVDResult(out_S, out_U, out_V, floor, out_res + floor, products, iterations,
                     "lanczos" if block == 1 else "block", out_conv)


def _ritz(T: torch.Tensor, R: torch.Tensor, k: int):
    """SVD of the projected matrix T (B, jb, jb) = P Σ Qᵀ, all of it (best first), and the residual
    bounds ‖R p_last‖ of the top-k Ritz triplets, R (B, b, b) the last Jᵀ-side QR factor. Returns
    S (B, jb), P, Q (B, jb, jb), bound (B, k)."""
    P, S, Qh = torch.linalg.svd(T)
    block = R.shape[1]
    bound = (R @ P[:, -block:, :k]).norm(dim=1)
    return S, P, Qh.mT, bound


def lanczos_svd(op: BatchedOperator, k: int, *, tol: float = 1e-3, seed: int = 0) -> SVDResult:
    """Single-vector Golub–Kahan–Lanczos (`krylov_svd` with block 1)."""
    return krylov_svd(op, k, block=1, tol=tol, seed=seed)


def block_krylov_svd(op: BatchedOperator, k: int, *, block: int | None = None, tol: float = 1e-3,
                     seed: int = 0) -> SVDResult:
    """Randomized block Krylov (`krylov_svd` with a block of `default_block` vectors for the operator's
    samples and device): more products than single-vector Lanczos, but each product is cheaper."""
    return krylov_svd(op, k, block=block or default_block(k, op.shape[0], op.device), tol=tol, seed=seed)


# Forming J costs n products and an n × n SVD per sample: beyond a couple of thousand dimensions a
# Krylov solve of the top k is far cheaper (at 4096 dimensions dense took ~10 s per sample on a CPU).
DENSE_LIMIT = 2048


def choose_method(shape: tuple[int, int, int], method: str = "auto", dense_limit: int = DENSE_LIMIT) -> str:
    """`auto` is exact (`dense`) when both sides of J are at most `dense_limit`, else `block`."""
    if method not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}")
    if method == "auto":
        return "dense" if max(shape[1:]) <= dense_limit else "block"
    return method


def solve(op: BatchedOperator, k: int, *, method: str = "auto", tol: float = 1e-3,
          dense_limit: int = DENSE_LIMIT, seed: int = 0) -> SVDResult:
    """Top-k triplets of every sample's J: exact (`dense`), randomized block Krylov (`block`) or
    single-vector Lanczos (`lanczos`); `auto` picks by size (`choose_method`)."""
    method = choose_method(op.shape, method, dense_limit)
    if method == "dense":
        return dense_svd(op, k)
    if method == "block":
        return block_krylov_svd(op, k, tol=tol, seed=seed)
    return lanczos_svd(op, k, tol=tol, seed=seed)
