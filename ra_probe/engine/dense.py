"""The exact solver: form every sample's J and take its SVD, and the result every solver returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ra_probe.engine.operators import BatchedOperator


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


# Vectors per sample and step. A wider block makes Gram–Schmidt's skinny GEMMs more efficient per
