"""Matrix-free Jacobian operators (spec §4). An operator stands for a batch of B matrices J_b (m × n),
one per sample, and applies them to one vector per sample or to a block of k vectors per sample.
It knows nothing of solvers; solvers know nothing of networks."""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch.func import jvp, vjp, vmap

# torch's first forward-mode product loads decompositions through torch.jit.script, which warns
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)


class BatchedOperator:
    """Interface: `shape = (B, m, n)`; `matvec` (B, n) → (B, m); `rmatvec` (B, m) → (B, n);
    `matmat` (B, n, k) → (B, m, k); `rmatmat` (B, m, k) → (B, n, k). `products` counts applications
    of J or Jᵀ to one vector per sample."""

    shape: tuple[int, int, int]
    dtype: torch.dtype
    device: torch.device
    products: int = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v.unsqueeze(-1)).squeeze(-1)

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        return self.rmatmat(u.unsqueeze(-1)).squeeze(-1)

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rmatmat(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        self.products += v.shape[-1]
        return self.matrices @ v

    def rmatmat(self, u: torch.Tensor) -> torch.Tensor:
        self.products += u.shape[-1]
        return self.matrices.transpose(1, 2) @ u

    def dense(self, chunk: int = 256) -> torch.Tensor:
        return self.matrices


class JacobianOperator(BatchedOperator):
    """J_b = ∂f/∂x at x_b for a batched function f: (B, *in) → (B, *out) whose samples do not interact
    (eval mode). J·V is a forward-mode product (`jvp`) of the whole batch, one vector per sample, under
    `vmap` over the k vectors of a block; Jᵀ·U reuses one saved `vjp` function, also under `vmap`.
    `chunk` caps how many vectors go through one vmapped call (memory)."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = 16):
        self.f, self.x, self.chunk = f, x, chunk
        self.in_shape = tuple(x.shape[1:])
        with torch.no_grad():
            out = f(x)
        self.out_shape = tuple(out.shape[1:])
        batch = x.shape[0]
        self.shape = (batch, out[0].numel(), x[0].numel())
        self.dtype, self.device = x.dtype, x.device
        self._vjp_fn = None
        self._jv = vmap(self._jvp_one, in_dims=-1, out_dims=-1, randomness="same")
        self._jtu = vmap(self._vjp_one, in_dims=-1, out_dims=-1, randomness="same")

    def _jvp_one(self, v: torch.Tensor) -> torch.Tensor:
        tangent = v.reshape(self.x.shape)
        return jvp(self.f, (self.x,), (tangent,))[1].reshape(self.shape[0], -1)

    def _vjp_one(self, u: torch.Tensor) -> torch.Tensor:
        if self._vjp_fn is None:
            _, self._vjp_fn = vjp(self.f, self.x)
        return self._vjp_fn(u.reshape(self.shape[0], *self.out_shape))[0].reshape(self.shape[0], -1)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        return self._jvp_one(v)

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        self.products += 1
        return self._vjp_one(u)

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        self.products += v.shape[-1]
        return torch.cat([self._jv(v[..., i:i + self.chunk].contiguous())
                          for i in range(0, v.shape[-1], self.chunk)], dim=-1)

    def rmatmat(self, u: torch.Tensor) -> torch.Tensor:
        if self._vjp_fn is None:  # build the saved vjp outside vmap
            _, self._vjp_fn = vjp(self.f, self.x)
        self.products += u.shape[-1]
        return torch.cat([self._jtu(u[..., i:i + self.chunk].contiguous())
                          for i in range(0, u.shape[-1], self.chunk)], dim=-1)
