"""Which solver a site gets, and the solve itself: exact (`dense`, engine.dense) or block Krylov
(`block`, engine.krylov); `auto` picks by estimated cost. Solvers see only `BatchedOperator`s."""
from __future__ import annotations

import torch

from ra_probe.engine import krylov
from ra_probe.engine.dense import SVDResult, dense_svd
from ra_probe.engine.operators import BatchedOperator, DenseOperator, wide_calls

SOLVERS = ("auto", "dense", "block")


# The cost model of `auto`, in units of one Jacobian product of one sample. A Krylov solve of the
# top k at tol 1e-3 took 14-58 products per triplet (vit_tiny MLP, trained conv sites, flat random
# resnet18 layer1), and never fewer than its first basis (~50 columns a side) however small k is.
# Forming J takes n products in wide, cheap calls; its SVD ~10 m n min(m, n) flops, against a
# product's ~300 (m + n) flops plus a call's fixed cost (conv and MLP branches on a CPU).
KRYLOV_PRODUCTS_PER_K, KRYLOV_MIN_K = 40, 8
DENSE_PRODUCT_SHARE = 0.5  # a product inside the wide calls that form J, against one in a Krylov step
FLOPS_PER_PRODUCT_PER_DIM, FLOPS_PER_CALL = 300, 2e6
DENSE_LIMIT = 2048  # auto never forms a J with a side larger than this (--dense-limit)


def method_costs(m: int, n: int, k: int) -> dict[str, float]:
    """Estimated cost of one sample's top-k SVD of J (m × n) per method, in products."""
    product_flops = FLOPS_PER_PRODUCT_PER_DIM * (m + n) + FLOPS_PER_CALL
    dense = DENSE_PRODUCT_SHARE * n + 10 * m * n * min(m, n) / product_flops
    return {"dense": dense, "block": KRYLOV_PRODUCTS_PER_K * max(min(k, m, n), KRYLOV_MIN_K)}


def choose_method(shape: tuple[int, int, int], method: str = "auto", dense_limit: int = DENSE_LIMIT, *,
                  k: int = 16, itemsize: int = 4, free: int | None = None, after: int = 0) -> str:
    """`auto` is exact (`dense`) where forming and decomposing J costs fewer products than a Krylov
    solve (`method_costs`) and the `after` products per sample J will still be applied to once solved
    (RA2 alignment: a formed J takes them as matrix products), both sides are at most `dense_limit` and
    the B matrices (B m n elements, kept for RA2) fit in half of `free` bytes when given; else `block`."""
    if method not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}")
    if method != "auto":
        return method
    batch, m, n = shape
    costs = method_costs(m, n, k)
    fits = free is None or batch * m * n * itemsize <= free // 2
    cheaper = costs["dense"] <= costs["block"] + DENSE_PRODUCT_SHARE * after  # wide calls, as J is formed
    return "dense" if max(m, n) <= dense_limit and fits and cheaper else "block"


def solve_operator(op: BatchedOperator, k: int, *, method: str = "auto", tol: float = 1e-3,
                   dense_limit: int = DENSE_LIMIT, seed: int = 0, sample_ids: torch.Tensor | None = None,
                   reorthogonalize: str = "adaptive", after: int = 0) -> tuple[BatchedOperator, SVDResult]:
    """Top-k triplets of every sample's J, exact (`dense`) or block Krylov (`block`); `auto` picks by
    estimated cost (`choose_method`, `after`: the products per sample J will still be applied to).
    Returns the operator that further products with J should use (J itself, a `DenseOperator`, where
    the dense method formed it, in wide calls; else `op`) and the result, whose products count those
    that formed J."""
    method = choose_method(op.shape, method, dense_limit, k=k, itemsize=op.dtype.itemsize, after=after)
    if method == "block":
        return op, krylov.krylov_svd(op, k, tol=tol, seed=seed, sample_ids=sample_ids,
                                     reorthogonalize=reorthogonalize)
    before = op.products
    if isinstance(op, DenseOperator):
        formed = op
    else:
        with wide_calls(op, op.shape[2]):
            formed = DenseOperator(op.dense())
    result = dense_svd(formed, k)
    result.products = op.products - before
    return formed, result


def solve(op: BatchedOperator, k: int, **options) -> SVDResult:
    """The result of `solve_operator`."""
    return solve_operator(op, k, **options)[1]
