"""The settings of a probe: what to measure and how, one dataclass shared by the CLI, the library and
the cache key."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from ra_probe.engine.solvers import DENSE_LIMIT, SOLVERS
from ra_probe.errors import UserError
from ra_probe.metrics.verdict import Thresholds

Progress = Callable[[str, int, int], None]  # (what is being measured, done, total)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
NULLS = ("init", "none")
TOKENS = ("all", "last")  # token positions whose Jacobians are measured (text models)
LEVELS = ("auto", "block", "sublayer")  # transformer sites: the family's default, whole blocks, or attention and MLP


@dataclass
class Settings:
    k: int = 16  # singular triplets per site and sample
    align_k: int | None = None  # K of RA2 (default: k)
    samples: int = 64
    batch_size: int | None = None  # samples per chunk; None: the most that fit the device's free memory
    tol: float = 1e-3
    solver: str = "auto"  # auto | dense | block
    chunk: int = 16  # vectors per vmapped Jacobian product call
    dense_limit: int = DENSE_LIMIT  # largest site dimension whose Jacobian auto may form (cost model below)
    tau: float = 1e-2
    dtype: str = "float32"
    device: str | None = None
    seed: int = 0
    null: str = "init"  # init: RA metrics also measured on the architecture at random init | none
    null_samples: int = 8  # samples of the null measurement (the first of the probe's)
    tokens: str = "all"  # all: every real token of a sentence, its whole Jacobian | last: the last real token's
    sites: str = "auto"  # granularity of transformer sites (see LEVELS)
    coupling_k: tuple[int, ...] = ()  # K values of block coupling (empty: not measured)
    threads: int | None = None  # torch CPU threads while probing; None: the caller's (host.probe_threads caps both)
    thresholds: Thresholds = field(default_factory=Thresholds)

    def resolved_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def validate(self) -> None:
        """Refuse values no probe can run with, naming the setting (a UserError)."""
        if self.solver not in SOLVERS:
            raise UserError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.null not in NULLS:
            raise UserError(f"null must be one of {', '.join(NULLS)}, got {self.null!r}")
        for name, allowed in (("tokens", TOKENS), ("sites", LEVELS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        self.coupling_k = coupling_ks(self.coupling_k, self.k)
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("k", "samples", "chunk", "null_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or isinstance(self.threads, bool)
                                         or self.threads < 1):
            raise UserError(f"threads must be a positive integer, got {self.threads!r}")
        if self.tol < 0 or self.tau < 0:
            raise UserError("tol and tau must be ≥ 0")
        device = self.resolved_device()
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {self.device}: CUDA is not available here")

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["device"] = str(self.resolved_device())
        out["align_k"] = self.align_k or self.k
        return out


def coupling_ks(values, k: int) -> tuple[int, ...]:
    """The K values of block coupling, sorted and distinct, from integers or text like "10,30"; each
    needs as many singular triplets (≤ k)."""
    if isinstance(values, str):
        try:
            values = [int(part) for part in values.split(",") if part.strip()]
        except ValueError:
            raise UserError(f"coupling-k must be integers like 10,30, got {values!r}") from None
    values = tuple(sorted({int(v) for v in values or ()}))
    if values and (values[0] < 1 or values[-1] > k):
        raise UserError(f"coupling-k values must lie in [1, k = {k}] (each needs that many singular triplets), "
                        f"got {', '.join(map(str, values))}")
    return values
