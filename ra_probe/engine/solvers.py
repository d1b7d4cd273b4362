"""Top-k singular triplets of a batch of operators (spec §4), each sample solved on its own but in
lock-step: every step is one batched product. Solvers see only `BatchedOperator`s."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ra_probe.engine.operators import BatchedOperator


@dataclass
class SVDResult:
    """Per sample b: `S[b]` (k,) best first, `U[b]` (m, k), `V[b]` (n, k), and the residual norms
    ‖J v − σ u‖ (`res_left`) and ‖Jᵀ u − σ v‖ (`res_right`) of each triplet, (B, k)."""

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
    U, S, V = U[..., :k], S[:, :k], Vh[:, :k].transpose(1, 2)
    res_left = (matrices @ V - U * S[:, None]).norm(dim=1)
    res_right = (matrices.transpose(1, 2) @ U - V * S[:, None]).norm(dim=1)
    return SVDResult(S, U, V, res_left, res_right, op.products - before, 1, "dense",
                     torch.ones(S.shape[0], dtype=torch.bool, device=S.device))


def _orthogonalize(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """w − Q Qᵀ w, twice (classical Gram–Schmidt with re-orthogonalization), batched: w (B, n), Q (B, n, j)."""
    for _ in range(2):
        w = w - (basis @ (basis.transpose(1, 2) @ w.unsqueeze(-1))).squeeze(-1)
    return w


def _random_unit_orthogonal(basis: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    batch, n, _ = basis.shape
    w = torch.randn(batch, n, dtype=basis.dtype, device=basis.device, generator=generator)
    w = _orthogonalize(w, basis)
    return w / w.norm(dim=1, keepdim=True)


def lanczos_svd(op: BatchedOperator, k: int, *, tol: float = 1e-3, max_iter: int | None = None,
                seed: int = 0) -> SVDResult:
    """Golub–Kahan–Lanczos bidiagonalization with full re-orthogonalization, lock-step over the batch.

    After j steps J V_j = U_j B_j and Jᵀ U_j = V_j B_jᵀ + β_j v_{j+1} e_jᵀ with B_j upper bidiagonal.
    For B_j = P Σ Qᵀ the Ritz triplets (σ_i, U_j p_i, V_j q_i) satisfy J v = σ u exactly and
    ‖Jᵀ u − σ v‖ = β_j |p_i[j]|. A sample has converged when that bound is ≤ tol·σ_1 for its top k;
    the iteration stops when every sample has converged (or the Krylov space is exhausted). A breakdown
    (α or β ≈ 0: an invariant subspace) restarts with a random vector orthogonal to the basis."""
    batch, m, n = op.shape
    dim = min(m, n)
    k = min(k, dim)
    max_iter = min(dim, max_iter or max(3 * k + 20, 60))
    dtype, device = op.dtype, op.device
    generator = torch.Generator(device=device).manual_seed(seed)
    before = op.products
    eps = torch.finfo(dtype).eps

    Vb = torch.zeros(batch, n, max_iter + 1, dtype=dtype, device=device)
    Ub = torch.zeros(batch, m, max_iter, dtype=dtype, device=device)
    alpha = torch.zeros(batch, max_iter, dtype=dtype, device=device)
    beta = torch.zeros(batch, max_iter, dtype=dtype, device=device)
    Vb[:, :, 0] = _random_unit_orthogonal(Vb[:, :, :0], generator)
    scale = torch.zeros(batch, dtype=dtype, device=device)  # running estimate of ‖J‖ for breakdown tests
    converged = torch.zeros(batch, dtype=torch.bool, device=device)
    j = 0
    for j in range(max_iter):
        v = Vb[:, :, j]
        u = op.matvec(v)
        if j > 0:
            u = u - beta[:, j - 1, None] * Ub[:, :, j - 1]
        u = _orthogonalize(u, Ub[:, :, :j])
        a = u.norm(dim=1)
        scale = torch.maximum(scale, a)
        broke = a <= 10 * eps * scale.clamp_min(eps) * max(m, n) ** 0.5
        u = torch.where(broke[:, None], _random_unit_orthogonal(Ub[:, :, :j], generator), u / a.clamp_min(eps)[:, None])
        alpha[:, j] = torch.where(broke, torch.zeros_like(a), a)
        Ub[:, :, j] = u

        w = op.rmatvec(u) - alpha[:, j, None] * v
        w = _orthogonalize(w, Vb[:, :, :j + 1])
        b = w.norm(dim=1)
        scale = torch.maximum(scale, b)
        broke = b <= 10 * eps * scale.clamp_min(eps) * max(m, n) ** 0.5
        if j + 1 < n:
            fresh = _random_unit_orthogonal(Vb[:, :, :j + 1], generator)
            Vb[:, :, j + 1] = torch.where(broke[:, None], fresh, w / b.clamp_min(eps)[:, None])
        beta[:, j] = torch.where(broke, torch.zeros_like(b), b)

        if j + 1 >= k:
            S, P, Q, bound = _ritz(alpha[:, :j + 1], beta[:, :j + 1], k)
            converged = (bound <= tol * S[:, :1].clamp_min(eps)).all(dim=1) | (S[:, 0] <= eps)
            if bool(converged.all()):
                break
    steps = j + 1
    S, P, Q, bound = _ritz(alpha[:, :steps], beta[:, :steps], k)
    U = Ub[:, :, :steps] @ P
    V = Vb[:, :, :steps] @ Q
    return SVDResult(S, U, V, torch.zeros_like(bound), bound, op.products - before, steps, "lanczos",
                     converged)


def _ritz(alpha: torch.Tensor, beta: torch.Tensor, k: int):
    """SVD of the j × j upper bidiagonal B (diag α, super-diagonal β_1..β_{j−1}) and the residual
    bounds β_j |P[j−1, i]| of the top-k Ritz triplets."""
    steps = alpha.shape[1]
    B = torch.diag_embed(alpha) + torch.diag_embed(beta[:, :steps - 1], offset=1)
    P, S, Qh = torch.linalg.svd(B)
    k = min(k, steps)
    bound = beta[:, steps - 1, None].abs() * P[:, steps - 1, :k].abs()
    return S[:, :k], P[:, :, :k], Qh[:, :k].transpose(1, 2), bound


def solve(op: BatchedOperator, k: int, *, method: str = "auto", tol: float = 1e-3,
          dense_limit: int = 4096, seed: int = 0) -> SVDResult:
    """Top-k triplets: exact (`dense`) when both sides of J are at most `dense_limit`, else Lanczos."""
    _, m, n = op.shape
    if method == "dense" or (method == "auto" and max(m, n) <= dense_limit):
        return dense_svd(op, k)
    if method in ("auto", "lanczos"):
        return lanczos_svd(op, k, tol=tol, seed=seed)
    raise ValueError(f"unknown solver {method!r}")
