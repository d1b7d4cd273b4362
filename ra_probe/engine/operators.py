"""Matrix-free Jacobian operators. An operator stands for a batch of B matrices J_b (m × n),
one per sample, and applies them to a block of k vectors per sample in one call. It knows nothing of
solvers; solvers know nothing of networks."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import contextmanager
from time import perf_counter
from typing import Any

import torch
from torch.func import jvp, vjp, vmap

from ra_probe.engine import linearized, memory

# torch's first forward-mode product loads decompositions through torch.jit.script, which warns
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)


# Sites with at least this many input dimensions per sample take J·V from a linearized program
# (`linearized.linearize`): traced once (~65 ms plus a few forwards on a CPU), each J·V then runs the
# tangent's operations only, where `jvp` recomputes the primal every call. Measured on a CPU, 4
# samples × 4 vectors per call: resnet18 layer1 at 112 px (50k dims) jvp 15.8 ms a call,
# torch.func.linearize 10.8, ours 8.6; vit_tiny MLP (38k) 41.7, 22.4 and 21.5; on the 2k-4k sites
# (bert-tiny FFN, a 32 px conv block) a solve's ~30 calls never earn the trace back.
LINEARIZE_MIN_DIM = 16384

# what torch.func says when an operation lacks what its transforms need and torch.autograd has: a custom
# autograd.Function without setup_context, a vmap rule or a jvp rule; a built-in op without a forward-mode
# derivative (the LSTM kernel, mkldnn_rnn_layer). The products then come from torch.autograd
# (`AutogradProducts`: J·v by double backward)
TORCH_FUNC_REFUSALS = ("setup_context", "vmap staticmethod", "jvp function for custom autograd.Function",
                       "Trying to use forward AD with")


class BatchedOperator:
    """Interface: `shape = (B, m, n)`; `matmat` (B, n, k) → (B, m, k); `rmatmat` (B, m, k) → (B, n, k).
    `products` counts applications of J or Jᵀ to one vector of one sample (a call on B samples and k
    vectors adds B·k). `select(rows)` is the same operator on a subset of the samples, or None when
    the operator cannot be split."""

    shape: tuple[int, int, int]
    dtype: torch.dtype
    device: torch.device
    products: int = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v.unsqueeze(-1)).squeeze(-1)

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        return self.rmatmat(u.unsqueeze(-1)).squeeze(-1)

    def matmat(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """J v, written into `out` (B, m, k) when given (solvers reuse one buffer for every step)."""
        raise NotImplementedError

    def rmatmat(self, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Jᵀ u, written into `out` (B, n, k) when given."""
        raise NotImplementedError

    def select(self, rows: torch.Tensor) -> BatchedOperator | None:
        return None

    def select_cost(self) -> float:
        """What an operator from `select` costs before its first product, in products (of one vector
        for one sample): nothing, here."""
        return 0.0

    def release(self, keep_trace: bool = True) -> None:
        """Drop what the operator keeps of its function between products (nothing, here); `keep_trace`:
        whether it may keep what costs little memory to build them again from (`JacobianOperator`)."""

    def dense(self, chunk: int = 256) -> torch.Tensor:
        """The matrices themselves, (B, m, n), column block by column block: J·I."""
        batch, _, n = self.shape
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        cols = [self.matmat(eye[:, i:i + chunk].expand(batch, n, -1)) for i in range(0, n, chunk)]
        return torch.cat(cols, dim=2)


class DenseOperator(BatchedOperator):
    """Explicit matrices J (B, m, n)."""

    def __init__(self, matrices: torch.Tensor):
        self.matrices = matrices
        self.shape = tuple(matrices.shape)
        self.dtype, self.device = matrices.dtype, matrices.device
        self.products = 0

    def matmat(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self.products += v.shape[0] * v.shape[-1]
        return _into(self.matrices @ v, out)

    def rmatmat(self, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self.products += u.shape[0] * u.shape[-1]
        return _into(self.matrices.mT @ u, out)

    def select(self, rows: torch.Tensor) -> DenseOperator:
        return DenseOperator(self.matrices[rows])

    def dense(self, chunk: int = 256) -> torch.Tensor:
        return self.matrices


class JacobianOperator(BatchedOperator):
    """J_b = ∂f/∂x at x_b for f: (B, *in) → (B, *out) whose samples do not interact (eval mode), called
    as f(x), or as f(x, ctx) when side inputs `ctx` are given (a site's branch; they are split with x).

    J·V is a forward-mode product (`jvp`) of the whole batch, one vector per sample; Jᵀ·U reuses one
    saved `vjp` function. Both run under `vmap` over the k vectors of a block, at most `vectors_per_call`
    vectors per call, fewer where the branch's activations would not fit (`memory.call_width`, from
    what the branch saves of one sample's forward, measured on first use).
    With `linearize` (default: sites of at least `LINEARIZE_MIN_DIM` input dimensions), J·V comes from
    a program of the tangent alone traced on first use (`linearized.linearize`, else torch's), which
    skips the primal recomputation; a branch that cannot be traced or vmapped that way falls back to
    `jvp`, with the same results."""

    def __init__(self, f: Callable[..., torch.Tensor], x: torch.Tensor, ctx: Any = None,
                 vectors_per_call: int = 16, linearize: bool | None = None, tangent_size: int | None = None):
        self.f, self.x, self.ctx, self.vectors_per_call = f, x, ctx, vectors_per_call
        # elements one sample's tangent takes inside f (x's, unless f runs it through more: a function of
        # the last token that runs the whole sentence); sizes the calls of `wide_calls`
        self.tangent_size = tangent_size or x[0].numel()
        self.products = 0
        self._fx = f if ctx is None else (lambda x_: f(x_, ctx))
        # seconds spent on getting ready for products (the forward, the vjp function, the linearized
        # program) and on products, and the products timed: what `select_cost` weighs
        self._ready_seconds = self._product_seconds = 0.0
        self._timed_products = 0
        with self._getting_ready(), torch.no_grad():
            self.out = self._fx(x)
        out = self.out
        self.shape = (x.shape[0], out[0].numel(), x[0].numel())
        self.dtype, self.device = x.dtype, x.device
        self._vjp_fn = None
        self.linearize = self.shape[2] >= LINEARIZE_MIN_DIM if linearize is None else linearize
        self._lin_fn = None  # the linearized program, traced on first use
        self._traced = None  # torch's trace of J·t, kept by `release` to build the program from again
        self._autograd: AutogradProducts | None = None  # products for a branch torch.func cannot transform
        self._staged: dict[int, torch.Tensor] = {}  # by dimension d: (chunk, B, d), made on first use
        self._saved: int | None = None  # bytes the branch saves of one sample (`saved_bytes`)
        self._width: tuple[int, int] | None = None  # (vectors_per_call, vectors per call) as last sized

    def _jvp_flat(self, v: torch.Tensor) -> torch.Tensor:
        if self._lin_fn is not None:
            return self._lin_fn(v.reshape(self.x.shape)).reshape(self.shape[0], -1)
        return jvp(self._fx, (self.x,), (v.reshape(self.x.shape),))[1].reshape(self.shape[0], -1)

    def _vjp_flat(self, u: torch.Tensor) -> torch.Tensor:
        return self._vjp_fn(u.reshape(self.out.shape))[0].reshape(self.shape[0], -1)

    def matmat(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self.products += v.shape[0] * v.shape[-1]
        if self._autograd is None:
            try:
                return self._forward_products(v, out)
            except (RuntimeError, NotImplementedError) as exc:
                self._by_autograd(exc)
                try:
                    return _into(self._autograd.jv(v), out)
                except (RuntimeError, NotImplementedError):  # no double backward either (flash attention):
                    raise exc from None  # torch.func's refusal names the operation
        return _into(self._autograd.jv(v), out)

    def _by_autograd(self, exc: Exception) -> None:
        """Products by torch.autograd from now on when torch.func refuses an operation of the branch
        (`TORCH_FUNC_REFUSALS`: a custom autograd.Function written without setup_context, as Bloom's
        GELU, or without a vmap or a jvp rule; an op without a forward-mode derivative, as the LSTM's);
        anything else is raised again."""
        if not any(refusal in str(exc) for refusal in TORCH_FUNC_REFUSALS):
            raise exc
        self._autograd = AutogradProducts(self._fx, self.x)

    def _forward_products(self, v: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        if self.linearize and self._lin_fn is None:  # first use: trace, try, or fall back to jvp for good
            try:
                with self._getting_ready(), warnings.catch_warnings():  # the tracer's folding warns about its graph
                    warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
                    self._lin_fn = self._linearized()
                return self._blocks(self._jvp_flat, v, out)
            except Exception:  # noqa: BLE001 - any failure of the tracer or of vmap over its program
                self._lin_fn, self.linearize = None, False
        return self._blocks(self._jvp_flat, v, out)

    def _linearized(self):
        """The J·v program from the operator's one trace: ours (what is known computed once), else torch's."""
        if self._traced is None:
            self._traced = linearized.trace(self._fx, self.x)
        try:
            return linearized.specialize(self._traced, self.x)
        except linearized.Unsupported:
            return linearized.folded(self._traced)

    def rmatmat(self, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self.products += u.shape[0] * u.shape[-1]
        if self._autograd is None:
            try:
                if self._vjp_fn is None:  # built once, outside vmap, on first use
                    with self._getting_ready():
                        _, self._vjp_fn = vjp(self._fx, self.x)
                return self._blocks(self._vjp_flat, u, out)
            except (RuntimeError, NotImplementedError) as exc:
                self._by_autograd(exc)
        return _into(self._autograd.jtu(u), out)

    def release(self, keep_trace: bool = True) -> None:
        """Drop the programs built at the branch's weights (the vjp function, the linearized program,
        autograd's products), which hold what they saved of the forward (activations, attention maps),
        and the buffers its calls stage vectors in: the next product builds them anew. The linearized
        program is built again from torch's trace of J·t, which holds only fake values, x and the weights
        (no trace again for the same samples: RA2's products after the solve), unless `keep_trace` is
        false (weights that are offloaded between uses, which the trace would keep resident)."""
        self._vjp_fn = self._lin_fn = self._autograd = None
        self._staged = {}
        if not keep_trace:
            self._traced = None

    def _blocks(self, single, w: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """`_calls`, timed."""
        start = perf_counter()
        result = self._calls(single, w, out)
        self._product_seconds += perf_counter() - start
        self._timed_products += w.shape[0] * w.shape[-1]
        return result

    def _calls(self, single, w: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """Apply `single`, a product of one column per sample, to the columns of w (B, d, k), vmapped over
        `vectors_per_call` columns per call, into `out` when given; a call of a single column skips vmap
        (its batching rules cost more than they save for one vector: 6-9 % of a call of the ViT MLP's and
        resnet18's products, whose calls take one vector each). Each chunk of c columns is copied into a
        buffer (c, B, d) the operator keeps until `release`: under vmap the branch's operations see the
        c·B vectors as one batch, which they can view only in that layout; from a solver's row-major
        basis (B, k, d) every convolution, reshape and matmul made a copy of its own at every call."""
        if w.shape[-1] == 1:
            return _into(single(w[..., 0].contiguous()).unsqueeze(-1), out)
        rows, per_call = w.mT, self._per_call()
        # made per call: held by the operator, vmap's wrapper of its own method would keep it (and the
        # programs it holds) in a reference cycle past its last use
        batched = vmap(single, randomness="same")
        chunks = (self._staging(rows[:, i:i + per_call], per_call) for i in range(0, rows.shape[1], per_call))
        results = (batched(c).transpose(0, 1) if len(c) > 1 else single(c[0]).unsqueeze(1) for c in chunks)
        return torch.cat(list(results), dim=1).mT if out is None else _columns_into(results, out)

    def _per_call(self) -> int:
        """Vectors per vmapped call: `vectors_per_call`, as far as `memory.call_width` allows for the
        temporaries of the branch's activations."""
        if self._width is None or self._width[0] != self.vectors_per_call:
            width = memory.call_width(self.vectors_per_call, self.shape[0], self.saved_bytes(), self.device)
            self._width = (self.vectors_per_call, width)
        return self._width[1]

    def saved_bytes(self) -> int:
        """Bytes the branch's forward saves for one sample (`memory.saved_bytes`), measured on the
        first sample on first use."""
        if self._saved is None:
            self._saved = branch_saved_bytes(self.f, self.x, self.ctx)
        return self._saved

    def _staging(self, rows: torch.Tensor, per_call: int) -> torch.Tensor:
        """`rows` (B, c, d) copied into the operator's buffer of `per_call` vectors as (c, B, d)."""
        batch, c, dim = rows.shape
        buffer = self._staged.get(dim)
        if buffer is None or buffer.shape[0] < c:
            buffer = self._staged[dim] = rows.new_empty(max(c, per_call), batch, dim)
        return buffer[:c].copy_(rows.transpose(0, 1))

    @contextmanager
    def _getting_ready(self):
        """The time inside, when it ends without an error, counted as getting ready for products."""
        start = perf_counter()
        yield
        self._ready_seconds += perf_counter() - start

    def select_cost(self) -> float:
        """What `select` costs before its first product, in products: the time the forward, the vjp
        function and the linearized program (a trace of the branch) took this operator, over what its
        products took. On the clock, an accelerator's products without waiting for them: an estimate,
        for deciding when to split."""
        if not self._timed_products or not self._product_seconds:
            return 0.0
        return self._ready_seconds * self._timed_products / self._product_seconds

    def select(self, rows: torch.Tensor) -> JacobianOperator | None:
        """The operator on samples `rows`: x and every ctx tensor batched like x are sliced. A branch
        whose side inputs do not slice that way (its output rows change, or it refuses them: WavLM's
        position bias is batched as samples × heads) cannot be split: None."""
        try:
            sub = JacobianOperator(self.f, self.x[rows], batch_rows(self.ctx, rows, self.shape[0]),
                                   self.vectors_per_call, self.linearize, self.tangent_size)
        except RuntimeError:
            return None
        sub._saved = self._saved
        expected = self.out[rows]
        if sub.out.shape != expected.shape or not torch.allclose(sub.out, expected, rtol=1e-4,
                                                                 atol=1e-5 * expected.abs().max().item()):
            return None
        return sub


WIDE_ELEMENTS = 1 << 22  # a wide call's tangents: at most this many elements (16 MB in float32)


@contextmanager
def wide_calls(op: BatchedOperator, vectors: int):
    """Within: a Jacobian operator's calls take up to `vectors` vectors each, as far as `WIDE_ELEMENTS`
    of tangents allow and never fewer than its `vectors_per_call` (sized for the solver's blocks, which the memory
    estimate covers): the branch's primal and per-call overhead are paid once for many vectors (forming
    J, applying it to the top vectors of other sites). Other operators are unchanged."""
    narrow = getattr(op, "vectors_per_call", None)
    if narrow is None:
        yield
        return
    op.vectors_per_call = max(narrow, min(vectors, WIDE_ELEMENTS // max(1, op.shape[0] * op.tangent_size)))
    try:
        yield
    finally:
        op.vectors_per_call = narrow


class AutogradProducts:
    """J·V and Jᵀ·U of f at x by torch.autograd, one vector at a time, for branches torch.func cannot
    transform. Jᵀu is a backward pass; J v is the derivative of that backward in its cotangent: Jᵀu is
    linear in u, so ∂⟨Jᵀu, v⟩/∂u = J v (the double-backward trick; it differentiates the branch's
    backward, which a custom Function writes in torch operations)."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
        with torch.enable_grad():
            self.x = x.detach().requires_grad_()
            self.out = f(self.x)
            self.u = torch.zeros_like(self.out, requires_grad=True)
            self.jtu_of_u = self._grad(self.out, self.x, self.u, create_graph=True)

    @staticmethod
    def _grad(output, wrt, cotangent, create_graph=False) -> torch.Tensor:
        return torch.autograd.grad(output, wrt, cotangent, retain_graph=True, create_graph=create_graph,
                                   allow_unused=True, materialize_grads=True)[0]

    def _columns(self, output, wrt, w: torch.Tensor, shape) -> torch.Tensor:
        with torch.enable_grad():
            return torch.stack([self._grad(output, wrt, w[..., i].reshape(shape)).reshape(w.shape[0], -1)
                                for i in range(w.shape[-1])], dim=-1)

    def jv(self, v: torch.Tensor) -> torch.Tensor:
        """(B, n, k) → (B, m, k)."""
        return self._columns(self.jtu_of_u, self.u, v, self.x.shape)

    def jtu(self, u: torch.Tensor) -> torch.Tensor:
        """(B, m, k) → (B, n, k)."""
        return self._columns(self.out, self.x, u, self.out.shape)


def _into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return result if out is None else out.copy_(result)


def _columns_into(parts, out: torch.Tensor) -> torch.Tensor:
    """Blocks of columns given as rows (B, c, d), written one after another into the columns of `out` (B, d, k)."""
    at = 0
    for part in parts:
        out.mT[:, at:at + part.shape[1]] = part
        at += part.shape[1]
    return out


def branch_saved_bytes(f: Callable[..., torch.Tensor], x: torch.Tensor, ctx: Any = None) -> int:
    """What f (called as a `JacobianOperator` calls it) saves of its forward for x's first sample
    (`memory.saved_bytes`), or for a branch whose side inputs refuse one sample's rows (see `select`),
    the batch's share."""
    one = batch_rows(ctx, slice(0, 1), x.shape[0])
    try:
        return memory.saved_bytes(f if ctx is None else (lambda x_: f(x_, one)), x[:1])
    except RuntimeError:
        return memory.saved_bytes(f if ctx is None else (lambda x_: f(x_, ctx)), x) // x.shape[0]


def batch_rows(value: Any, rows: torch.Tensor | slice, batch: int) -> Any:
    """Side inputs for samples `rows`: every tensor batched like x (first dimension `batch`), in
    tuples, lists and dicts too, takes those rows; anything else is shared by all samples."""
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, (tuple, list)):
        return type(value)(batch_rows(v, rows, batch) for v in value)
    if isinstance(value, dict):
        return {key: batch_rows(v, rows, batch) for key, v in value.items()}
    return value
