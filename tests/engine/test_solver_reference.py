"""The Krylov solver against two independent ones on fixed operators whose spectra are built in:
scipy's ARPACK (`svds`) and numpy's dense SVD. Top-k values, and the subspaces they span (principal
angles), for a geometric decay, repeated and clustered values, tall and wide rectangles and a low-rank
operator."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles
from scipy.sparse.linalg import svds

from ra_probe.engine import DenseOperator, krylov_svd

TOL = 1e-8  # the solver's relative residual tolerance here: tight, so that its answer can be checked to ~1e-7


def constructed(singular_values: list[float] | np.ndarray, m: int, n: int, seed: int) -> np.ndarray:
    """U diag(s) Vᵀ (m × n) with random orthonormal U, V from `seed`: singular values known exactly."""
    rng = np.random.default_rng(seed)
    s = np.asarray(singular_values, dtype=np.float64)
    U = np.linalg.qr(rng.standard_normal((m, len(s))))[0]
    V = np.linalg.qr(rng.standard_normal((n, len(s))))[0]
    return (U * s) @ V.T


def geometric(m, n, seed):
    return constructed(0.85 ** np.arange(min(m, n)), m, n, seed)


def clustered(m, n, seed):
    """A value repeated five times (more copies than the solver's starting block has vectors), a tight
    cluster of three, a pair, then a decaying tail."""
    top = [5.0] * 5 + [3.0, 2.999, 2.998] + [2.0, 2.0] + [1.0, 0.99]
    tail = 0.5 * 0.9 ** np.arange(min(m, n) - len(top))
    return constructed(np.concatenate([top, tail]), m, n, seed)


def linear(m, n, seed):
    return constructed(np.linspace(3.0, 0.01, min(m, n)), m, n, seed)


def low_rank(m, n, seed):
    return constructed([4.0, 3.0, 2.5, 1.0, 0.5], m, n, seed)


# name: (matrices of the batch, k, the index ranges whose subspaces are compared: whole clusters only,
# since the vectors of a repeated value are any basis of its subspace)
CASES = {
    "geometric decay": ([geometric(400, 400, 0), geometric(400, 400, 1)], 10, [(i, i + 1) for i in range(10)]),
    "repeated and clustered": ([clustered(360, 420, 2), clustered(360, 420, 3)], 12,
                               [(0, 5), (5, 8), (8, 10), (10, 11), (11, 12)]),
    "tall": ([linear(700, 260, 4), linear(700, 260, 5)], 8, [(i, i + 1) for i in range(8)]),
    "wide": ([linear(260, 700, 6), linear(260, 700, 7)], 8, [(i, i + 1) for i in range(8)]),
    "low rank": ([low_rank(300, 340, 8), low_rank(300, 340, 9)], 8, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),
}


def krylov(matrices: list[np.ndarray], k: int):
    result = krylov_svd(DenseOperator(torch.from_numpy(np.stack(matrices))), k, tol=TOL, seed=0)
    assert result.method != "dense" and bool(result.converged.all()), "not a converged Krylov solve"
    return result.S.numpy(), result.U.numpy(), result.V.numpy()


def arpack(A: np.ndarray, k: int):
    """ARPACK's top k, best first (svds returns them in ascending order)."""
    v0 = np.random.default_rng(0).standard_normal(min(A.shape))
    U, S, Vt = svds(A, k=k, ncv=40 + 2 * k, tol=1e-12, which="LM", v0=v0, solver="arpack")
    order = np.argsort(S)[::-1]
    return S[order], U[:, order], Vt[order].T


def largest_sine(X: np.ndarray, Y: np.ndarray) -> float:
    """sin of the largest principal angle between span(X) and span(Y)."""
    return float(np.sin(subspace_angles(X, Y).max()))


@pytest.mark.parametrize("case", list(CASES))
def test_krylov_agrees_with_arpack_and_the_dense_svd(case):
    matrices, k, clusters = CASES[case]
    S, U, V = krylov(matrices, k)
    for b, A in enumerate(matrices):
        U_dense, S_dense, Vt_dense = np.linalg.svd(A, full_matrices=False)
        S_arpack, U_arpack, V_arpack = arpack(A, k)
        scale = S_dense[0]
        # the two references agree with each other, so either may stand for the truth
        np.testing.assert_allclose(S_arpack, S_dense[:k], rtol=0, atol=1e-10 * scale)
        np.testing.assert_allclose(S[b], S_dense[:k], rtol=0, atol=1e-7 * scale, err_msg=f"{case}, sample {b}")
        np.testing.assert_allclose(S[b], S_arpack, rtol=0, atol=1e-7 * scale, err_msg=f"{case}, sample {b}")
        for lo, hi in clusters:
            for mine, dense, reference in ((U[b], U_dense, U_arpack), (V[b], Vt_dense.T, V_arpack)):
                assert largest_sine(mine[:, lo:hi], dense[:, lo:hi]) < 1e-5, f"{case}, sample {b}, values {lo}:{hi}"
                assert largest_sine(mine[:, lo:hi], reference[:, lo:hi]) < 1e-5, f"{case}, sample {b}, {lo}:{hi}"


def test_beyond_the_rank_the_values_are_zero_and_the_vectors_orthonormal():
    matrices, k, _ = CASES["low rank"]
    S, U, V = krylov(matrices, k)
    for b in range(len(matrices)):
        np.testing.assert_allclose(S[b], [4.0, 3.0, 2.5, 1.0, 0.5, 0.0, 0.0, 0.0], rtol=0, atol=1e-7 * 4.0)
        np.testing.assert_allclose(U[b].T @ U[b], np.eye(k), atol=1e-8)
        np.testing.assert_allclose(V[b].T @ V[b], np.eye(k), atol=1e-8)


def test_the_built_in_spectra_are_what_the_solver_returns():
    """The constructed spectra themselves, not only the references' reading of them."""
    matrices, k, _ = CASES["repeated and clustered"]
    S, _, _ = krylov(matrices, k)
    expected = [5.0] * 5 + [3.0, 2.999, 2.998, 2.0, 2.0, 1.0, 0.99]
    for b in range(len(matrices)):
        np.testing.assert_allclose(S[b], expected, rtol=0, atol=1e-7 * 5.0)


@pytest.mark.parametrize("tol", [1e-3, 1e-5])
def test_at_a_probes_tolerance_no_copy_of_a_repeated_value_is_skipped(tol):
    """Stopped at the tolerance a probe uses, long before rounding could bring a lost copy back, every
    copy of a value repeated more often than the starting block is wide is there, each value within
    the tolerance of the dense SVD's and ARPACK's, each cluster's subspace within its bound."""
    matrices, k, clusters = CASES["repeated and clustered"]
    result = krylov_svd(DenseOperator(torch.from_numpy(np.stack(matrices))), k, tol=tol, seed=0)
    assert bool(result.converged.all())
    for b, A in enumerate(matrices):
        U_dense, S_dense, Vt_dense = np.linalg.svd(A, full_matrices=False)
        S_arpack = arpack(A, k)[0]
        for reference in (S_dense[:k], S_arpack):
            np.testing.assert_allclose(result.S[b].numpy(), reference, rtol=0, atol=tol * S_dense[0])
        for lo, hi in [(0, 5), (5, 8), (8, 10)]:  # clusters at least 1 apart from their neighbours
            assert largest_sine(result.U[b, :, lo:hi].numpy(), U_dense[:, lo:hi]) < 2 * tol * S_dense[0]
            assert largest_sine(result.V[b, :, lo:hi].numpy(), Vt_dense[lo:hi].T) < 2 * tol * S_dense[0]
