"""Top-k triplets of a batch of operators by block Golub–Kahan–Lanczos, each sample solved on its own
but in lock-step: every step is one batched product. The solve is a state object (`_BlockGKL`) whose
steps are named: extend both bases by a block, check the Ritz values, take the finished samples,
shrink the batch, restart from the leading Ritz vectors."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from dataclasses import dataclass

import torch

from ra_probe.engine.dense import SVDResult, dense_svd
from ra_probe.engine.memory import basis_size, kept_columns
from ra_probe.engine.operators import BatchedOperator

# The block width: a wider block pays each step's Gram–Schmidt and Ritz check for more vectors and
# makes each product call wider, but takes more products to reach a tolerance. Where a step's fixed
# costs (a call's dispatch, the Ritz check) weigh, a wide block amortizes them; where the products
# dominate (a large site on a CPU), two vectors reach the tolerance in fewer of them.
# benchmarks/peers.py (one thread, top 10 at tol 1e-3), s per sample (products) at width 4 / 2:
# a BERT FFN (2,048 dims) 0.084 (312) / 0.107 (260), a trained conv site (4,096) 0.075 (190) /
# 0.079 (154); a vit_tiny MLP (37,824) 0.34 (146) / 0.28 (109), a random-init resnet18 layer1
# (50,176) 1.26 (566) / 1.04 (450). No early Ritz value tells a flat spectrum from a decaying one
# (their first checks spread alike), and with `TIE_PATIENCE` neither needs four: the width follows
# the site's size and device.
DEFAULT_WIDTH = 4
NARROW_WIDTH, NARROW_MIN_DIM = 2, 16384  # on a CPU, sites of at least this many dimensions
MIN_WIDTH = 2  # a single vector cannot tell a repeated value from a simple one


def default_width(k: int, dim: int = 0, device: str | torch.device = "cpu") -> int:
    """Start width of the block Krylov solver for top-`k` triplets of a site of `dim` = max(m, n)
    dimensions on `device` (it grows a sample's block when a cluster of values shows as many copies
    as the block has vectors); without `dim`, the widest start (memory estimates)."""
    narrow = torch.device(device).type == "cpu" and dim >= NARROW_MIN_DIM
    return max(MIN_WIDTH, min(NARROW_WIDTH if narrow else DEFAULT_WIDTH, k + 1))


# Columns a solve may visit per sample (restarts included) before it stops unconverged: trained conv
# sites need ~10k-25k at tol 1e-3; beyond 60k the spectrum is too flat for the tolerance.
MAX_COLUMNS_PER_K = 60

# Restarts' worth of columns a sample goes on at its width while it shows a tie (`cluster_growth`)
# before it takes a wider block. A tie is either copies of one value, which only a wider block finds,
# or values the solve has not told apart yet, which more columns at the same width tell apart as the
# bounds shrink: on a flat spectrum (a random init, neighbours ~1e-3·σ₁ apart) most ties are the
# latter. A random-init resnet18 layer1, blocks of 2, products a sample with patience 0 / 1 / 2 / 3 /
# 4 / 6: 735 / 731 / 598 / 474 / 450 / 450 (every sample went on at width 4 without it); blocks of
# 4: 738 / 566; a BERT FFN's blocks of 2 369 / 260. Copies of a value pay the wait in products.
TIE_PATIENCE = 4
# Copies of one value agree far below their bounds (measured: to ~1e-11 of them in float64, ~1e-3 in
# float32), values not yet told apart about to their gap (0.1–1 of the bounds on the flat resnet18): a
# cluster whose neighbours agree to this share of their bounds takes a wider block at once.
COPY_SHARE = 1e-2


def random_rows(seed: int, ids: torch.Tensor, rows: int, dim: int, dtype: torch.dtype, device: torch.device,
                *stream: int) -> torch.Tensor:
    """Gaussian rows (len(ids), rows, dim): sample `ids[b]`'s rows come from a generator of its own,
    seeded by (seed, sample id, *stream), drawn on the CPU: the same numbers whatever the batch, the
    position in it, or the device."""
    out = torch.empty(len(ids), rows, dim, dtype=dtype)
    for b, sample in enumerate(ids.tolist()):
        key = hashlib.blake2b(repr((seed, sample, *stream)).encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
        out[b] = torch.randn(rows, dim, dtype=dtype, generator=generator)
    return out.to(device)


# Gram–Schmidt passes over the whole basis (`reorthogonalize`): "adaptive" (a local pass against the
# basis' last block, one full pass, a second only where the full pass removed much:
# `_orthonormal_extension`) or "always" (two full passes).
REORTHOGONALIZE = ("adaptive", "always")
# A full pass that keeps at least this share of the block's norm leaves it as orthogonal to the
# basis, to rounding, as a second pass would (Kahan and Parlett's "twice is enough" criterion).
KEPT_NORM = 0.5


def _orthonormal_extension(Y: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor, fresh,
                           out: torch.Tensor | None = None, reorthogonalize: str = "adaptive"
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows Y (B, w, d) = C basis + Rᵀ Q with Q (B, w, d) orthonormal rows orthogonal to the rows of
    `basis` (B, j, d), C (B, w, j), R (B, w, w) upper triangular: block Gram–Schmidt passes (GEMMs on
    row-major blocks, `_project_out`), then a QR of the d × w remainder. Y is overwritten (the passes subtract in
    place); Q is written into `out` (B, w, d) when given (contiguous), else into a new tensor.

    In Golub–Kahan–Lanczos a new block's large part lies along the basis' last block (w rows): a
    pass against that block alone (two w × w × d GEMMs) takes it off, then one pass over the whole
    basis takes off the rest. When that pass keeps at least `KEPT_NORM` of a sample's norm, the
    remainder is as orthogonal as a second pass would make it; otherwise (after a restart, near a
    breakdown) a second full pass runs on that sample (on that sample only: its numbers must not
    depend on the batch). The GEMMs over the basis cost ~j/w times the local ones, so this is about
    half the memory traffic of two full passes.

    Directions Y lacks (|R_ii| at rounding level against `scale` (B,): a breakdown, an invariant
    subspace was found) are replaced by rows of `fresh(which)` (B, w, d), so the basis keeps growing;
    what Y had along them (their rows of R) is dropped from the relation and returned as its
    Frobenius norm `dropped` (B,), for the caller to add to its residual bounds."""
    w, j = Y.shape[1], basis.shape[1]
    if reorthogonalize == "adaptive" and j > w:
        L = _project_out(Y, basis[:, j - w:])
        before = Y.norm(dim=(1, 2))
        C = _project_out(Y, basis)
        C[:, :, j - w:] += L
        again = Y.norm(dim=(1, 2)) < KEPT_NORM * before
        if bool(again.any()):  # on those samples only, so that a sample's numbers do not depend on the others
            C = C + _project_out(Y, basis, again)
    else:
        C = _project_out(Y, basis)
        C = C + _project_out(Y, basis)
    if out is None:
        out = torch.empty_like(Y)
    R = Y.new_empty(Y.shape[0], w, w)
    torch.linalg.qr(Y.mT, out=(out.mT, R))  # Q's columns are out's rows: no copy
    Q = out
    eps = torch.finfo(Y.dtype).eps
    lacking = R.diagonal(dim1=1, dim2=2).abs() <= 100 * eps * scale[:, None]
    dropped = torch.zeros_like(scale)
    if bool(lacking.any()):  # rare (a breakdown): new tensors are fine here
        dropped = (R * lacking[:, :, None]).norm(dim=(1, 2))
        Q = torch.where(lacking[:, :, None], fresh(lacking), Q)
        R = R.masked_fill(lacking[:, :, None], 0.0)
        for _ in range(2):
            _project_out(Q, basis)
        Qc, R2 = torch.linalg.qr(Q.mT)
        out.copy_(Qc.mT)
        Q, R = out, R2 @ R  # Y − C basis = Rᵀ Q_old (rows lacking dropped) = (R2 R)ᵀ Q_new
    return Q, C, R, dropped


# A Gram–Schmidt pass reads the basis twice (for C, then to subtract C basis). On a CPU, a sample's
# basis taken in chunks of about this many bytes is read from memory once, the second time from cache:
# a pass over 54 columns of 4 samples × 37,824 dims (the basis twice the size of the L3 cache) took
# 0.6× the time of one pass over the whole basis, of 8 samples × 200,704 dims 0.55×; bases that fit in
# the cache whole gain nothing, and accelerators take the whole basis in one pass.
GS_CHUNK_BYTES = 2 << 20
GS_MIN_CHUNK = 4  # rows: narrower products of w × rows coefficients lose more than the cache saves


def _project_out(Y: torch.Tensor, basis: torch.Tensor, only: torch.Tensor | None = None) -> torch.Tensor:
    """One Gram–Schmidt pass in place, Y ← Y − C basis; returns C. With `only` (B,) bool, samples
    outside it are left as they are (C = 0). Where the basis is taken in chunks (`GS_CHUNK_BYTES`),
    each chunk's coefficients are those of what earlier chunks left (a block modified Gram–Schmidt,
    no less stable than the classical one): still Y = C basis + the new Y."""
    batch, w, d = Y.shape
    rows = max(GS_MIN_CHUNK, GS_CHUNK_BYTES // (d * Y.element_size()))
    if basis.device.type != "cpu" or rows >= basis.shape[1]:
        C = Y @ basis.mT
        if only is not None:
            C = C * only[:, None, None]
        Y.baddbmm_(C, basis, alpha=-1)
        return C
    C = Y.new_zeros(batch, w, basis.shape[1])
    for b in range(batch) if only is None else only.nonzero().flatten().tolist():
        for first in range(0, basis.shape[1], rows):
            chunk = basis[b, first:first + rows]
            coefficients = Y[b] @ chunk.T
            Y[b].addmm_(coefficients, chunk, alpha=-1)
            C[b, :, first:first + rows] = coefficients
    return C


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


def cluster_growth(S: torch.Tensor, bounds: torch.Tensor, settled: torch.Tensor, k: int, width: int,
                   tol: float, share: float = 1.0) -> torch.Tensor:
    """The block width each sample needs, (B,) int64, 0 when its current `width` can be trusted.

    A Krylov space grown from blocks of w vectors holds at most w directions of any singular
    subspace: a value repeated μ ≥ w times shows exactly w copies and the next value is reported in
    place of the others; a cluster does the same until the solve tells its values apart. So a chain
    of settled Ritz values among the top k of S (B, ≥k) that the solve cannot tell apart (neighbours
    closer than the sum of their residual `bounds` (B, ≥k), as each may mix the values within its
    bound, and closer than `tol`·σ₁), that holds ≥ w values and ends before index k − 1 (a value
    after it is reported) asks for a block of twice the chain. A chain that reaches k − 1 may lose
    a member to a later value, at an error of at most one gap: within the tolerance.

    Values the solve has told apart are distinct values it found. Judged at the tolerance alone, the
    chains of a flat spectrum (a network at random init: neighbours ~1e-3·σ₁ apart, resolved far
    below that) widened blocks again and again: 40 % of the time of a random-init resnet18's probe.
    With `share` < 1, only neighbours closer than that share of their bounds' sum count (`COPY_SHARE`)."""
    top, ok = S[:, :k], settled[:, :k]
    apart = torch.minimum(share * (bounds[:, :k - 1] + bounds[:, 1:k]), tol * top[:, :1])
    tied = (top[:, :-1] - top[:, 1:] <= apart) & ok[:, :-1] & ok[:, 1:]
    need = torch.zeros(S.shape[0], dtype=torch.long)
    for b in tied.any(dim=1).nonzero().flatten().tolist():  # rare: a short loop over k values
        pairs, first = tied[b].tolist(), 0
        for last in range(k):
            if last < k - 1 and pairs[last]:
                continue
            size = last - first + 1
            if size >= width and last < k - 1:
                need[b] = max(int(need[b]), 2 * size)
            first = last + 1
    return need


@dataclass
class _Continuation:
    """Where the solve of some samples goes on from with a wider block: the leading Ritz triplets of
    their basis, best first (values S (B, r), vectors U (B, r, m) and V (B, r, n)), the next block of
    right vectors N (B, w, n) that the Krylov relation Jᵀ U = V Σ + N R holds with, and what the
    bounds have counted so far: `drift_left`, `drift_right` (B,) float64 (sums of squares,
    `_BlockGKL.extend`), `scale` (B,), `visited` columns and `steps` (B,) int64. `rows` are the
    samples, in the operator they came from."""

    rows: torch.Tensor
    S: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    N: torch.Tensor
    drift_left: torch.Tensor
    drift_right: torch.Tensor
    scale: torch.Tensor
    visited: torch.Tensor
    steps: torch.Tensor

    def leading(self, r: int) -> _Continuation:
        """The same, keeping only the leading `r` triplets: Jᵀ U_r = V_r Σ_r + N R_r still holds."""
        return dataclasses.replace(self, S=self.S[:, :r], U=self.U[:, :r], V=self.V[:, :r])

    def at(self, rows: torch.Tensor) -> _Continuation:
        return _Continuation(self.rows[rows], *(getattr(self, f.name)[rows.to(getattr(self, f.name).device)]
                                                for f in dataclasses.fields(self)[1:]))

    @staticmethod
    def join(parts: list[_Continuation]) -> _Continuation:
        fields = dataclasses.fields(_Continuation)
        return _Continuation(*(torch.cat([getattr(part, f.name) for part in parts]) for f in fields))


def _columns(k: int, width: int, m: int, n: int, device: torch.device, max_basis: int | None) -> int:
    """Columns of a solve's basis per side (it restarts when they are full)."""
    return min(max(max_basis or basis_size(k, width, min(m, n), device), k + 3 * width), min(m, n))


@_flushing_denormals
def krylov_svd(op: BatchedOperator, k: int, *, width: int | None = None, tol: float = 1e-3,
               max_basis: int | None = None, max_columns: int | None = None, seed: int = 0,
               sample_ids: torch.Tensor | None = None, reorthogonalize: str = "adaptive") -> SVDResult:
    """Top-k triplets by block Golub–Kahan–Lanczos bidiagonalization with full re-orthogonalization,
    lock-step over the samples (`_block_gkl`), from `width` vectors per sample (at least 2; default:
    `default_width`).

    A sample whose settled Ritz values show a cluster with as many values as its block has vectors
    may be missing copies (`cluster_growth`): once the cluster has held for `TIE_PATIENCE` restarts'
    worth of columns (values not yet told apart come apart meanwhile), or at once where its values
    agree as copies do (`COPY_SHARE`), its solve goes on from its Ritz vectors with a block twice the
    cluster, the new vectors drawn at random, until the clusters it shows are smaller than its block.
    Every random vector of sample b comes from (seed, sample_ids[b], width, step): a sample's numbers
    do not depend on the other samples of the batch (default ids: 0 … B−1).
    `reorthogonalize`: the Gram–Schmidt passes, one of `REORTHOGONALIZE`."""
    if reorthogonalize not in REORTHOGONALIZE:
        raise ValueError(f"unknown reorthogonalize {reorthogonalize!r}")
    batch, m, n = op.shape
    k = min(k, m, n)
    ids = torch.arange(batch) if sample_ids is None else sample_ids.detach().cpu().long()
    out = _empty_result(op, k)
    products, iterations = 0, 0
    # by block width: samples to solve from a random start, and samples to go on with from their Ritz vectors
    start_width = max(MIN_WIDTH, width or default_width(k, max(m, n), op.device))
    fresh: dict[int, list[torch.Tensor]] = {start_width: [torch.arange(batch)]}
    going_on: dict[int, list[_Continuation]] = {}
    while fresh or going_on:
        width = min(fresh.keys() | going_on.keys())
        cols = _columns(k, width, m, n, op.device, max_basis)
        groups = [(torch.cat(fresh.pop(width)), None)] if width in fresh else []
        # joined when they keep as many Ritz vectors and carry next blocks as wide (they came from one width)
        by_size: dict[tuple[int, int], list[_Continuation]] = {}
        for start in going_on.pop(width, []):
            start = start.leading(min(start.S.shape[1], kept_columns(k, width, cols)))
            by_size.setdefault((start.S.shape[1], start.N.shape[1]), []).append(start)
        groups += [(start.rows, start) for start in map(_Continuation.join, by_size.values())]
        for rows, start in groups:
            sub = op if torch.equal(rows, torch.arange(batch)) else op.select(rows.to(op.device))
            alone = sub is None  # an operator that cannot be split: solve all its samples from the start
            if alone:
                sub, start = op, None
            if cols + width > min(m, n):  # the basis would fill the space: the dense SVD is exact and cheaper
                before = sub.products
                result, need, handoffs = dense_svd(sub, k), torch.zeros(sub.shape[0], dtype=torch.long), []
                result.products = sub.products - before
            else:
                result, need, handoffs = _block_gkl(
                    sub, k, width, tol=tol, cols=cols, seed=seed, ids=ids if sub is op else ids[rows],
                    max_columns=max_columns or MAX_COLUMNS_PER_K * k, start=start,
                    reorthogonalize=reorthogonalize)
            products += result.products
            iterations = max(iterations, result.iterations)
            take = rows if alone else torch.arange(len(rows))  # our rows among sub's samples
            settled = need[take] == 0
            target, source = rows[settled].to(op.device), take[settled].to(op.device)
            for name in ("S", "U", "V", "res_left", "res_right", "converged"):
                getattr(out, name)[target] = getattr(result, name)[source].to(getattr(out, name).dtype)
            if alone:
                for wider in need[take][~settled].unique().tolist():
                    fresh.setdefault(wider, []).append(rows[need[take] == wider])
            else:
                for handoff in handoffs:
                    wider = need[handoff.rows]
                    handoff.rows = rows[handoff.rows]
                    for width_ in wider.unique().tolist():
                        going_on.setdefault(width_, []).append(handoff.at((wider == width_).nonzero().flatten()))
    out.products, out.iterations = products, iterations
    return out


def _empty_result(op: BatchedOperator, k: int) -> SVDResult:
    batch, m, n = op.shape
    zeros = functools.partial(torch.zeros, dtype=op.dtype, device=op.device)
    return SVDResult(zeros(batch, k), zeros(batch, m, k), zeros(batch, n, k), zeros(batch, k), zeros(batch, k),
                     0, 0, "block", torch.zeros(batch, dtype=torch.bool, device=op.device))


def _block_gkl(op: BatchedOperator, k: int, width: int, *, tol: float, cols: int, max_columns: int, seed: int,
               ids: torch.Tensor, start: _Continuation | None = None, reorthogonalize: str = "adaptive"
               ) -> tuple[SVDResult, torch.Tensor, list[_Continuation]]:
    """One block Golub–Kahan–Lanczos solve with blocks of `width` vectors, lock-step over the samples.

    From an orthonormal random block V_1 (n × w), each step applies J to one block and Jᵀ to one
    block per sample: J V_i = U_{<i} C + U_i R and Jᵀ U_i = V_{≤i} C' + V_{i+1} R'. So J V = U T with
    T = Uᵀ J V (upper block triangular), and for T = P Σ Qᵀ each Ritz triplet (σ, u = U p, v = V q)
    satisfies J v = σ u and Jᵀ u − σ v = V_{i+1} R' p_i (p_i: p's last block), up to rounding,
    bounded by eps·(√(m+n) + basis + columns visited)·σ₁, and up to what a breakdown dropped and
    how far C' is from T's last block row (both measured, added to the bounds). A sample is done when
    the bound of each of its top-k triplets is ≤ tol·σ₁ (a tol below rounding is never met) and it
    shows no tie, when a tie has held for `TIE_PATIENCE` restarts' worth of columns or looks like
    copies (it needs a wider block: `cluster_growth`), or after `max_columns` columns; its triplets
    are taken at that step, whatever the other samples still do.

    When the `cols` columns are full, the basis is replaced by its leading Ritz vectors
    (`kept_columns`): T becomes diag(Σ) and the next block V_{i+1} carries on, so both relations hold
    (Wu & Simon's thick restart). A `start` goes on the same way from Ritz vectors and a next block of
    fewer than w vectors, completed with random ones orthogonal to the basis: Jᵀ U = V Σ + N R
    still holds, with zero rows of R for the new vectors. Such a solve is done only when the top k
    plus as many triplets as it has new vectors have settled: right after the start the top k are the
    settled ones from before, and a copy that only the new vectors can find shows up later. Done
    samples leave the batch once they are half of it, when the operator can be split.

    Returns the result, the block width each sample needs (0: none) and, for the samples that need
    one, where to go on from (`rows` among op's samples)."""
    solve = _BlockGKL(op, k, width, tol=tol, cols=cols, max_columns=max_columns, seed=seed, ids=ids, start=start,
                      reorthogonalize=reorthogonalize)
    return solve.run()


class _Workspace:
    """What every step of a solve writes into, allocated once per solve: the rows of J V (B, w, m) and
    of Jᵀ U (B, w, n), their orthonormal parts, and the rotated vectors of a restart (B·kept·max(m, n)
    elements). Steps that allocated these anew had the kernel map and zero fresh pages for them every
    time (glibc hands large freed blocks back to the system): a third of a probe's CPU time. The batch
    only shrinks, so a smaller batch uses the leading samples of each buffer."""

    def __init__(self, batch: int, w: int, m: int, n: int, kept: int, dtype: torch.dtype, device: torch.device):
        new = functools.partial(torch.empty, dtype=dtype, device=device)
        self.left, self.right = new(batch, w, m), new(batch, w, n)
        self.left_q, self.right_q = new(batch, w, m), new(batch, w, n)
        self._rotated = new(batch * kept * max(m, n))

    def rotated(self, batch: int, rows: int, dim: int) -> torch.Tensor:
        return self._rotated[:batch * rows * dim].view(batch, rows, dim)


@dataclass
class _Ritz:
    """A Ritz check: T = P diag(S) Qhᵀ, the bounds `left`, `right` (B, watched) of the leading
    triplets, which samples converged, the block width each needs (`cluster_growth`) and whether its
    cluster looks like copies of one value (then it widens without waiting: `COPY_SHARE`)."""

    P: torch.Tensor
    S: torch.Tensor
    Qh: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    converged: torch.Tensor
    need: torch.Tensor
    copies: torch.Tensor

    def at(self, rows: torch.Tensor) -> _Ritz:
        return _Ritz(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))


def _compact(basis: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The samples `rows` (increasing) of `basis` moved to its front in place, as a view of them: no
    copy of the whole basis is allocated when the batch shrinks."""
    for to, source in enumerate(rows.tolist()):
        if to != source:  # source ≥ to, and every source still to read lies after `to`
            basis[to].copy_(basis[source])
    return basis[:len(rows)]


class _BlockGKL:
    """The state of one `_block_gkl` solve and its steps: `extend` both bases by a block, `check` the
    Ritz triplets, `take` those of finished samples, `shrink` the batch to the samples still working,
    `restart` from the leading Ritz vectors."""

    def __init__(self, op: BatchedOperator, k: int, width: int, *, tol: float, cols: int, max_columns: int,
                 seed: int, ids: torch.Tensor, start: _Continuation | None, reorthogonalize: str = "adaptive"):
        batch, self.m, self.n = op.shape
        self.op, self.k, self.w, self.tol, self.cols, self.seed, self.ids = op, k, width, tol, cols, seed, ids
        self.dtype, self.device, self.reorthogonalize = op.dtype, op.device, reorthogonalize
        self.keep = kept_columns(k, width, cols)
        self.steps_cap = -(-max_columns // width)
        self.out = _empty_result(op, k)
        self.need_out = torch.zeros(batch, dtype=torch.long)
        self.handoffs: list[_Continuation] = []
        self.rows = torch.arange(batch)  # op's samples still in the working batch
        new = functools.partial(torch.empty, dtype=self.dtype, device=self.device)
        self.Vb, self.Ub = new(batch, cols + width, self.n), new(batch, cols, self.m)  # row-major bases
        self.T = torch.zeros(batch, cols, cols, dtype=torch.float64)  # the projected matrix, on the CPU
        self.work = _Workspace(batch, width, self.m, self.n, self.keep, self.dtype, self.device)
        self.done = torch.zeros(batch, dtype=torch.bool)  # working samples whose triplets are taken
        self.tied_since = torch.full((batch,), -1, dtype=torch.long)  # the step a sample first showed a tie
        self.patience = TIE_PATIENCE * (cols - self.keep) // width  # steps
        self.splittable = True
        # finished samples the batch carries while it may shrink, and the products they have cost since
        self.idle, self.carried = 0, 0
        self.products, self.step, self.iterations = -op.products, 0, 0
        self.watch = k  # Ritz triplets that must settle: a start's new vectors must also find what they are after
        self.Rv = torch.zeros(batch, width, width, dtype=self.dtype, device=self.device)
        if start is None:
            self._begin_at_random(batch)
        else:
            self._begin_from(start)

    def _begin_at_random(self, batch: int) -> None:
        """The first right block: orthonormal random rows; nothing counted yet."""
        self.lo = 0
        self.scale = torch.zeros(batch, dtype=self.dtype, device=self.device)
        self.drift_left = torch.zeros(batch, dtype=torch.float64)
        self.drift_right = torch.zeros(batch, dtype=torch.float64)
        self.visited = torch.zeros(batch, dtype=torch.long)
        self.steps = torch.zeros(batch, dtype=torch.long)
        first = random_rows(self.seed, self.ids, self.w, self.n, self.dtype, self.device, 0)
        self.Vb[:, :self.w] = torch.linalg.qr(first.mT)[0].mT

    def _begin_from(self, start: _Continuation) -> None:
        """Go on from Ritz triplets and their next block, completed to w vectors by random ones
        orthogonal to the basis; T is their values and the bounds keep what they counted."""
        self.lo, carried = start.S.shape[1], start.N.shape[1]
        lo, width = self.lo, self.w
        self.watch = self.k + width - carried
        self.scale, self.drift_left, self.drift_right = start.scale, start.drift_left, start.drift_right
        self.visited, self.steps = start.visited, start.steps
        self.Ub[:, :lo], self.Vb[:, :lo], self.Vb[:, lo:lo + carried] = start.U, start.V, start.N
        self.T[:, :lo, :lo] = torch.diag_embed(start.S.cpu().double())
        extra = random_rows(self.seed, self.ids, width - carried, self.n, self.dtype, self.device, width, 0)
        self.Vb[:, lo + carried:lo + width] = _orthonormal_extension(
            extra, self.Vb[:, :lo + carried], self.scale, self._fresh(self.n, 0),
            reorthogonalize=self.reorthogonalize)[0]

    def _fresh(self, dim: int, side: int):
        """Random rows for the directions a block lacks (`_orthonormal_extension`), from the sample's
        generator at this step."""
        def draw(lacking: torch.Tensor) -> torch.Tensor:
            which = lacking.any(dim=1)
            rows = torch.zeros(lacking.shape[0], lacking.shape[1], dim, dtype=self.dtype, device=self.device)
            rows[which] = random_rows(self.seed, self.ids[self.rows[which.cpu()]], lacking.shape[1], dim, self.dtype,
                                      self.device, self.w, self.step, side)
            return rows
        return draw

    def run(self) -> tuple[SVDResult, torch.Tensor, list[_Continuation]]:
        while True:
            hi = self.extend()
            self.carried += 2 * self.w * self.idle
            full = hi + self.w > self.cols
            if hi < self.k or not (full or self.step % (1 + hi // 256) == 0 or self.step >= self.steps_cap):
                self.lo = hi
                continue  # a Ritz check costs an SVD of T: large bases check every few steps
            ritz = self.check(hi)
            tied = ritz.need > 0  # a wider block only for a tie that more columns did not resolve
            self.tied_since = torch.where(tied & (self.tied_since < 0), self.step, self.tied_since)
            widen = tied & (ritz.copies | (self.step - self.tied_since >= self.patience))
            finished = ((ritz.converged & ~tied) | widen | (self.step >= self.steps_cap)) & ~self.done
            if bool(finished.any()):
                self.take(ritz, finished, hi)
            self.done |= finished
            active = (~self.done).nonzero().flatten()
            if len(active) == 0:
                break
            # the batch shrinks once its finished samples are half of it and have cost in products what the
            # smaller operator costs to build (a linearized program traces again): never more than twice
            # the cheaper of shrinking at once and never (the ski-rental rule)
            self.idle = len(self.rows) - len(active) if self.splittable and 2 * len(active) <= len(self.rows) else 0
            if self.idle and self.carried >= self.op.select_cost():
                ritz = self.shrink(active, ritz)
                self.idle = self.carried = 0
            if full:
                hi = self.restart(ritz, hi)
            self.lo = hi
        self.products += self.op.products
        self.out.products, self.out.iterations = self.products, self.iterations
        return self.out, self.need_out, self.handoffs

    def extend(self) -> int:
        """One step: J on the right basis' last block, Jᵀ on the new left block, each orthogonalized
        against its basis into the workspace; T and the drifts of the bounds take what they give.
        Returns the left basis' new size.

        What a step leaves out of the Krylov relations (the rows a breakdown dropped; on the right,
        also how far Jᵀ's projection C' is from T's block row, products adjoint only to rounding) is
        a block of its own rows of the relations' error matrix, so that matrix's 2-norm is at most the
        root of the sum of the steps' squared Frobenius norms: the drifts hold those sums. Restarts
        rotate the error matrix, which keeps its norm. Added up as plain norms instead, the bound
        grew with the number of steps, not with its root: a flat resnet18 site (float32, 200k
        dimensions) never met tol 1e-3, its bound held up by ~2e-5·σ₁ a step."""
        lo, w, batch = self.lo, self.w, len(self.rows)
        hi = lo + w
        self.step += 1
        Y = self.work.left[:batch]
        self.op.matmat(self.Vb[:, lo:hi].mT, out=Y.mT)
        Q, C, R, dropped = _orthonormal_extension(Y, self.Ub[:, :lo], self.scale, self._fresh(self.m, 1),
                                                  out=self.work.left_q[:batch], reorthogonalize=self.reorthogonalize)
        self.scale = torch.maximum(self.scale, R.diagonal(dim1=1, dim2=2).abs().amax(dim=1))
        self.Ub[:, lo:hi] = Q
        self.T[:, :lo, lo:hi] = C.mT.cpu().double()
        self.T[:, lo:hi, lo:hi] = R.cpu().double()
        Z = self.work.right[:batch]
        self.op.rmatmat(Q.mT, out=Z.mT)
        Qv, Cv, self.Rv, dropped_v = _orthonormal_extension(Z, self.Vb[:, :hi], self.scale, self._fresh(self.n, 2),
                                                            out=self.work.right_q[:batch],
                                                            reorthogonalize=self.reorthogonalize)
        self.scale = torch.maximum(self.scale, self.Rv.diagonal(dim1=1, dim2=2).abs().amax(dim=1))
        self.Vb[:, hi:hi + w] = Qv
        self.drift_left += dropped.cpu().double() ** 2
        off_T = (Cv.cpu().double() - self.T[:, lo:hi, :hi]).norm(dim=(1, 2))
        self.drift_right += (dropped_v.cpu().double() + off_T) ** 2
        return hi

    def check(self, hi: int) -> _Ritz:
        """The Ritz triplets of T and their bounds: rounding relative to σ₁ (of a product, of forming a
        Ritz vector from the basis, and of every rotation through the columns visited before: restarts,
        a narrower block's solve), plus what breakdowns dropped and how far C' is from T."""
        eps = torch.finfo(self.dtype).eps
        rounding = eps * (math.sqrt(self.m + self.n) + hi + self.visited[:, None].double() + self.step * self.w)
        P, S, Qh = torch.linalg.svd(self.T[:, :hi, :hi])
        sigma1 = S[:, :1]
        left = self.drift_left[:, None].sqrt() + rounding * sigma1
        right = (self.Rv.cpu().double() @ P[:, self.lo:hi, :self.watch]).norm(dim=1) \
            + self.drift_right[:, None].sqrt() + rounding * sigma1
        left = left.expand_as(right)
        bounds = torch.maximum(left, right)
        settled = bounds <= self.tol * sigma1
        converged = settled.all(dim=1) | (sigma1[:, 0] <= 0)
        need = cluster_growth(S, bounds, settled, self.k, self.w, self.tol)
        copies = cluster_growth(S, bounds, settled, self.k, self.w, self.tol, COPY_SHARE) > 0
        return _Ritz(P, S, Qh, left, right, converged, need, copies)

    def _rotated(self, rotation: torch.Tensor, basis: torch.Tensor, at: torch.Tensor, hi: int) -> torch.Tensor:
        """rotationᵀ times the first `hi` rows of samples `at` (increasing) of a basis, (len(at), r, d): Ritz
        vectors. Sample by sample when `at` is not the whole batch: indexing the basis would copy it
        (hi·d elements a sample and side, 0.3 GB for four 224-px samples of a ResNet's first stage)."""
        if len(at) == basis.shape[0]:
            return rotation.mT @ basis[:, :hi]
        return torch.stack([rotation[i].mT @ basis[b, :hi] for i, b in enumerate(at.tolist())])

    def take(self, ritz: _Ritz, finished: torch.Tensor, hi: int) -> None:
        """The top-k triplets of the finished samples, or, for a sample that needs a wider block, its
        leading Ritz triplets and next block to go on from (as many as a restart at that width keeps)."""
        device, dtype, k = self.device, self.dtype, self.k
        at = finished.nonzero().flatten()
        need = ritz.need
        self.need_out[self.rows[at]] = need[at]
        taken, wider = at[need[at] == 0], at[need[at] > 0]
        if len(taken):  # a sample going on with a wider block gets its own later
            target = self.rows[taken].to(device)
            Pk, Qk = (t[taken, :hi, :k].to(device, dtype) for t in (ritz.P, ritz.Qh.mT))
            self.out.S[target] = ritz.S[taken, :k].to(device, dtype)
            self.out.U[target] = self._rotated(Pk, self.Ub, taken, hi).mT
            self.out.V[target] = self._rotated(Qk, self.Vb, taken, hi).mT
            self.out.res_left[target] = ritz.left[taken, :k].to(device, dtype)
            self.out.res_right[target] = ritz.right[taken, :k].to(device, dtype)
            self.out.converged[target] = ritz.converged[taken].to(device)
        if len(wider):
            r = min(hi, self.keep + int(need[wider].max()) - self.w)
            Pw, Qw = (t[wider, :hi, :r].to(device, dtype) for t in (ritz.P, ritz.Qh.mT))
            on = wider.to(device)
            self.handoffs.append(_Continuation(
                self.rows[wider], ritz.S[wider, :r].to(device, dtype), self._rotated(Pw, self.Ub, wider, hi),
                self._rotated(Qw, self.Vb, wider, hi), self.Vb[on, hi:hi + self.w].clone(), self.drift_left[wider],
                self.drift_right[wider], self.scale[on], self.visited[wider] + self.step * self.w,
                self.steps[wider] + self.step))
        self.iterations = max(self.iterations, int((self.steps[at] + self.step).max()))

    def shrink(self, active: torch.Tensor, ritz: _Ritz) -> _Ritz:
        """The batch reduced to the samples `active` when the operator can be split (else it stays)."""
        smaller = self.op.select(active.to(self.device))
        if smaller is None:
            self.splittable = False
            return ritz
        self.products += self.op.products
        self.op, self.rows = smaller, self.rows[active]
        self.products -= self.op.products
        self.Vb, self.Ub = _compact(self.Vb, active), _compact(self.Ub, active)
        on = active.to(self.device)
        self.scale, self.Rv = self.scale[on], self.Rv[on]
        self.T, self.done = self.T[active], self.done[active]
        self.tied_since = self.tied_since[active]
        self.drift_left, self.drift_right = self.drift_left[active], self.drift_right[active]
        self.visited, self.steps = self.visited[active], self.steps[active]
        return ritz.at(active)

    def restart(self, ritz: _Ritz, hi: int) -> int:
        """Replace the bases by their leading Ritz vectors and the next block; T becomes their values."""
        keep, batch = self.keep, len(self.rows)
        Pk, Qk = (t[:, :hi, :keep].to(self.device, self.dtype) for t in (ritz.P, ritz.Qh.mT))
        next_block = self.work.right_q[:batch].copy_(self.Vb[:, hi:hi + self.w])
        for basis, rotation, dim in ((self.Ub, Pk, self.m), (self.Vb, Qk, self.n)):
            rotated = self.work.rotated(batch, keep, dim)
            torch.bmm(rotation.mT, basis[:, :hi], out=rotated)
            basis[:, :keep] = rotated
        self.Vb[:, keep:keep + self.w] = next_block
        self.T.zero_()
        self.T[:, :keep, :keep] = torch.diag_embed(ritz.S[:, :keep])
        return keep
