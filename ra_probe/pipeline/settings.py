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
    threads: int | None = None  # torch CPU threads while probing; None: the caller's (host.probe_threads caps both)
    thresholds: Thresholds = field(default_factory=Thresholds)

    def resolved_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def resolved_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def validate(self) -> None:
        """Refuse values no probe can run with, naming the setting (a UserError)."""
        if self.solver not in SOLVERS:
            raise UserError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.null not in NULLS:
            raise UserError(f"null must be one of {', '.join(NULLS)}, got {self.null!r}")
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
