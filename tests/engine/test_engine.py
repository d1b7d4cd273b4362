"""The engine against operators with known spectra, against dense Jacobians of real sites, and the
promise that probing never changes the model."""
from __future__ import annotations

import contextlib
import functools
import gc
import weakref

import pytest
import timm
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.func import jacrev
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ra_probe import Settings, probe
from ra_probe.engine import (
    DenseOperator,
    JacobianOperator,
    auto_batch_size,
    default_width,
    dense_svd,
    krylov_svd,
    memory,
)
from ra_probe.engine.krylov import flushing_denormals
from ra_probe.engine.memory import bytes_per_sample
from ra_probe.engine.solvers import choose_method
from ra_probe.load.data import Samples
from ra_probe.load.loaded import LoadedModel
from ra_probe.load.models import load_model
from ra_probe.pipeline.measure import measure, site_dims
from ra_probe.pipeline.prepare import prepared
from ra_probe.sites.discover import discover

# a basis smaller than the test operators' dimensions, so that they are solved by Krylov steps
SMALL_BASIS = 64
SOLVERS = {"block 2": lambda op, k, **kw: krylov_svd(op, k, width=2, max_basis=SMALL_BASIS, **kw),
           "default": lambda op, k, **kw: krylov_svd(op, k, max_basis=SMALL_BASIS, **kw)}
SPECTRA = {
    "decaying": 0.8 ** torch.arange(150.0),
    # a flat top of k nearly equal values, then a tail: the top-k subspace is well defined, its vectors barely
    "flat": torch.cat([torch.linspace(1.0, 0.97, 10), 0.3 * torch.linspace(1.0, 0.5, 140)]),
}


def known_operator(singular_values: torch.Tensor, *, batch: int = 2, m: int = 180, n: int = 200,
                   dtype=torch.float64, seed: int = 0):
    """B matrices U diag(s) Vᵀ with random orthonormal U (m × r), V (n × r): prescribed singular values."""
    generator = torch.Generator().manual_seed(seed)
    r = len(singular_values)
    U = torch.linalg.qr(torch.randn(batch, m, r, generator=generator, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(batch, n, r, generator=generator, dtype=torch.float64))[0]
    matrices = (U * singular_values.double()) @ V.mT
    return DenseOperator(matrices.to(dtype)), matrices, V


def true_residuals(matrices: torch.Tensor, result):
    """‖J v − σ u‖ and ‖Jᵀ u − σ v‖ measured explicitly, in float64."""
    U, V, S = result.U.double(), result.V.double(), result.S.double()
    return (matrices @ V - U * S[:, None]).norm(dim=1), (matrices.mT @ U - V * S[:, None]).norm(dim=1)


def sin_subspace_angle(V: torch.Tensor, V_true: torch.Tensor) -> torch.Tensor:
    """Sine of the largest principal angle between span(V) and span(V_true), per sample."""
    outside = V - V_true @ (V_true.mT @ V)
    return torch.linalg.matrix_norm(outside, ord=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("solver", SOLVERS)
def test_known_spectrum_within_tolerance(solver, spectrum, dtype):
    k, tol, s = 10, 1e-3, SPECTRA[spectrum]
    op, matrices, V_true = known_operator(s, dtype=dtype)
    result = SOLVERS[solver](op, k, tol=tol)
    assert result.converged.all()
    assert ((result.S.double() - s[:k].double()).abs() <= tol * s[0]).all()
    assert (sin_subspace_angle(result.V.double(), V_true[:, :, :k]) <= 10 * tol).all()
    left, right = true_residuals(matrices, result)
    assert (result.res_left >= left).all() and (result.res_right >= right).all()
    assert (result.res_right <= tol * result.S[:, :1] * 1.01).all()


@pytest.mark.parametrize("block", [1, 4])
def test_bound_is_honest_when_not_converged(block):
    """A slowly decaying spectrum that the column budget cannot resolve, and a tolerance below float32
    rounding: both reported as unconverged, and the reported residuals still bound the true ones."""
    s = torch.linspace(1.0, 0.5, 150)
    op, matrices, _ = known_operator(s, m=160, n=170)
    for result in (krylov_svd(op, 8, width=block, tol=1e-6, max_columns=40, max_basis=SMALL_BASIS),
                   krylov_svd(known_operator(s, m=160, n=170, dtype=torch.float32)[0], 8, width=block, tol=1e-7,
                              max_basis=SMALL_BASIS)):
        assert not result.converged.any()
        left, right = true_residuals(matrices, result)
        assert (result.res_left >= left).all() and (result.res_right >= right).all()


@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("block", [2, 3, 8])
def test_restarts_keep_the_answer(spectrum, block):
    """A basis far smaller than the Krylov space the solve needs (it restarts many times from its
    leading Ritz vectors) reaches the same triplets as the unrestarted solve, with honest bounds."""
    k, tol, s = 10, 1e-4, SPECTRA[spectrum]
    op, matrices, V_true = known_operator(s)
    full = krylov_svd(op, k, width=block, tol=tol, max_basis=170)
    small = krylov_svd(op, k, width=block, tol=tol, max_basis=k + 2 * block)
    assert full.converged.all() and small.converged.all()
    assert small.iterations > (k + 2 * block) // block  # it did restart
    assert ((small.S - s[:k].double()).abs() <= tol * s[0]).all()
    assert (sin_subspace_angle(small.V, V_true[:, :, :k]) <= 10 * tol).all()
    left, right = true_residuals(matrices, small)
    assert (small.res_left >= left).all() and (small.res_right >= right).all()


@pytest.mark.parametrize("passes", ["adaptive", "adaptive, the basis in chunks", "second pass every step", "always"])
@pytest.mark.parametrize("spectrum", SPECTRA)
def test_gram_schmidt_passes_keep_the_basis_orthogonal(spectrum, passes, monkeypatch):
    """The local + full pass (a second only when the full one removed much), the same over the basis
    in chunks of a few rows, that second pass forced at every step, and two full passes: orthonormal
    singular vectors, the same triplets, honest bounds, through many restarts and in float32 too."""
    from ra_probe.engine import krylov

    if passes == "second pass every step":
        monkeypatch.setattr(krylov, "KEPT_NORM", 2.0)
    if passes.endswith("in chunks"):
        monkeypatch.setattr(krylov, "GS_CHUNK_BYTES", 1)  # chunks of GS_MIN_CHUNK rows
    reorthogonalize = "always" if passes == "always" else "adaptive"
    k, tol, s = 10, 1e-4, SPECTRA[spectrum]
    for dtype, tight in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        op, matrices, V_true = known_operator(s, dtype=dtype)
        result = krylov_svd(op, k, width=4, tol=max(tol, 100 * torch.finfo(dtype).eps), max_basis=k + 8,
                            reorthogonalize=reorthogonalize)
        eye = torch.eye(k, dtype=torch.float64)
        for vectors in (result.U.double(), result.V.double()):
            assert ((vectors.mT @ vectors - eye).abs() <= tight * 10).all()
        assert result.converged.all()
        assert ((result.S.double() - s[:k].double()).abs() <= tol * s[0]).all()
        left, right = true_residuals(matrices, result)
        assert (result.res_left >= left).all() and (result.res_right >= right).all()


def test_a_pass_over_the_basis_in_chunks_is_a_gram_schmidt_pass(monkeypatch):
    """A pass that takes the basis a few rows at a time leaves what one pass over the whole basis
    leaves, to rounding: Y = C basis + the new Y, the new Y orthogonal to the basis; samples left out
    by `only` untouched."""
    from ra_probe.engine import krylov

    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(3, 300, 22, dtype=torch.float64, generator=generator))[0].mT
    Y = torch.randn(3, 2, 300, dtype=torch.float64, generator=generator) + torch.randn(3, 2, 22, generator=generator,
                                                                                       dtype=torch.float64) @ basis
    only = torch.tensor([True, False, True])
    whole, chunked = Y.clone(), Y.clone()
    C_whole = krylov._project_out(whole, basis, only)
    monkeypatch.setattr(krylov, "GS_CHUNK_BYTES", 1)
    C_chunked = krylov._project_out(chunked, basis, only)
    assert krylov.GS_MIN_CHUNK < basis.shape[1]
    torch.testing.assert_close(C_chunked, C_whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(C_chunked @ basis + chunked, Y, rtol=0, atol=1e-12)
    assert (chunked[only] @ basis[only].mT).abs().max() < 1e-12
    assert torch.equal(chunked[1], Y[1]) and not C_chunked[1].any()


def test_solver_restores_the_denormal_mode():
    """Solves flush subnormal floats to zero for speed, and leave the process's mode as they found it."""
    op = known_operator(SPECTRA["decaying"])[0]
    torch.set_flush_denormal(False)  # the CLI, run in this process by other tests, turns it on
    krylov_svd(op, 4, max_basis=SMALL_BASIS)
    assert not flushing_denormals()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormal floats")
    try:
        krylov_svd(op, 4, max_basis=SMALL_BASIS)
        assert flushing_denormals()
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("solver", SOLVERS)
def test_rank_deficient_and_zero_operators(solver):
    """Breakdowns (the Krylov space exhausts the range) restart with fresh directions: a rank-3 operator
    gives its 3 values and then exact zeros; a zero branch gives σ = 0, converged, no NaN."""
    s = torch.tensor([3.0, 2.0, 1.0])
    op, matrices, _ = known_operator(s)
    result = SOLVERS[solver](op, 6, tol=1e-6)
    assert torch.allclose(result.S[:, :3], s.double().expand(2, 3), rtol=1e-6)
    assert (result.S[:, 3:].abs() <= 1e-6).all() and result.converged.all()
    zero = SOLVERS[solver](DenseOperator(torch.zeros(2, 200, 210)), 4)
    assert torch.equal(zero.S, torch.zeros(2, 4)) and zero.converged.all() and not zero.res_right.isnan().any()


def test_converged_samples_stop_spending_products():
    """Two samples of rank 1 converge in k steps, two decaying ones take many more: once half the batch
    has converged it leaves, so the rest runs on two samples (fewer products than lock-step), and every
    sample's values stay right."""
    decaying = 0.9 ** torch.arange(150.0)
    easy, m_easy, _ = known_operator(torch.tensor([1.0]), batch=2, seed=1)
    hard, m_hard, _ = known_operator(decaying, batch=2, seed=2)
    op = DenseOperator(torch.cat([m_easy, m_hard]))
    result = krylov_svd(op, 4, width=2, tol=1e-4, max_basis=SMALL_BASIS)
    assert result.converged.all()
    assert result.products < 4 * 2 * 2 * result.iterations
    expected = torch.cat([torch.tensor([[1.0, 0, 0, 0]] * 2), decaying[:4].double().expand(2, 4)])
    assert torch.allclose(result.S, expected, atol=1e-4)


class CostlyToSplit(DenseOperator):
    """A dense operator whose `select` costs `cost` products before its first (as a linearized
    program's trace does); it logs the batch of each operator it selects."""

    def __init__(self, matrices: torch.Tensor, cost: float, selects: list[int]):
        super().__init__(matrices)
        self.cost, self.selects = cost, selects

    def select_cost(self):
        return self.cost

    def select(self, rows):
        self.selects.append(len(rows))
        return CostlyToSplit(self.matrices[rows], self.cost, self.selects)


def test_finished_samples_leave_once_they_have_cost_what_a_smaller_operator_costs():
    """Two samples of rank 1 and two of a decaying spectrum: the batch shrinks once the first two have
    finished, at once when a smaller operator costs nothing to build, after they have cost what it costs
    (8 products a step at width 2), and never when it costs more than the rest of the solve; the same
    values each time."""
    decaying = 0.9 ** torch.arange(150.0)
    hard = known_operator(decaying, batch=1, seed=2)[1]  # twice: they finish together
    matrices = torch.cat([known_operator(torch.tensor([1.0]), batch=2, seed=1)[1], hard, hard])
    expected = torch.cat([torch.tensor([[1.0, 0, 0, 0]] * 2), decaying[:4].double().expand(2, 4)])
    products, selects = {}, {}
    for cost in (0, 40, 1e9):
        selects[cost] = []
        result = krylov_svd(CostlyToSplit(matrices, cost, selects[cost]), 4, width=2, tol=1e-4, max_basis=SMALL_BASIS)
        assert result.converged.all() and torch.allclose(result.S, expected, atol=1e-4)
        products[cost] = result.products
    assert selects == {0: [2], 40: [2], 1e9: []}
    assert 40 <= products[40] - products[0] < 40 + 8
    assert products[1e9] > products[40]



def clustered(top: torch.Tensor, tail: int = 120) -> torch.Tensor:
    """A spectrum that starts with `top` and goes on with a decaying tail well below it."""
    return torch.cat([top, 0.5 * 0.95 ** torch.arange(float(tail))])


CLUSTERS = {
    "repeated 2": clustered(torch.ones(2)),
    "repeated 6": clustered(torch.ones(6)),
    "repeated 12": clustered(torch.ones(12)),
    "tight 6": clustered(torch.linspace(1.0, 1.0 - 1e-4, 6)),
    "tight 12": clustered(torch.linspace(1.0, 1.0 - 1e-4, 12)),
}
# the width a probe starts from, the narrowest allowed, and a single vector (taken as the narrowest)
CLUSTER_BLOCKS = sorted({1, 2, default_width(16)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", CLUSTER_BLOCKS)
@pytest.mark.parametrize("spectrum", CLUSTERS)
def test_no_skipped_value_in_a_cluster(spectrum, block, dtype):
    """A value repeated more times than the block has vectors, or a cluster tighter than the tolerance:
    a Krylov space from blocks of w vectors holds only w of its directions, and the next value would
    be reported in place of the missing copies. Every copy is found, or the solve says it did not
    converge; here it converges."""
    k, tol, s = 16, 1e-3, CLUSTERS[spectrum]
    op = known_operator(s, dtype=dtype, m=150, n=160)[0]
    result = krylov_svd(op, k, width=block, tol=tol, max_basis=SMALL_BASIS)
    assert result.converged.all()
    assert ((result.S.double() - s[:k].double()).abs() <= tol * s[0]).all(), result.S[:, :14]


def test_a_wider_block_goes_on_from_the_basis(monkeypatch):
    """A sample whose block must grow keeps what it found: the wider solve starts from its Ritz vectors
    and costs fewer products than solving the sample again from a random start at that width, with
    the same values and honest bounds."""
    from ra_probe.engine import krylov

    calls, original = [], krylov._block_gkl

    def logged(op, k, width, **kw):
        result, need, handoffs = original(op, k, width, **kw)
        calls.append((width, kw["start"] is not None, result.products))
        return result, need, handoffs
    monkeypatch.setattr(krylov, "_block_gkl", logged)
    s = CLUSTERS["repeated 6"]
    op, matrices, _ = known_operator(s, m=150, n=160)
    result = krylov_svd(op, 16, width=2, tol=1e-3, max_basis=SMALL_BASIS)
    assert result.converged.all() and ((result.S - s[:16].double()).abs() <= 1e-3).all()
    left, right = true_residuals(matrices, result)
    assert (result.res_left >= left).all() and (result.res_right >= right).all()
    assert len(calls) >= 2 and not calls[0][1] and all(started for _, started, _ in calls[1:])
    monkeypatch.setattr(krylov, "_block_gkl", original)
    for width, _, products in calls[1:]:
        again = krylov_svd(op, 16, width=width, tol=1e-3, max_basis=SMALL_BASIS)
        assert products < again.products


def test_distinct_values_closer_than_the_tolerance_are_told_apart_without_a_wider_block(monkeypatch):
    """Twelve values 3e-4·σ₁ apart, blocks of 2: neighbours first look tied (closer than their bounds),
    as copies of one value would. Going on at width 2 tells them apart as the bounds shrink; widening
    at once (no patience) cost more products. Copies still widen (`test_a_wider_block_goes_on_…`)."""
    from ra_probe.engine import krylov

    s = torch.cat([1 - 3e-4 * torch.arange(12.0), 0.5 * 0.95 ** torch.arange(138.0)])
    op, matrices, _ = known_operator(s, m=150, n=160)
    widths, original = [], krylov._block_gkl

    def logged(op, k, width, **kw):
        widths.append(width)
        return original(op, k, width, **kw)
    monkeypatch.setattr(krylov, "_block_gkl", logged)
    result = krylov_svd(op, 10, width=2, tol=1e-3, max_basis=SMALL_BASIS)
    assert widths == [2] and result.converged.all() and ((result.S - s[:10].double()).abs() <= 1e-3).all()
    left, right = true_residuals(matrices, result)
    assert (result.res_left >= left).all() and (result.res_right >= right).all()
    monkeypatch.setattr(krylov, "TIE_PATIENCE", 0)
    at_once = krylov_svd(op, 10, width=2, tol=1e-3, max_basis=SMALL_BASIS)
    assert max(widths) > 2 and result.products < at_once.products


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_copies_of_a_value_take_a_wider_block_at_once(monkeypatch, dtype):
    """Copies of one value agree far below their bounds, values not yet told apart do not: a value
    repeated twice at blocks of 2 widens as soon as its copies agree, at most a few steps after it shows
    (it waited four restarts first: 4× the products of widening at once)."""
    from ra_probe.engine import krylov

    s = CLUSTERS["repeated 2"]
    op = known_operator(s, m=150, n=160, dtype=dtype)[0]
    result = krylov_svd(op, 16, width=2, tol=1e-3, max_basis=SMALL_BASIS)
    assert result.converged.all() and ((result.S.double() - s[:16].double()).abs() <= 1e-3).all()
    monkeypatch.setattr(krylov, "TIE_PATIENCE", 0)
    assert result.products <= 1.2 * krylov_svd(op, 16, width=2, tol=1e-3, max_basis=SMALL_BASIS).products


def test_the_start_width_follows_the_sites_size_and_device():
    # on a CPU a large site's products outweigh a step's fixed costs: two vectors a step reach the
    # tolerance in fewer of them; small sites and accelerators amortize a step over four
    assert default_width(16, 50_176, "cpu") == 2 and default_width(16, 4_096, "cpu") == 4
    assert default_width(16, 50_176, torch.device("cuda")) == 4
    assert default_width(1, 128) == 2 and default_width(16) == 4  # no dimension: the widest start, for memory


def test_samples_that_reach_one_width_from_different_widths_go_on_in_groups_of_their_own(monkeypatch):
    """Two samples of a batch at width 2: one needs 8 at once, the other 4 and then 8. Both go on at
    width 8 from next blocks of 2 and of 4 vectors: they are solved as two groups (they were joined
    into one, and torch.cat refused the blocks of different widths), and reach the spectrum."""
    from ra_probe.engine import krylov

    original = krylov.cluster_growth
    asked: dict[tuple[int, int], bool] = {}

    def growth(S, bounds, settled, k, width, tol, share=1.0):
        need = original(S, bounds, settled, k, width, tol, share)
        wanted = {2: [4, 8], 4: [8]}.get(width, []) if share == 1.0 else []
        # asked once the basis holds enough columns that both keep as many Ritz vectors (22)
        if not asked.get((width, len(S))) and len(S) == len(wanted) and S.shape[1] >= 24:
            asked[width, len(S)] = True
            return torch.tensor(wanted)
        return need
    monkeypatch.setattr(krylov, "cluster_growth", growth)
    monkeypatch.setattr(krylov, "TIE_PATIENCE", 0)  # the made-up ties show once: widen at once
    s = torch.linspace(1.0, 0.5, 150)  # slow enough that the bases grow past 24 columns
    op, matrices, _ = known_operator(s, m=150, n=160)
    result = krylov_svd(op, 10, width=2, tol=1e-3, max_basis=SMALL_BASIS)
    assert asked == {(2, 2): True, (4, 1): True}
    assert result.converged.all() and ((result.S - s[:10].double()).abs() <= 1e-3).all()
    left, right = true_residuals(matrices, result)
    assert (result.res_left >= left).all() and (result.res_right >= right).all()


def test_bounds_are_honest_after_a_breakdown():
    """A rank-10 operator and blocks of 2: after five steps the Krylov space holds the range, so the
    next block is rounding noise, replaced by fresh directions. What the block had along them is not in
    the Krylov relations any more; the bounds account for it and stay above the true residuals."""
    s = torch.linspace(3.0, 1.0, 10)
    for dtype in (torch.float64, torch.float32):
        for seed in range(3):
            op, matrices, _ = known_operator(s, batch=4, m=120, n=130, seed=seed, dtype=dtype)
            result = krylov_svd(op, 8, width=2, tol=1e-8, max_basis=SMALL_BASIS)
            left, right = true_residuals(matrices, result)
            assert (result.res_left >= left).all() and (result.res_right >= right).all()


class AdjointToRounding(DenseOperator):
    """Jᵀ·u with an error of relative size `error` at every call, as float32 products of a large
    site (a linearized J·v against a vjp) are adjoint only to rounding."""

    def __init__(self, matrices: torch.Tensor, error: float):
        super().__init__(matrices)
        self.error, self.generator = error, torch.Generator().manual_seed(0)

    def rmatmat(self, u, out=None):
        exact = self.matrices.mT @ u
        noise = torch.randn(exact.shape, generator=self.generator, dtype=exact.dtype)
        inexact = exact + self.error * exact.shape[1] ** -0.5 * noise
        return inexact if out is None else out.copy_(inexact)

    def select(self, rows):
        return None


def test_bounds_count_the_products_inexact_adjoint_once_per_step_not_as_a_sum():
    """Each step's error in the Krylov relations (here an inexact Jᵀ) lies in rows of its own, so the
    bounds grow as the root of the steps' squared errors: a solve that needs many steps still meets
    the tolerance (before, the errors were added up: ~2e-5·σ₁ a step kept a flat float32 resnet18
    site from ever converging), and the bounds stay above the true residuals."""
    s = torch.linspace(1.0, 0.6, 150)
    for seed in range(3):
        _, matrices, _ = known_operator(s, m=300, n=320, seed=seed)
        result = krylov_svd(AdjointToRounding(matrices, 1e-4), 8, tol=1e-3, max_basis=48)
        assert result.converged.all()
        assert result.iterations > 48 // default_width(8)  # it restarted: errors of several cycles
        assert ((result.S - s[:8].double()).abs() <= 1e-3).all()
        left, right = true_residuals(matrices, result)
        assert (result.res_left >= left).all() and (result.res_right >= right).all()


def test_results_do_not_depend_on_chunking():
    """Start vectors and every later random vector come from (seed, sample id, step): solving samples
    0-7 in one batch or as 0-3 and 4-7 gives the same numbers, converged samples leaving the batch
    and a sample whose block grows included."""
    decaying = known_operator(0.85 ** torch.arange(150.0), batch=3, seed=3)[1]
    flat = known_operator(torch.linspace(1.0, 0.6, 150), batch=2, seed=4)[1]
    easy = known_operator(torch.tensor([2.0, 1.0]), batch=2, seed=5)[1]
    repeated = known_operator(CLUSTERS["repeated 6"], batch=1, seed=6)[1]
    matrices = torch.cat([decaying[:1], easy[:1], flat[:1], repeated, decaying[1:], easy[1:], flat[1:]])
    solve = functools.partial(krylov_svd, k=8, width=2, tol=1e-4, max_basis=SMALL_BASIS, seed=7)
    whole = solve(DenseOperator(matrices))
    parts = [solve(DenseOperator(matrices[rows]), sample_ids=rows) for rows in (torch.arange(4), torch.arange(4, 8))]
    for name in ("S", "res_right", "res_left"):
        joined = torch.cat([getattr(part, name) for part in parts])
        torch.testing.assert_close(joined, getattr(whole, name), rtol=1e-6, atol=1e-12)
    simple = [0, 2, 4, 5, 7]  # samples whose top-8 values are simple: their vectors are unique up to sign
    V = torch.cat([part.V for part in parts])[simple]
    assert ((V * whole.V[simple]).sum(dim=1).abs() >= 1 - 1e-6).all()


torch.manual_seed(0)
CONV = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1))
CONV.eval().requires_grad_(False).double()
with torch.no_grad():
    CONV[1].running_mean.normal_()
    CONV[1].running_var.uniform_(0.5, 2.0)


def test_jacobian_operator_matches_jacrev_and_is_adjoint():
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    op = JacobianOperator(CONV, x, vectors_per_call=7)
    dense = op.dense()
    expected = torch.stack([jacrev(lambda xi: CONV(xi[None])[0])(xi).reshape(100, 100) for xi in x])
    assert torch.allclose(dense, expected, atol=1e-12)
    V, U = torch.randn(3, 100, 9, dtype=torch.float64), torch.randn(3, 100, 9, dtype=torch.float64)
    assert torch.allclose((U * op.matmat(V)).sum(dim=1), (op.rmatmat(U) * V).sum(dim=1), rtol=1e-10)
    sub = op.select(torch.tensor([2, 0]))
    assert sub is not None and torch.allclose(sub.dense(), dense[[2, 0]], atol=1e-12)



def test_a_jacobian_operator_prices_a_split_by_what_building_it_took(monkeypatch):
    """`select_cost`, in products: nothing before the first product; after, what the forward, the vjp
    function and the linearized program took over what a product took. On a clock where the trace
    takes 0.2 s, the vjp function 0.01 s and a call of 2 samples × 2 vectors 0.004 s (1 ms a product):
    210 products."""
    from ra_probe.engine import linearized, operators

    clock = {"now": 0.0}

    def spend(seconds, f):
        def spending(*args, **kwargs):
            clock["now"] += seconds
            return f(*args, **kwargs)
        return spending

    monkeypatch.setattr(operators, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(linearized, "trace", spend(0.2, linearized.trace))
    monkeypatch.setattr(operators, "vjp", spend(0.01, operators.vjp))
    monkeypatch.setattr(JacobianOperator, "_calls", spend(0.004, JacobianOperator._calls))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    op = JacobianOperator(CONV, x, linearize=True)
    assert op.select_cost() == 0.0
    V, U = torch.randn(2, 100, 2, dtype=torch.float64), torch.randn(2, 100, 2, dtype=torch.float64)
    for _ in range(3):
        op.matmat(V), op.rmatmat(U)
    assert op._lin_fn is not None  # the products came from the linearized program
    assert op.select_cost() == pytest.approx(210)


def test_an_operator_whose_side_input_is_batched_otherwise_is_not_split():
    """A side input batched as samples × heads (WavLM's position bias, (B·h, d)) does not slice with x:
    the branch refuses the smaller batch, and the operator says it cannot be split instead of failing."""
    bias = torch.randn(3 * 2, 5, dtype=torch.float64)

    def branch(x, ctx):
        return (x.repeat_interleave(2, dim=0) * ctx).reshape(x.shape[0], 2, 5).sum(dim=1)
    op = JacobianOperator(branch, torch.randn(3, 5, dtype=torch.float64), ctx=bias)
    assert op.select(torch.tensor([2, 0])) is None
    assert torch.allclose(op.dense()[1], torch.diag(bias[2] + bias[3]))

def per_sample_spectra(loaded: LoadedModel, samples: Samples, **settings) -> dict[str, torch.Tensor]:
    settings = Settings(dtype="float64", **settings)
    with prepared(loaded.module, settings) as model:
        found = discover(model, samples, settings.resolved_device(), settings.resolved_dtype())
        sites, measured = found.sites, measure(model, found.groups, samples, settings)
    return {s.name: torch.cat(measured.site_values("S", s.name)) for s in sites}


def assert_spectra_agree(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        scale = a[name][:, :1]
        assert ((a[name] - b[name]).abs() <= rtol * scale).all(), name


@pytest.mark.parametrize("solver", SOLVERS)
def test_matrix_free_agrees_with_dense_on_the_bundled_model(solver):
    """Every site of the bundled model (128 dimensions, solved by Krylov steps in a smaller basis)."""
    from ra_probe.load.data import load_samples
    from ra_probe.sites.capture import capture

    loaded = load_model("bundled/fc-digits")
    samples = load_samples(None, loaded, limit=3)
    settings = Settings(dtype="float64")
    with prepared(loaded.module, settings) as model:
        sites = discover(model, samples, settings.resolved_device(), settings.resolved_dtype()).sites
        captured = capture(model, samples.inputs.double(), sites)
        for site in sites:
            record = captured.sites[site.name]
            op = JacobianOperator(site.branch, record.x, record.ctx)
            dense, free = dense_svd(op, 8), SOLVERS[solver](op, 8, tol=1e-5)
            assert free.products > 0 and free.method == "block"
            assert_spectra_agree({site.name: dense.S}, {site.name: free.S}, 1e-4)


def tiny_conv_resnet() -> LoadedModel:
    """timm resnet18 at 16×16 pixels (1,024-dim layer1 sites) with trained-like branch spectra: the last
    BatchNorm of each block scales its channels by 0.7^c (random init gives flat spectra)."""
    module = timm.create_model("resnet18", pretrained=False, num_classes=5, zero_init_last=False)
    with torch.no_grad():
        for block in (*module.layer1, *module.layer2, *module.layer3, *module.layer4):
            block.bn2.weight.copy_(0.7 ** torch.arange(float(block.bn2.num_features)))
    return LoadedModel(module, "resnet18-tiny", "test", input_shape=(3, 16, 16), num_classes=5, modality="image")


def test_matrix_free_agrees_with_dense_on_a_conv_resnet():
    loaded = tiny_conv_resnet()
    samples = Samples(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), None, "synthetic")
    dense = per_sample_spectra(loaded, samples, solver="dense", k=6)
    free = per_sample_spectra(loaded, samples, solver="block", k=6, tol=1e-5)
    assert_spectra_agree(dense, free, 1e-4)
    assert all(S[:, 0].min() > 0 for S in dense.values())  # nonzero branches: a real comparison



def test_probe_spectra_do_not_depend_on_samples_per_chunk():
    loaded = tiny_conv_resnet()
    samples = Samples(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)), None, "synthetic")
    whole = per_sample_spectra(loaded, samples, solver="block", k=4, batch_size=4)
    halves = per_sample_spectra(loaded, samples, solver="block", k=4, batch_size=2)
    assert_spectra_agree(whole, halves, 1e-9)

def test_probe_never_changes_the_model():
    loaded = tiny_conv_resnet()
    module = loaded.module.train()
    module.layer1[0].conv1.weight.requires_grad_(False)  # a mix of flags, to see them all kept
    before = {key: value.clone() for key, value in module.state_dict().items()}
    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    modes = {name: m.training for name, m in module.named_modules()}
    samples = Samples(torch.randn(3, 3, 16, 16), None, "synthetic")
    report = probe(loaded, samples, Settings(k=4, solver="block", batch_size=2))
    assert len(report["sites"]) == 8
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)
    assert flags == {name: p.requires_grad for name, p in module.named_parameters()}
    assert modes == {name: m.training for name, m in module.named_modules()}


def test_auto_batch_size_follows_free_memory():
    groups = [[(802_816, 802_816, "block", 40 << 20)] * 3, [(401_408, 401_408, "block", 20 << 20)] * 4]
    args = dict(k=8, align_k=8, width=8, vectors_per_call=16, itemsize=4, device=torch.device("cpu"))
    large = auto_batch_size(groups, 64, free=64 * 2**30, **args)
    small = auto_batch_size(groups, 64, free=8 * 2**30, **args)
    assert 1 <= small < large <= 64
    assert auto_batch_size(groups, 64, free=1, **args) == 1
    assert auto_batch_size([[(128, 128, "block", 4096)]], 64, free=8 * 2**30, **args) == 64
    # an offloaded model's block of weights made resident takes its share of the free memory first
    assert auto_batch_size(groups, 64, free=16 * 2**30, held=8 * 2**30, **args) == small



def test_auto_chooses_dense_only_where_it_is_cheaper():
    """A 2048-dimensional conv site (32 × 8 × 8) with 64 samples per chunk: forming J takes 2048
    products and a 2048² SVD per sample, a Krylov solve of the top 16 a few hundred products: Krylov.
    Tiny fully connected sites are formed and decomposed exactly; a J that does not fit memory is not."""
    assert choose_method((64, 2048, 2048), "auto", k=16) == "block"
    assert choose_method((64, 64, 64), "auto", k=16) == "dense"
    assert choose_method((64, 128, 128), "auto", k=16) == "dense"
    assert choose_method((64, 128, 128), "auto", k=16, free=64 * 128 * 128 * 4) == "block"
    assert choose_method((64, 2048, 2048), "dense", k=16) == "dense"  # asked for, not chosen


def test_memory_estimate_counts_dense_jacobians():
    """A dense solve of a 2048-dimensional conv site holds J, its SVD factors and J again for RA2: the
    estimate per sample covers what the solve allocates, and a Krylov solve of the site costs less."""
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()
    branch.requires_grad_(False)
    x = torch.randn(1, 32, 8, 8)
    matrices = JacobianOperator(branch, x).dense()
    U, S, Vh = torch.linalg.svd(matrices, full_matrices=False)
    allocated = sum(t.numel() * t.element_size() for t in (matrices, U, S, Vh)) / x.shape[0]
    args = dict(k=16, align_k=16, width=4, vectors_per_call=16, itemsize=4)
    saved = JacobianOperator(branch, x).saved_bytes()
    dense = bytes_per_sample([[(2048, 2048, "dense", saved)]], **args)
    krylov = bytes_per_sample([[(2048, 2048, "block", saved)]], **args)
    assert allocated <= dense <= 4 * allocated
    assert krylov < dense / 4

def _status_bytes(key: str) -> int:
    import re
    with open("/proc/self/status") as status:
        return int(re.search(key + r":\s+(\d+) kB", status.read()).group(1)) * 1024


def test_a_probe_stays_within_its_memory_estimate():
    """A conv ResNet whose three sites have 2048 dimensions (32 × 8 × 8), 64 samples in one chunk, k =
    16, RA2 included: the peak of the process' resident memory while measuring (the kernel's high-water
    mark, reset first) stays below the estimate the chunk size is chosen by, and the solves are Krylov."""
    from tiny_models import ResidualConv

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 3, padding=1)
            self.blocks = nn.Sequential(*(ResidualConv(32) for _ in range(3)))
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    settings = Settings(k=16, batch_size=64)
    with prepared(Net(), settings) as model:
        groups = discover(model, Samples(x, None, "synthetic"), settings.resolved_device(),
                          settings.resolved_dtype()).groups
        sites = [site for group in groups for site in group.sites]
        measure(model, groups, Samples(x[:2], None, "warm-up"), Settings(k=16, batch_size=2))  # lazy imports, kernels
        dims = site_dims(model, groups, Samples(x, None, "synthetic"), settings)
        assert {method for group in dims for _, _, method, _ in group} == {"block"}
        estimate = 64 * bytes_per_sample(dims, k=16, align_k=16, width=default_width(16),
                                         vectors_per_call=settings.vectors_per_call,
                                         itemsize=4)
        before = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the high-water mark to the current resident size
        measured = measure(model, groups, Samples(x, None, "synthetic"), settings)
        peak = _status_bytes("VmHWM") - before
    assert {measured.method(s.name) for s in sites} == {"block"} and len(sites) == 3
    assert 0 < peak <= estimate, (peak, estimate)


def test_dense_svd_measures_its_residuals():
    op, matrices, _ = known_operator(SPECTRA["decaying"][:40], batch=2, m=60, n=50)
    result = dense_svd(op, 5)
    left, right = true_residuals(matrices, result)
    assert torch.allclose(result.res_left, left) and torch.allclose(result.res_right, right)


def test_cli_rejects_an_unknown_solver(capsys):
    from ra_probe.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bundled/fc-digits", "--solver", "arnoldi"])
    assert exit_info.value.code == 2
    assert "solver must be one of auto, dense, block," in capsys.readouterr().err


def _linearize_pairs(site_ops):
    """J·V and Jᵀ·U of each operator built with `linearize` on and off, float64."""
    for f, x, ctx in site_ops:
        traced, plain = (JacobianOperator(f, x, ctx, vectors_per_call=3, linearize=flag) for flag in (True, False))
        V = torch.randn(x.shape[0], plain.shape[2], 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        yield traced, plain, V


def test_linearized_products_agree_with_jvp_on_a_conv_and_a_masked_attention_site(tmp_path):
    """The linearize path (large sites) against forward-mode jvp: a conv block with BatchNorm and an
    in-place ReLU, and every site of a BERT whose attention takes a padding mask as a side input."""
    import transformers as tf

    from ra_probe.load.data import load_samples
    from ra_probe.sites.capture import capture

    conv = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                         nn.Conv2d(6, 4, 3, padding=1)).eval().requires_grad_(False).double()
    ops = [(conv, torch.randn(3, 4, 5, 5, dtype=torch.float64), None)]
    config = tf.BertConfig(vocab_size=40, max_position_embeddings=8, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32, architectures=["BertForSequenceClassification"])
    torch.manual_seed(0)
    tf.BertForSequenceClassification(config).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    samples = load_samples("synthetic", loaded, limit=3)
    settings = Settings(dtype="float64")
    with prepared(loaded.module, settings) as model:
        sites = discover(model, samples, settings.resolved_device(), settings.resolved_dtype()).sites
        inputs = dict(samples.inputs)
        inputs["attention_mask"] = inputs["attention_mask"].clone()
        inputs["attention_mask"][0, -3:] = 0  # padding in the first sample: the mask matters
        captured = capture(model, inputs, sites)
        masked = [captured.sites[s.name] for s in sites if captured.sites[s.name].ctx]
        assert masked, "an attention site with side inputs"
        ops += [(s.branch, captured.sites[s.name].x, captured.sites[s.name].ctx) for s in sites]
        for traced, plain, V in _linearize_pairs(ops):
            torch.testing.assert_close(traced.matmat(V), plain.matmat(V), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(traced.matmat(V[..., :1]), plain.matmat(V[..., :1]), rtol=1e-10, atol=1e-10)
            assert isinstance(traced._lin_fn, torch.fx.GraphModule)  # our program ran, no fallback
            sub = traced.select(torch.tensor([2, 0]))
            torch.testing.assert_close(sub.matmat(V[[2, 0]]), plain.matmat(V)[[2, 0]], rtol=1e-10, atol=1e-10)


def _calls(program: torch.fx.GraphModule) -> list[str]:
    return [node.target.__name__ for node in program.graph.nodes if node.op == "call_function"]


def test_linearized_programs_do_only_the_work_that_depends_on_the_tangent():
    """A conv block (BatchNorm, in-place ReLU): two convolutions (none with the weights' zero
    tangents), no copies. A pre-norm GELU MLP: two matrix products, GELU's derivative a factor."""
    from ra_probe.engine.linearized import linearize

    conv = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                         nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4)).eval().requires_grad_(False).double()
    mlp = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)).requires_grad_(False).double()
    cases = ((conv, torch.randn(3, 4, 5, 5, dtype=torch.float64)), (mlp, torch.randn(3, 7, 8, dtype=torch.float64)))
    for module, x in cases:
        program = linearize(module, x)
        v = torch.randn_like(x)
        torch.testing.assert_close(program(v), torch.func.jvp(module, (x,), (v,))[1], rtol=1e-10, atol=1e-12)
        calls = _calls(program)
        assert not {"copy_", "_to_copy", "clone", "gelu_backward", "_new_zeros_with_same_feature_meta"} & set(calls)
        # the weights it multiplies by are the module's own tensors, not copies
        weights = {p.untyped_storage().data_ptr() for p in module.parameters() if p.ndim >= 2}
        assert weights <= {b.untyped_storage().data_ptr() for b in program.buffers()}
        assert calls.count("convolution.default") == (2 if module is conv else 0)
        assert calls.count("mm.default") + calls.count("addmm.default") == (2 if module is mlp else 0)
    before = x.clone()
    program(torch.randn_like(x))
    assert torch.equal(x, before)


def test_a_program_that_cannot_be_rewritten_falls_back_to_torchs(monkeypatch):
    """When the rewrite gives up (`Unsupported`), torch's constant folding of the same trace gives J·V,
    with the same numbers, and its program goes as soon as the operator releases it, with Python's
    cycle collector off (`torch.func.linearize`'s own stayed in reference cycles)."""
    from torch.fx.experimental import const_fold

    from ra_probe.engine import linearized

    def unsupported(traced, x):
        raise linearized.Unsupported("a test")
    monkeypatch.setattr(linearized, "specialize", unsupported)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    V = torch.randn(2, 100, 3, dtype=torch.float64)
    expected = JacobianOperator(CONV, x, linearize=False).matmat(V)
    gc.collect()
    gc.disable()
    try:
        op = JacobianOperator(CONV, x, linearize=True)
        torch.testing.assert_close(op.matmat(V), expected)
        assert op.linearize and isinstance(op._lin_fn, const_fold.FoldedGraphModule)
        program = weakref.ref(op._lin_fn)
        op.release()
        assert program() is None
    finally:
        gc.enable()


def test_the_linearized_product_is_traced_once_per_operator(monkeypatch):
    """An operator's J·t is traced once: after `release` (between a site's solve and its RA2 products)
    the program is built again from the kept trace, with the same numbers; `keep_trace=False` drops it."""
    from ra_probe.engine import linearized

    traces = []
    trace = linearized.trace
    monkeypatch.setattr(linearized, "trace", lambda f, x: traces.append(x) or trace(f, x))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    op = JacobianOperator(CONV, x, linearize=True)
    V = torch.randn(2, op.shape[2], 3, dtype=torch.float64)
    first = op.matmat(V)
    assert isinstance(op._lin_fn, torch.fx.GraphModule) and len(traces) == 1
    op.release()
    assert op._lin_fn is None
    torch.testing.assert_close(op.matmat(V), first, rtol=0, atol=0)
    assert isinstance(op._lin_fn, torch.fx.GraphModule) and len(traces) == 1
    op.release(keep_trace=False)
    torch.testing.assert_close(op.matmat(V), first, rtol=0, atol=0)
    assert len(traces) == 2


def test_released_and_dropped_operators_free_their_programs_without_the_cycle_collector():
    """What a linearized program holds of the forward (GELU's derivative) goes as soon as its operator
    releases it, or drops it (a narrowed operator the solver is done with), with Python's cycle collector
    off: at 2304 tokens an attention's program holds 0.5 GB a sample, and a probe's sites left them behind
    faster than the collector ran."""
    mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)).double().requires_grad_(False)
    x = torch.randn(3, 16, 8, dtype=torch.float64)
    V = torch.randn(3, 128, 2, dtype=torch.float64)
    theirs = {t.untyped_storage().data_ptr() for t in [x, *mlp.parameters()]}

    def computed(op):  # weak references to the program's constants that are neither x nor a weight
        return [weakref.ref(b) for b in op._lin_fn.buffers() if b.untyped_storage().data_ptr() not in theirs]

    gc.collect()
    gc.disable()
    try:
        op = JacobianOperator(mlp, x, linearize=True)
        op.matmat(V)
        held = computed(op)
        assert held and all(ref() is not None for ref in held)
        op.release()
        assert all(ref() is None for ref in held)
        trace = weakref.ref(op._traced)
        op.release(keep_trace=False)
        assert trace() is None
        sub = op.select(torch.tensor([0, 2]))
        sub.matmat(V[[0, 2]])
        held = computed(sub)
        assert held
        del sub
        assert all(ref() is None for ref in held)
    finally:
        gc.enable()


def test_a_probe_traces_each_sites_product_once_per_sample_set(monkeypatch):
    """Two linearized conv sites (32 × 24 × 24) in one group: RA2's products after the solves build
    their programs from the solves' traces, so no operator's samples are traced twice."""
    from tiny_models import ResidualConv

    from ra_probe.engine import linearized

    traced, built = [], []
    trace, specialize = linearized.trace, linearized.specialize
    monkeypatch.setattr(linearized, "trace", lambda f, x: traced.append(x) or trace(f, x))
    monkeypatch.setattr(linearized, "specialize", lambda t, x: built.append(x) or specialize(t, x))
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), ResidualConv(32), ResidualConv(32))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 24, 24)
    settings = Settings(k=2, tol=1e-2, batch_size=2, solver="block")
    with prepared(model, settings) as prepared_model:
        groups = discover(prepared_model, Samples(x, None, "synthetic"), settings.resolved_device(),
                          settings.resolved_dtype()).groups
        measure(prepared_model, groups, Samples(x, None, "synthetic"), settings)
    assert sum(len(group.sites) for group in groups) == 2
    assert len(built) >= len(traced) + 2  # each site's RA2 program built again without a trace
    assert len({id(t) for t in traced}) == len(traced)


def test_linearize_is_chosen_by_size_and_falls_back_to_jvp():
    from ra_probe.engine.operators import LINEARIZE_MIN_DIM

    small = JacobianOperator(CONV, torch.randn(2, 4, 5, 5, dtype=torch.float64))
    assert not small.linearize
    big = JacobianOperator(lambda x: 2 * x, torch.randn(1, LINEARIZE_MIN_DIM, dtype=torch.float64))
    assert big.linearize

    def untraceable(x):  # data-dependent Python control flow: make_fx cannot trace it
        return x * 3 if bool(x.sum() > -1e9) else x

    x = torch.randn(2, 7, dtype=torch.float64)
    op = JacobianOperator(untraceable, x, linearize=True)
    V = torch.randn(2, 7, 3, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), 3 * V)
    assert not op.linearize


class LargeAllocations(TorchDispatchMode):
    """Counts tensors of at least `nbytes` that an operation creates in new storage (not written into a
    tensor it was given, not a view), except while `paused`."""

    def __init__(self, nbytes: int):
        super().__init__()
        self.nbytes, self.count, self.bytes, self.paused = nbytes, 0, 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.paused:
            given = {_storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            new = [t.untyped_storage().nbytes() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)
                   and _storage(t) not in given | {None} and t.untyped_storage().nbytes() >= self.nbytes]
            self.count += len(new)
            self.bytes += sum(new)
        return out

    @contextlib.contextmanager
    def pause(self):
        self.paused = True
        try:
            yield
        finally:
            self.paused = False


def _storage(t: torch.Tensor) -> int | None:
    """Where a tensor's memory is; None for a tensor with no memory of its own (a transform's wrapper,
    a tracer's fake tensor)."""
    if isinstance(t, FakeTensor):
        return None
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return None


class ProductsApart(DenseOperator):
    """A dense operator whose products are left out of a `LargeAllocations` count (they are the operator's)."""

    def __init__(self, matrices, counter):
        super().__init__(matrices)
        self.counter = counter

    def matmat(self, v, out=None):
        with self.counter.pause():
            return super().matmat(v, out)

    def rmatmat(self, u, out=None):
        with self.counter.pause():
            return super().rmatmat(u, out)

    def select(self, rows):
        return ProductsApart(self.matrices[rows], self.counter)


def test_a_solve_allocates_its_blocks_once_not_every_step():
    """The solver writes every step's blocks (products, Gram–Schmidt and QR results) and every restart's
    rotated bases into buffers made once per solve: five times the steps (and restarts) allocate no
    more block-sized tensors. Allocating them at every step had the kernel map fresh zeroed pages for
    them each time (glibc hands large freed blocks back), a third of a probe's CPU time."""
    matrices = known_operator(0.99 ** torch.arange(150.0), batch=2, m=2000, n=2100)[1]
    counts = {}
    for columns in (160, 800):
        counter = LargeAllocations(nbytes=2 * 4 * 2000 * 8)  # one block: B samples × w vectors × m
        with counter:
            result = krylov_svd(ProductsApart(matrices, counter), 8, width=4, tol=0.0, max_basis=SMALL_BASIS,
                                max_columns=columns)
        counts[columns] = counter.count
        assert result.iterations == columns // 4 and not result.converged.any()
    assert counts[800] == counts[160], counts


def test_samples_taken_before_the_rest_get_their_vectors_without_a_copy_of_their_bases(monkeypatch):
    """A sample that finishes before the others gets its singular vectors from its bases as they lie:
    no copy of them (hi × d a sample and side: 0.3 GB for four 224-px samples of a ResNet's first stage)."""
    from ra_probe.engine import krylov

    fast = known_operator(0.5 ** torch.arange(150.0), batch=1, seed=1, m=2000, n=2100)[1]
    slow = known_operator(0.95 ** torch.arange(150.0), batch=2, seed=2, m=2000, n=2100)[1]
    k, takes, take = 4, [], krylov._BlockGKL.take

    def counted(self, ritz, finished, hi):
        counter = LargeAllocations(nbytes=(k + 1) * 2000 * 8)  # more than the vectors taken: k × d a sample
        with counter:
            take(self, ritz, finished, hi)
        takes.append((int(finished.sum()), len(self.rows), hi, counter.count))

    monkeypatch.setattr(krylov._BlockGKL, "take", counted)
    result = krylov_svd(DenseOperator(torch.cat([fast, slow])), k, width=2, tol=1e-4, max_basis=SMALL_BASIS)
    assert result.converged.all()
    apart = [t for t in takes if t[0] < t[1]]
    assert apart and all(hi > k + 1 for _, _, hi, _ in apart), takes  # a basis larger than what is taken
    assert all(count == 0 for *_, count in apart), takes


def test_a_jacobian_solve_allocates_per_step_only_what_its_products_compute():
    """Per Krylov step of a solve over a network branch, the block-sized memory allocated is what J·V
    and Jᵀ·U of one block allocate for the branch's own operations (given the block laid out as the
    vectors times the samples, the layout those operations view as one batch): the same whatever the
    basis size, with no copy of the block (before: J·V copied its block from the row-major basis at
    every call) and nothing of the basis' size."""
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                           nn.Conv2d(32, 32, 3, padding=1)).eval().requires_grad_(False)
    x, batch, width = torch.randn(2, 32, 16, 16), 2, 4
    d = x[0].numel()
    block = batch * width * d * 4

    def allocated(run) -> int:
        counter = LargeAllocations(nbytes=block)
        with counter:
            run()
        return counter.bytes

    op = JacobianOperator(branch, x, linearize=True)
    laid_out = torch.randn(width, batch, d).permute(1, 2, 0)  # (B, d, w): vectors × samples in memory
    out = torch.empty(batch, d, width)

    def both():
        op.matmat(laid_out, out=out), op.rmatmat(laid_out, out=out)
    both()  # traced, buffers made
    products = allocated(both)
    per_step = {}
    for basis in (64, 96):
        def solve(basis=basis, columns=40):
            return krylov_svd(JacobianOperator(branch, x, linearize=True), 4, width=width, tol=0.0, max_basis=basis,
                              max_columns=columns)
        runs = [allocated(functools.partial(solve, columns=columns)) for columns in (40, 200)]
        per_step[basis] = (runs[1] - runs[0]) / (200 // width - 40 // width)
    assert per_step[64] == per_step[96], per_step
    assert 0 < per_step[64] <= products, (per_step, products)


def test_cpu_calls_keep_their_tensors_within_a_size_the_allocator_reuses(monkeypatch):
    """On the CPU a product call takes as few vectors as keep its temporaries (`TEMPORARIES_PER_SAVED`
    times what the branch saves of a sample, per vector and sample) within `CPU_CALL_BYTES` (glibc maps
    large temporaries afresh at every call: a fifth of a 224-px probe's CPU time went to the kernel's
    page faults); the products are the same as in calls of the whole block."""
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    branch.requires_grad_(False)
    x, width = torch.randn(2, 8, 12, 12), 4
    tangents = x.numel() * 4  # one vector of every sample, float32
    V = torch.randn(2, x[0].numel(), width)
    whole = JacobianOperator(branch, x, linearize=True)
    expected = (whole.matmat(V), whole.rmatmat(V))
    per_vector = x.shape[0] * memory.TEMPORARIES_PER_SAVED * whole.saved_bytes()
    for cap, vectors in ((per_vector * width, width), (per_vector, 1)):
        monkeypatch.setattr(memory, "CPU_CALL_BYTES", cap)
        op = JacobianOperator(branch, x, linearize=True)
        op.matmat(V), op.rmatmat(V)  # traced, buffers made
        counter, outs = LargeAllocations(nbytes=tangents * 2), (torch.empty_like(V), torch.empty_like(V))
        with counter:  # tensors of two vectors or more
            products = (op.matmat(V, out=outs[0]), op.rmatmat(V, out=outs[1]))
        assert (counter.count > 0) == (vectors > 1), (cap, counter.count)
        for got, want in zip(products, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
